"""The core every deployment concern builds on: AWS clients, progress reporting, transactions
(all or nothing) with one error per failed step, and looking endpoints up."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .aws import AwsClients
from .errors import DeployError, aws_error_text
from .resources import Undo, is_not_found

logger = logging.getLogger("whisper_triton.deploy.deployer")


class DeployerBase:
    """AWS clients, progress, transactions and endpoint look-ups; the concern mixins add the steps."""

    def __init__(
        self,
        clients: AwsClients | None = None,
        *,
        poll_interval_s: float = 15.0,
        progress: Callable[[str], None] | None = None,
    ):
        self.aws = clients or AwsClients()
        self.poll_interval_s = poll_interval_s
        self.progress = progress or (lambda line: logger.info("%s", line))

    def _endpoint_exists(self, name: str) -> bool:
        try:
            self.aws.sagemaker.describe_endpoint(EndpointName=name)
            return True
        except Exception as exc:  # noqa: BLE001
            if is_not_found(exc):
                return False
            raise DeployError(
                cause=f"Could not look up endpoint {name!r}: {aws_error_text(exc)}.",
                fix="Check your AWS credentials, region and sagemaker:DescribeEndpoint permission.",
            ) from exc

    def _region(self) -> str:
        return f"region {self.aws.sagemaker.meta.region_name}"

    def _describe_endpoint(self, name: str) -> dict:
        try:
            return self.aws.sagemaker.describe_endpoint(EndpointName=name)
        except Exception as exc:  # noqa: BLE001
            if is_not_found(exc):
                raise DeployError(
                    cause=f"The endpoint {name!r} does not exist in {self._region()}.",
                    fix="Check the name (`whisper-deploy status --name NAME`, `aws sagemaker list-endpoints`) and AWS_DEFAULT_REGION.",
                    param="endpoint_name",
                ) from exc
            raise DeployError(
                cause=f"Could not look up endpoint {name!r}: {aws_error_text(exc)}.",
                fix="Check your AWS credentials, region and permissions.",
            ) from exc

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, what: str) -> Iterator[Undo]:
        undo = Undo()
        try:
            yield undo
        except BaseException as exc:
            created = [str(r) for r in undo.created]
            left_behind = undo.run()
            if created:
                logger.warning("%s failed; rolled back %s", what, ", ".join(created))
            if isinstance(exc, DeployError):
                exc.left_behind.extend(left_behind)
                raise
            if not isinstance(exc, Exception):
                raise
            raise DeployError(
                cause=f"{what} failed: {aws_error_text(exc)}.",
                fix="Fix the cause above and run the command again; what it had created was removed.",
                left_behind=left_behind,
            ) from exc

    def _step(self, description: str, fix: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return call(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise DeployError(cause=f"{description} failed: {aws_error_text(exc)}.", fix=fix) from exc

