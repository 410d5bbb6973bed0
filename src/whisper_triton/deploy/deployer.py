"""Create, update, scale, batch-run and remove a whisper-triton SageMaker deployment with plain boto3.

Every call validates its input before it creates anything, and every multi-step operation is a
transaction: when a step fails midway, what the operation created so far is removed again, so no
half-created deployment is left behind. Everything created is tagged
`whisper-triton:deployment=<name>`; `cleanup(name)` finds and removes it by that tag.
"""

from __future__ import annotations

import dataclasses

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .aws import AwsClients, parse_s3_uri
from .errors import DeployError, aws_error_code, aws_error_text
from .options import (
    NAME_RE,
    TAG_KEY,
    AutoscalingOptions,
    DeploymentOptions,
    EndpointOptions,
    ModelOptions,
    TransformOptions,
)

logger = logging.getLogger(__name__)

ROLE_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
TOPIC_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[\w-]+$")
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*(:\d+)?/[a-z0-9._/-]+(:[\w.-]+|@sha256:[0-9a-f]{64})?$")
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


class _Undo:
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
                if _is_not_found(exc):
                    continue
                logger.error("could not roll back %s: %s", resource, aws_error_text(exc))
                left_behind.append(str(resource))
        return left_behind


def _is_not_found(exc: BaseException) -> bool:
    text = aws_error_text(exc).lower()
    return aws_error_code(exc) in NOT_FOUND_CODES and ("not find" in text or "not found" in text or "does not exist" in text)


def _tags(name: str, extra: dict[str, str]) -> dict[str, str]:
    return {**extra, TAG_KEY: name}


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def _suffix() -> str:
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


class Deployer:
    """Plain-boto3 deployment steps. `progress` receives one line per status change while waiting."""

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

    # ------------------------------------------------------------------ validation

    def validate(self, options: DeploymentOptions, *, updating: bool = False) -> None:
        """Raise one DeployError naming every problem, before anything is created."""
        problems: list[tuple[str, str, str]] = []
        if not NAME_RE.match(options.name or ""):
            problems.append((
                f"The deployment name {options.name!r} is not a valid SageMaker name.",
                "Use 1-54 letters, digits and hyphens, starting with a letter or digit.",
                "name",
            ))
        self._check_model(options.model, problems)
        self._check_endpoint(options.endpoint, problems)
        if options.async_inference is not None:
            a = options.async_inference
            for param, uri in (("output_path", a.output_path), ("failure_path", a.failure_path)):
                self._check_bucket(uri, param, f"the async {param.replace('_', ' ')}", problems)
            if a.max_concurrent_invocations_per_instance < 1:
                problems.append((
                    "The async max concurrent invocations per instance must be at least 1.",
                    "Pass --max-concurrent-invocations 1 or more (4 suits one GPU).",
                    "max_concurrent_invocations_per_instance",
                ))
            for param, arn in (("success_topic_arn", a.success_topic_arn), ("error_topic_arn", a.error_topic_arn)):
                if arn and not TOPIC_RE.match(arn):
                    problems.append((f"{arn!r} is not an SNS topic ARN.", "Pass arn:aws:sns:REGION:ACCOUNT:TOPIC.", param))
        if options.autoscaling is not None:
            self._check_autoscaling(options.autoscaling, options.is_async, options.endpoint, problems)
        if not problems and NAME_RE.match(options.name):
            exists = self._endpoint_exists(options.name)
            if updating and not exists:
                problems.append((
                    f"There is no endpoint named {options.name!r} to update in {self._region()}.",
                    "Create it with `whisper-deploy deploy`, or check the name and region (AWS_DEFAULT_REGION).",
                    "name",
                ))
            elif not updating and exists:
                problems.append((
                    f"An endpoint named {options.name!r} already exists in {self._region()}.",
                    "Use `whisper-deploy update` to change it, pick another --name, or remove it with "
                    "`whisper-deploy cleanup`.",
                    "name",
                ))
        self._raise(problems)

    def _raise(self, problems: list[tuple[str, str, str]]) -> None:
        if problems:
            raise DeployError(
                cause=" ".join(p[0] for p in problems),
                fix=" ".join(dict.fromkeys(p[1] for p in problems)),
                param=problems[0][2],
            )

    def _check_model(self, model: ModelOptions | None, problems: list) -> None:
        if model is None:
            problems.append(("No model was given.", "Pass --image, --model-data and --role.", "model"))
            return
        if not model.role_arn:
            problems.append((
                "No execution role was given: SageMaker needs an IAM role to pull the image and read the model data.",
                "Pass --role arn:aws:iam::ACCOUNT:role/NAME (a role with AmazonSageMakerFullAccess or "
                "read access to the model bucket and ECR).",
                "role_arn",
            ))
        elif not ROLE_RE.match(model.role_arn):
            problems.append((
                f"{model.role_arn!r} is not an IAM role ARN.",
                "Pass --role arn:aws:iam::ACCOUNT:role/NAME.",
                "role_arn",
            ))
        if not model.image_uri:
            problems.append((
                "No container image was given.",
                "Pass --image ACCOUNT.dkr.ecr.REGION.amazonaws.com/whisper-triton:TAG (push the image to ECR first).",
                "image_uri",
            ))
        elif not IMAGE_RE.match(model.image_uri):
            problems.append((
                f"{model.image_uri!r} is not an image URI of the form REGISTRY/REPOSITORY[:TAG|@DIGEST].",
                "Pass the full ECR URI, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0.",
                "image_uri",
            ))
        if not model.model_data:
            problems.append((
                "No model data location was given.",
                "Pass --model-data s3://BUCKET/PREFIX/ (uncompressed) or s3://BUCKET/KEY/model.tar.gz.",
                "model_data",
            ))
        elif self._check_bucket(model.model_data, "model_data", "the model data", problems):
            bucket, key = parse_s3_uri(model.model_data)
            if model.compressed:
                try:
                    self.aws.s3.head_object(Bucket=bucket, Key=key)
                except Exception as exc:  # noqa: BLE001
                    problems.append((
                        f"The model archive {model.model_data} does not exist or cannot be read ({aws_error_text(exc)}).",
                        "Upload model.tar.gz there first, or point --model-data at an existing object.",
                        "model_data",
                    ))
            else:
                prefix = key if key.endswith("/") or not key else key + "/"
                try:
                    count = self.aws.s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount")
                except Exception as exc:  # noqa: BLE001
                    problems.append((
                        f"Could not list the model data prefix s3://{bucket}/{prefix} ({aws_error_text(exc)}).",
                        "Check s3:ListBucket on the bucket for your credentials.",
                        "model_data",
                    ))
                    return
                if not count:
                    problems.append((
                        f"There are no objects under the model data prefix s3://{bucket}/{prefix}.",
                        "Upload the model repository there first (see the export command), or fix --model-data.",
                        "model_data",
                    ))

    def _check_bucket(self, uri: str, param: str, what: str, problems: list) -> bool:
        try:
            bucket, _ = parse_s3_uri(uri)
        except ValueError as exc:
            problems.append((f"{what.capitalize()} {exc}.", f"Pass {what} as s3://BUCKET/PREFIX.", param))
            return False
        try:
            self.aws.s3.head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001
            problems.append((
                f"The bucket {bucket!r} for {what} does not exist or is not accessible ({aws_error_text(exc)}).",
                f"Create it (aws s3 mb s3://{bucket}) in the endpoint's region, or name a bucket you can read.",
                param,
            ))
            return False
        return True

    @staticmethod
    def _check_endpoint(endpoint: EndpointOptions, problems: list) -> None:
        if not endpoint.instance_type.startswith("ml."):
            problems.append((
                f"{endpoint.instance_type!r} is not a SageMaker instance type.",
                "Pass --instance-type ml.g5.xlarge (or another ml.* type).",
                "instance_type",
            ))
        if endpoint.initial_instance_count < 1:
            problems.append((
                "The initial instance count must be at least 1.",
                "Pass --instance-count 1 or more; async endpoints scale to zero through --autoscale.",
                "initial_instance_count",
            ))
        for param, value, bound in (
            ("container_startup_health_check_timeout_s", endpoint.container_startup_health_check_timeout_s, 3600),
            ("model_data_download_timeout_s", endpoint.model_data_download_timeout_s, 3600),
        ):
            if value is not None and not 60 <= value <= bound:
                problems.append((f"{param} is {value}; SageMaker accepts 60 to {bound} seconds.", "Pass a value in range.", param))

    @staticmethod
    def _check_autoscaling(scaling: AutoscalingOptions, is_async: bool, endpoint: EndpointOptions, problems: list) -> None:
        minimum = scaling.min_capacity if scaling.min_capacity is not None else (0 if is_async else 1)
        if minimum < 0 or (minimum == 0 and not is_async):
            problems.append((
                f"A minimum capacity of {minimum} is not possible here: only asynchronous endpoints scale to zero.",
                "Pass --min-capacity 1 or more for a real-time endpoint.",
                "min_capacity",
            ))
        if scaling.max_capacity < max(minimum, 1):
            problems.append((
                f"The maximum capacity {scaling.max_capacity} is below the minimum {max(minimum, 1)}.",
                "Raise --max-capacity.",
                "max_capacity",
            ))
        target = scaling.target_backlog_per_instance if is_async else scaling.target_invocations_per_instance
        if target <= 0:
            problems.append(("The scaling target value must be positive.", "Pass a target above zero.", "target"))

    def _endpoint_exists(self, name: str) -> bool:
        try:
            self.aws.sagemaker.describe_endpoint(EndpointName=name)
            return True
        except Exception as exc:  # noqa: BLE001
            if _is_not_found(exc):
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
            if _is_not_found(exc):
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
    def _transaction(self, what: str) -> Iterator[_Undo]:
        undo = _Undo()
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

    # ------------------------------------------------------------------ building blocks

    def create_model(self, name: str, model: ModelOptions, tags: dict[str, str], undo: _Undo) -> str:
        model_name = f"{name}-{_suffix()}"
        container: dict[str, Any] = {"Image": model.image_uri, "Environment": dict(model.environment)}
        if model.compressed:
            container["ModelDataUrl"] = model.model_data
        else:
            uri = model.model_data if model.model_data.endswith("/") else model.model_data + "/"
            container["ModelDataSource"] = {
                "S3DataSource": {"S3Uri": uri, "S3DataType": "S3Prefix", "CompressionType": "None"}
            }
        sm = self.aws.sagemaker
        response = self._step(
            f"Creating model {model_name}",
            "Check that the role can be assumed by SageMaker and can read the image and the model data.",
            sm.create_model,
            ModelName=model_name,
            ExecutionRoleArn=model.role_arn,
            PrimaryContainer=container,
            Tags=_tag_list(tags),
        )
        undo.add(Resource("model", model_name, response.get("ModelArn")), lambda: sm.delete_model(ModelName=model_name))
        self.progress(f"created model {model_name}")
        return model_name

    def create_endpoint_config(self, options: DeploymentOptions, model_name: str, tags: dict[str, str], undo: _Undo) -> str:
        config_name = f"{options.name}-{_suffix()}"
        e = options.endpoint
        variant: dict[str, Any] = {
            "VariantName": e.variant_name,
            "ModelName": model_name,
            "InstanceType": e.instance_type,
            "InitialInstanceCount": e.initial_instance_count,
        }
        if e.container_startup_health_check_timeout_s is not None:
            variant["ContainerStartupHealthCheckTimeoutInSeconds"] = e.container_startup_health_check_timeout_s
        if e.model_data_download_timeout_s is not None:
            variant["ModelDataDownloadTimeoutInSeconds"] = e.model_data_download_timeout_s
        if e.volume_size_gb is not None:
            variant["VolumeSizeInGB"] = e.volume_size_gb
        request: dict[str, Any] = {
            "EndpointConfigName": config_name,
            "ProductionVariants": [variant],
            "Tags": _tag_list(tags),
        }
        a = options.async_inference
        if a is not None:
            output: dict[str, Any] = {"S3OutputPath": a.output_path, "S3FailurePath": a.failure_path}
            notification = {}
            if a.success_topic_arn:
                notification["SuccessTopic"] = a.success_topic_arn
            if a.error_topic_arn:
                notification["ErrorTopic"] = a.error_topic_arn
            if notification:
                output["NotificationConfig"] = notification
            request["AsyncInferenceConfig"] = {
                "ClientConfig": {"MaxConcurrentInvocationsPerInstance": a.max_concurrent_invocations_per_instance},
                "OutputConfig": output,
            }
        sm = self.aws.sagemaker
        response = self._step(
            f"Creating endpoint config {config_name} ({e.instance_type} x{e.initial_instance_count})",
            "Check --instance-type (is it offered for real-time/async inference in this region, and is your "
            "account's quota for it above zero?) and the other endpoint options.",
            sm.create_endpoint_config,
            **request,
        )
        undo.add(
            Resource("endpoint-config", config_name, response.get("EndpointConfigArn")),
            lambda: sm.delete_endpoint_config(EndpointConfigName=config_name),
        )
        self.progress(f"created endpoint config {config_name}")
        return config_name

    def wait_for_endpoint(self, name: str, *, timeout_s: float = 3600.0, expect_config: str | None = None) -> dict:
        """Poll until the endpoint is InService (progress on each status change); DeployError when it
        fails, rolls an update back, or is not ready within `timeout_s`."""
        start = time.monotonic()
        last = None
        while True:
            description = self._describe_endpoint(name)
            status = description.get("EndpointStatus")
            if status != last:
                self.progress(f"endpoint {name}: {status} after {time.monotonic() - start:.0f}s")
                last = status
            if status == "InService":
                if expect_config and description.get("EndpointConfigName") != expect_config:
                    raise DeployError(
                        cause=(
                            f"The update of endpoint {name} was rolled back to {description.get('EndpointConfigName')}: "
                            f"{description.get('FailureReason') or 'no reason given'}."
                        ),
                        fix=f"Read the logs in CloudWatch group /aws/sagemaker/Endpoints/{name} and fix the new model or config.",
                    )
                return description
            if status in ENDPOINT_BAD_STATES:
                raise DeployError(
                    cause=f"Endpoint {name} is {status}: {description.get('FailureReason') or 'no reason given'}.",
                    fix=(
                        f"Read the logs in CloudWatch group /aws/sagemaker/Endpoints/{name}. Common causes: the role "
                        "cannot pull the image or read the model data; the container does not answer GET /ping "
                        "within the startup health check timeout (raise --startup-timeout); the download takes "
                        "longer than --download-timeout."
                    ),
                )
            if time.monotonic() - start > timeout_s:
                raise DeployError(
                    cause=f"Endpoint {name} is still {status} after {timeout_s:.0f}s.",
                    fix="Wait longer (--wait-timeout) or check its progress in the SageMaker console.",
                )
            time.sleep(self.poll_interval_s)

    # ------------------------------------------------------------------ deploy / update / delete

    def deploy(self, options: DeploymentOptions, *, wait: bool = True, wait_timeout_s: float = 3600.0) -> DeploymentResult:
        """Model, endpoint config, endpoint and (optionally) autoscaling; all or nothing."""
        if options.autoscaling is not None and not wait:
            raise DeployError(
                cause="Autoscaling can only be registered once the endpoint is InService, and --no-wait does not wait.",
                fix="Drop --no-wait, or deploy first and run `whisper-deploy autoscale` when the endpoint is up.",
                param="autoscaling",
            )
        self.validate(options)
        tags = _tags(options.name, options.tags)
        sm = self.aws.sagemaker
        with self._transaction(f"Deploying {options.name}") as undo:
            model_name = self.create_model(options.name, _with_async_environment(options), tags, undo)
            config_name = self.create_endpoint_config(options, model_name, tags, undo)
            response = self._step(
                f"Creating endpoint {options.name}",
                "Check the endpoint config and your sagemaker:CreateEndpoint permission and instance quota.",
                sm.create_endpoint,
                EndpointName=options.name,
                EndpointConfigName=config_name,
                Tags=_tag_list(tags),
            )
            undo.add(
                Resource("endpoint", options.name, response.get("EndpointArn")),
                lambda: sm.delete_endpoint(EndpointName=options.name),
            )
            self.progress(f"creating endpoint {options.name}")
            status = None
            if wait:
                status = self.wait_for_endpoint(options.name, timeout_s=wait_timeout_s).get("EndpointStatus")
            if options.autoscaling is not None:
                self._add_autoscaling(
                    options.name, options.endpoint.variant_name, options.autoscaling, options.is_async, tags, undo
                )
            created = undo.created
        return DeploymentResult(options.name, options.name, model_name, config_name, status, created)

    def update(self, options: DeploymentOptions, *, wait: bool = True, wait_timeout_s: float = 3600.0) -> DeploymentResult:
        """Point the existing endpoint `options.name` at a new model and endpoint config.

        The new model and config are removed again if the update fails; the old ones are removed
        once the endpoint runs the new config (when they carry this deployment's tag).
        """
        self.validate(options, updating=True)
        tags = _tags(options.name, options.tags)
        sm = self.aws.sagemaker
        old_config = self._describe_endpoint(options.name).get("EndpointConfigName")
        with self._transaction(f"Updating {options.name}") as undo:
            model_name = self.create_model(options.name, options.model, tags, undo)
            config_name = self.create_endpoint_config(options, model_name, tags, undo)
            self._step(
                f"Updating endpoint {options.name} to {config_name}",
                "If the endpoint has autoscaling and the instance type changes, remove the scaling first "
                "(`whisper-deploy autoscale --remove`); otherwise check the new config.",
                sm.update_endpoint,
                EndpointName=options.name,
                EndpointConfigName=config_name,
            )
            status = None
            if wait:
                status = self.wait_for_endpoint(
                    options.name, timeout_s=wait_timeout_s, expect_config=config_name
                ).get("EndpointStatus")
            if options.autoscaling is not None:
                self._add_autoscaling(
                    options.name, options.endpoint.variant_name, options.autoscaling, options.is_async, tags, undo
                )
            created = undo.created
        if wait and old_config and old_config != config_name:
            self._remove_old_config(options.name, old_config)
        return DeploymentResult(options.name, options.name, model_name, config_name, status, created)

    def _remove_old_config(self, name: str, config_name: str) -> None:
        sm = self.aws.sagemaker
        try:
            config = sm.describe_endpoint_config(EndpointConfigName=config_name)
            if not self._has_tag(config["EndpointConfigArn"], name):
                return
            sm.delete_endpoint_config(EndpointConfigName=config_name)
            for variant in config.get("ProductionVariants", []):
                model = sm.describe_model(ModelName=variant["ModelName"])
                if self._has_tag(model["ModelArn"], name):
                    sm.delete_model(ModelName=variant["ModelName"])
            self.progress(f"removed the previous endpoint config {config_name} and its model")
        except Exception as exc:  # noqa: BLE001 - the update itself succeeded
            logger.warning("could not remove the previous config %s: %s", config_name, aws_error_text(exc))

    def delete_endpoint(self, name: str) -> list[Resource]:
        """Delete the endpoint and its autoscaling (configs and models stay until `cleanup`)."""
        description = self._describe_endpoint(name)
        removed = self._remove_autoscaling(name, [v["VariantName"] for v in description.get("ProductionVariants", [])])
        self._step(
            f"Deleting endpoint {name}",
            "Check your sagemaker:DeleteEndpoint permission.",
            self.aws.sagemaker.delete_endpoint,
            EndpointName=name,
        )
        self.progress(f"deleted endpoint {name}")
        return removed + [Resource("endpoint", name, description.get("EndpointArn"))]

    # ------------------------------------------------------------------ autoscaling

    def configure_autoscaling(
        self,
        endpoint_name: str,
        scaling: AutoscalingOptions,
        *,
        variant_name: str | None = None,
        deployment: str | None = None,
    ) -> list[Resource]:
        """Register the endpoint's variant with Application Auto Scaling; async or real-time policies
        are chosen from the endpoint config. All or nothing."""
        description = self._describe_endpoint(endpoint_name)
        variant = variant_name or description["ProductionVariants"][0]["VariantName"]
        # describe_endpoint does not always carry AsyncInferenceConfig; the endpoint config does
        config = self.aws.sagemaker.describe_endpoint_config(EndpointConfigName=description["EndpointConfigName"])
        is_async = bool(config.get("AsyncInferenceConfig"))
        problems: list = []
        self._check_autoscaling(scaling, is_async, EndpointOptions(), problems)
        self._raise(problems)
        if deployment is None:  # the scaling belongs to the endpoint's deployment, so cleanup finds it
            endpoint_tags = self.aws.sagemaker.list_tags(ResourceArn=description["EndpointArn"]).get("Tags", [])
            deployment = next((t["Value"] for t in endpoint_tags if t["Key"] == TAG_KEY), endpoint_name)
        tags = _tags(deployment, {})
        with self._transaction(f"Configuring autoscaling for {endpoint_name}") as undo:
            self._add_autoscaling(endpoint_name, variant, scaling, is_async, tags, undo)
            return undo.created

    def _add_autoscaling(
        self, endpoint: str, variant: str, scaling: AutoscalingOptions, is_async: bool, tags: dict[str, str], undo: _Undo
    ) -> None:
        aas, cw = self.aws.autoscaling, self.aws.cloudwatch
        rid = resource_id(endpoint, variant)
        names = policy_names(endpoint)
        minimum = scaling.min_capacity if scaling.min_capacity is not None else (0 if is_async else 1)
        target = {"ServiceNamespace": "sagemaker", "ResourceId": rid, "ScalableDimension": SCALABLE_DIMENSION}
        response = self._step(
            f"Registering {rid} for autoscaling ({minimum}-{scaling.max_capacity} instances)",
            "Check your application-autoscaling:RegisterScalableTarget permission (and the service-linked role).",
            aas.register_scalable_target,
            **target,
            MinCapacity=minimum,
            MaxCapacity=scaling.max_capacity,
            Tags=tags,
        )
        undo.add(
            Resource("scalable-target", rid, response.get("ScalableTargetARN")),
            lambda: aas.deregister_scalable_target(**target),
        )
        dimensions = [{"Name": "EndpointName", "Value": endpoint}]
        if is_async:
            self._put_policy(undo, target, names["backlog"], {
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": float(scaling.target_backlog_per_instance),
                    "CustomizedMetricSpecification": {
                        "MetricName": "ApproximateBacklogSizePerInstance",
                        "Namespace": SAGEMAKER_METRICS,
                        "Dimensions": dimensions,
                        "Statistic": "Average",
                    },
                    "ScaleInCooldown": scaling.scale_in_cooldown_s,
                    "ScaleOutCooldown": scaling.scale_out_cooldown_s,
                },
            })
            step_arn = self._put_policy(undo, target, names["scale_from_zero"], {
                "PolicyType": "StepScaling",
                "StepScalingPolicyConfiguration": {
                    "AdjustmentType": "ChangeInCapacity",
                    "MetricAggregationType": "Average",
                    "Cooldown": scaling.scale_from_zero_cooldown_s,
                    "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}],
                },
            })
            alarm = names["alarm"]
            self._step(
                f"Creating CloudWatch alarm {alarm}",
                "Check your cloudwatch:PutMetricAlarm permission.",
                cw.put_metric_alarm,
                AlarmName=alarm,
                AlarmDescription=f"Scale {endpoint} up from zero when requests wait without an instance.",
                MetricName="HasBacklogWithoutCapacity",
                Namespace=SAGEMAKER_METRICS,
                Statistic="Average",
                Dimensions=dimensions,
                Period=scaling.alarm_period_s,
                EvaluationPeriods=scaling.alarm_evaluation_periods,
                DatapointsToAlarm=scaling.alarm_evaluation_periods,
                Threshold=1.0,
                ComparisonOperator="GreaterThanOrEqualToThreshold",
                TreatMissingData="missing",
                AlarmActions=[step_arn],
                Tags=_tag_list(tags),
            )
            undo.add(Resource("alarm", alarm), lambda: cw.delete_alarms(AlarmNames=[alarm]))
        else:
            self._put_policy(undo, target, names["invocations"], {
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": float(scaling.target_invocations_per_instance),
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "ScaleInCooldown": scaling.scale_in_cooldown_s,
                    "ScaleOutCooldown": scaling.scale_out_cooldown_s,
                },
            })
        self.progress(f"autoscaling on {rid}: {minimum}-{scaling.max_capacity} instances ({'async' if is_async else 'real-time'})")

    def _put_policy(self, undo: _Undo, target: dict, name: str, policy: dict) -> str:
        aas = self.aws.autoscaling
        response = self._step(
            f"Creating scaling policy {name}",
            "Check your application-autoscaling:PutScalingPolicy permission.",
            aas.put_scaling_policy,
            PolicyName=name,
            **target,
            **policy,
        )
        undo.add(
            Resource("scaling-policy", name, response.get("PolicyARN")),
            lambda: aas.delete_scaling_policy(PolicyName=name, **target),
        )
        return response["PolicyARN"]

    def _remove_autoscaling(self, endpoint: str, variants: list[str]) -> list[Resource]:
        aas, cw = self.aws.autoscaling, self.aws.cloudwatch
        removed: list[Resource] = []
        alarm = policy_names(endpoint)["alarm"]
        if cw.describe_alarms(AlarmNames=[alarm]).get("MetricAlarms"):
            cw.delete_alarms(AlarmNames=[alarm])
            removed.append(Resource("alarm", alarm))
        for variant in variants:
            rid = resource_id(endpoint, variant)
            target = {"ServiceNamespace": "sagemaker", "ResourceId": rid, "ScalableDimension": SCALABLE_DIMENSION}
            policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid).get("ScalingPolicies", [])
            for policy in policies:
                aas.delete_scaling_policy(PolicyName=policy["PolicyName"], **target)
                removed.append(Resource("scaling-policy", policy["PolicyName"], policy.get("PolicyARN")))
            found = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid]).get("ScalableTargets", [])
            if found:
                aas.deregister_scalable_target(**target)
                removed.append(Resource("scalable-target", rid, found[0].get("ScalableTargetARN")))
        return removed

    # ------------------------------------------------------------------ batch transform

    def start_transform(self, options: TransformOptions) -> Resource:
        """Start a batch transform job over every object under `options.input_prefix` (does not wait)."""
        problems: list = []
        if not NAME_RE.match(options.name or ""):
            problems.append((f"The name {options.name!r} is not a valid SageMaker name.", "Use 1-54 letters, digits and hyphens.", "name"))
        if self._check_bucket(options.input_prefix, "input_prefix", "the transform input", problems):
            bucket, prefix = parse_s3_uri(options.input_prefix)
            if not self.aws.s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"):
                problems.append((
                    f"There are no objects under the transform input {options.input_prefix}.",
                    "Upload the audio files there first, or fix --input.",
                    "input_prefix",
                ))
        self._check_bucket(options.output_path, "output_path", "the transform output", problems)
        if options.model_name:
            try:
                self.aws.sagemaker.describe_model(ModelName=options.model_name)
            except Exception as exc:  # noqa: BLE001
                problems.append((
                    f"The model {options.model_name!r} does not exist ({aws_error_text(exc)}).",
                    "Pass the name of an existing model (`aws sagemaker list-models`), or --image/--model-data/--role to create one.",
                    "model_name",
                ))
        else:
            self._check_model(options.model, problems)
        self._check_endpoint(EndpointOptions(instance_type=options.instance_type, initial_instance_count=options.instance_count), problems)
        if not 1 <= options.max_payload_mb <= 100:
            problems.append(("max_payload_mb must be 1-100.", "Pass --max-payload-mb between 1 and 100.", "max_payload_mb"))
        self._raise(problems)

        tags = _tags(options.name, options.tags)
        sm = self.aws.sagemaker
        with self._transaction(f"Starting batch transform {options.name}") as undo:
            model_name = options.model_name or self.create_model(options.name, options.model, tags, undo)  # type: ignore[arg-type]
            job_name = f"{options.name}-{_suffix()}"
            transform_input: dict[str, Any] = {
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": options.input_prefix}},
                "SplitType": "None",
            }
            if options.content_type:
                transform_input["ContentType"] = options.content_type
            response = self._step(
                f"Creating transform job {job_name}",
                "Check --instance-type (transform quota in this region) and the model.",
                sm.create_transform_job,
                TransformJobName=job_name,
                ModelName=model_name,
                BatchStrategy="SingleRecord",
                MaxConcurrentTransforms=options.max_concurrent_transforms,
                MaxPayloadInMB=options.max_payload_mb,
                ModelClientConfig={"InvocationsTimeoutInSeconds": options.invocation_timeout_s, "InvocationsMaxRetries": 1},
                TransformInput=transform_input,
                TransformOutput={"S3OutputPath": options.output_path, "Accept": options.accept, "AssembleWith": "None"},
                TransformResources={"InstanceType": options.instance_type, "InstanceCount": options.instance_count},
                Tags=_tag_list(tags),
            )
        self.progress(f"started transform job {job_name} over {options.input_prefix} -> {options.output_path}")
        return Resource("transform-job", job_name, response.get("TransformJobArn"))

    # ------------------------------------------------------------------ find and clean up

    def _has_tag(self, arn: str, name: str) -> bool:
        tags = self.aws.sagemaker.list_tags(ResourceArn=arn).get("Tags", [])
        return any(t["Key"] == TAG_KEY and t["Value"] == name for t in tags)

    def find(self, name: str) -> list[Resource]:
        """Every resource tagged `whisper-triton:deployment=<name>`, in the order cleanup removes them."""
        sm, aas, cw = self.aws.sagemaker, self.aws.autoscaling, self.aws.cloudwatch
        found: list[Resource] = []

        endpoints = [
            e for e in sm.get_paginator("list_endpoints").paginate(NameContains=name).build_full_result().get("Endpoints", [])
            if self._has_tag(e["EndpointArn"], name)
        ]
        endpoint_names = {e["EndpointName"] for e in endpoints}

        seen: set[str] = set()
        for prefix in sorted({name} | endpoint_names):  # our alarms are named after the endpoint they scale
            alarms = cw.get_paginator("describe_alarms").paginate(AlarmNamePrefix=f"{prefix}-").build_full_result()
            for alarm in alarms.get("MetricAlarms", []):
                if alarm["AlarmArn"] in seen:
                    continue
                seen.add(alarm["AlarmArn"])
                tags = cw.list_tags_for_resource(ResourceARN=alarm["AlarmArn"]).get("Tags", [])
                if any(t["Key"] == TAG_KEY and t["Value"] == name for t in tags):
                    found.append(Resource("alarm", alarm["AlarmName"], alarm["AlarmArn"]))
        targets = aas.get_paginator("describe_scalable_targets").paginate(ServiceNamespace="sagemaker").build_full_result()
        for target in targets.get("ScalableTargets", []):
            endpoint = target["ResourceId"].split("/")[1] if target["ResourceId"].startswith("endpoint/") else None
            # ours: on one of our endpoints, or left over on an endpoint of this deployment's name that is gone
            if endpoint in endpoint_names or (endpoint == name and not self._endpoint_exists(name)):
                policies = aas.describe_scaling_policies(
                    ServiceNamespace="sagemaker", ResourceId=target["ResourceId"]
                ).get("ScalingPolicies", [])
                for policy in policies:
                    found.append(Resource("scaling-policy", f"{target['ResourceId']}:{policy['PolicyName']}", policy.get("PolicyARN")))
                found.append(Resource("scalable-target", target["ResourceId"], target.get("ScalableTargetARN")))
        found.extend(Resource("endpoint", e["EndpointName"], e["EndpointArn"]) for e in endpoints)

        jobs = sm.get_paginator("list_transform_jobs").paginate(NameContains=name, StatusEquals="InProgress").build_full_result()
        for job in jobs.get("TransformJobSummaries", []):
            if self._has_tag(job["TransformJobArn"], name):
                found.append(Resource("transform-job", job["TransformJobName"], job["TransformJobArn"]))
        configs = sm.get_paginator("list_endpoint_configs").paginate(NameContains=name).build_full_result()
        for config in configs.get("EndpointConfigs", []):
            if self._has_tag(config["EndpointConfigArn"], name):
                found.append(Resource("endpoint-config", config["EndpointConfigName"], config["EndpointConfigArn"]))
        models = sm.get_paginator("list_models").paginate(NameContains=name).build_full_result()
        for model in models.get("Models", []):
            if self._has_tag(model["ModelArn"], name):
                found.append(Resource("model", model["ModelName"], model["ModelArn"]))
        return found

    def cleanup(self, name: str, *, dry_run: bool = False) -> list[Resource]:
        """Remove everything tagged for deployment `name`; returns what was (or, dry run, would be) removed.

        Transform jobs cannot be deleted: running ones are stopped; their S3 output stays.
        """
        try:
            resources = self.find(name)
        except Exception as exc:  # noqa: BLE001
            raise DeployError(
                cause=f"Could not list the resources of deployment {name!r}: {aws_error_text(exc)}.",
                fix="Check your AWS credentials, region and list/describe permissions.",
            ) from exc
        if dry_run:
            return resources
        sm, aas, cw = self.aws.sagemaker, self.aws.autoscaling, self.aws.cloudwatch
        removed, failed = [], []
        for resource in resources:
            try:
                if resource.kind == "alarm":
                    cw.delete_alarms(AlarmNames=[resource.name])
                elif resource.kind == "scaling-policy":
                    rid, _, policy = resource.name.rpartition(":")
                    aas.delete_scaling_policy(
                        PolicyName=policy, ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION
                    )
                elif resource.kind == "scalable-target":
                    aas.deregister_scalable_target(
                        ServiceNamespace="sagemaker", ResourceId=resource.name, ScalableDimension=SCALABLE_DIMENSION
                    )
                elif resource.kind == "endpoint":
                    sm.delete_endpoint(EndpointName=resource.name)
                elif resource.kind == "transform-job":
                    sm.stop_transform_job(TransformJobName=resource.name)
                elif resource.kind == "endpoint-config":
                    sm.delete_endpoint_config(EndpointConfigName=resource.name)
                elif resource.kind == "model":
                    sm.delete_model(ModelName=resource.name)
                removed.append(resource)
                self.progress(f"removed {resource}")
            except Exception as exc:  # noqa: BLE001 - keep removing the rest
                if _is_not_found(exc):
                    removed.append(resource)
                    continue
                logger.error("could not remove %s: %s", resource, aws_error_text(exc))
                failed.append(f"{resource} ({aws_error_text(exc)})")
        if failed:
            raise DeployError(
                cause=f"Cleanup of {name!r} could not remove {len(failed)} resource(s).",
                fix="Check the delete permissions for them and run cleanup again.",
                left_behind=failed,
            )
        return removed


ASYNC_ENVIRONMENT = {
    # async inference hands the container up to 1 GB and waits up to an hour
    "WHISPER_TRITON_MAX_BODY_BYTES": str(1024 * 1024 * 1024),
    "WHISPER_TRITON_REQUEST_TIMEOUT_S": "3600",
}


def _with_async_environment(options: DeploymentOptions) -> ModelOptions:
    """The model's container environment, with the larger async limits unless the user set them."""
    if not options.is_async:
        return options.model
    environment = {**ASYNC_ENVIRONMENT, **options.model.environment}
    return dataclasses.replace(options.model, environment=environment)
