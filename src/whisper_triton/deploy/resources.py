"""What a deployment is made of on AWS, and the pieces every deployment step shares: the resource
records, the undo log of a transaction, tag and name helpers, and the AWS constants."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import aws_error_code, aws_error_text
from .options import TAG_KEY

logger = logging.getLogger("whisper_triton.deploy.deployer")

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SAGEMAKER_METRICS = "AWS/SageMaker"
ENDPOINT_BAD_STATES = {"Failed", "OutOfService", "UpdateRollbackFailed"}
NOT_FOUND_CODES = {"ValidationException", "ResourceNotFoundException", "ObjectNotFoundException", "NoSuchEntity"}


@dataclass
class Resource:
    """One AWS resource a deployment owns."""

    kind: str  # model | endpoint-config | endpoint | scalable-target | scaling-policy | alarm | transform-job
    name: str
    arn: str | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass
class DeploymentResult:
    name: str
    endpoint_name: str
    model_name: str
    endpoint_config_name: str
    endpoint_status: str | None
    created: list[Resource] = field(default_factory=list)


class Undo:
    """What a transaction created, newest last, with how to remove each."""

    def __init__(self) -> None:
        self.steps: list[tuple[Resource, Callable[[], Any]]] = []

    def add(self, resource: Resource, remove: Callable[[], Any]) -> None:
        self.steps.append((resource, remove))

    @property
    def created(self) -> list[Resource]:
        return [resource for resource, _ in self.steps]

    def run(self) -> list[str]:
        left_behind = []
        for resource, remove in reversed(self.steps):
            try:
                remove()
                logger.info("rolled back %s", resource)
            except Exception as exc:  # noqa: BLE001 - report, keep removing the rest
                if is_not_found(exc):
                    continue
                logger.error("could not roll back %s: %s", resource, aws_error_text(exc))
                left_behind.append(str(resource))
        return left_behind


def is_not_found(exc: BaseException) -> bool:
    text = aws_error_text(exc).lower()
    return aws_error_code(exc) in NOT_FOUND_CODES and ("not find" in text or "not found" in text or "does not exist" in text)


def deployment_tags(name: str, extra: dict[str, str]) -> dict[str, str]:
    return {**extra, TAG_KEY: name}


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def unique_suffix() -> str:
    return uuid.uuid4().hex[:8]


def resource_id(endpoint_name: str, variant_name: str) -> str:
    return f"endpoint/{endpoint_name}/variant/{variant_name}"


def policy_names(endpoint_name: str) -> dict[str, str]:
    return {
        "backlog": f"{endpoint_name}-backlog-per-instance",
        "scale_from_zero": f"{endpoint_name}-scale-from-zero",
        "invocations": f"{endpoint_name}-invocations-per-instance",
        "alarm": f"{endpoint_name}-has-backlog-without-capacity",
    }

