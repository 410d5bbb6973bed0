"""Validation of every deployment input before anything is created: one DeployError naming every
problem, with the cause and the fix for each."""

from __future__ import annotations

import re

from .aws import parse_s3_uri
from .base import DeployerBase
from .errors import DeployError, aws_error_text
from .options import (
    AMI_AUTO,
    AMI_NONE,
    INFERENCE_AMI_VERSIONS,
    NAME_RE,
    AutoscalingOptions,
    DeploymentOptions,
    EndpointOptions,
    ModelOptions,
    is_gpu_instance,
)

ROLE_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
TOPIC_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[\w-]+$")
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*(:\d+)?/[a-z0-9._/-]+(:[\w.-]+|@sha256:[0-9a-f]{64})?$")


class ValidationMixin(DeployerBase):
    """Checks of names, the model, the endpoint options, async settings and autoscaling."""

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
        self._check_ami(options.endpoint.inference_ami_version, options.endpoint.instance_type, INFERENCE_AMI_VERSIONS,
                        "inference_ami_version", "--inference-ami-version", problems)
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
        if model.multi_model and model.compressed:
            problems.append((
                "A multi-model endpoint takes an S3 prefix of models, not one model.tar.gz.",
                "Pass --model-data s3://BUCKET/PREFIX/ holding one <id>.tar.gz per model (whisper-deploy models-upload).",
                "model_data",
            ))
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
    def _check_ami(value: str, instance_type: str, known: dict[str, str], param: str, flag: str, problems: list) -> None:
        """An AMI version SageMaker knows, and a GPU AMI only on a GPU instance type."""
        if value in (AMI_AUTO, AMI_NONE, "", None):
            return
        names = ", ".join(f"{name} ({driver})" for name, driver in known.items())
        if value not in known:
            problems.append((
                f"{value!r} is not a SageMaker AMI version for this ({param}).",
                f"Pass {flag} with one of: {names}; or {AMI_AUTO} (the project's default on GPU instances) or {AMI_NONE}.",
                param,
            ))
        elif "gpu" in value and not is_gpu_instance(instance_type):
            problems.append((
                f"{value} is a GPU AMI, but {instance_type} has no NVIDIA GPU.",
                f"Drop {flag} (or pass {AMI_NONE}) for CPU instance types, or choose an ml.g*/ml.p* instance type.",
                param,
            ))

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
