"""Batch transform jobs over an S3 prefix of audio files."""

from __future__ import annotations

from typing import Any

from .aws import parse_s3_uri
from .base import DeployerBase
from .errors import aws_error_text
from .options import NAME_RE, TRANSFORM_AMI_VERSIONS, EndpointOptions, TransformOptions
from .resources import Resource, deployment_tags, tag_list, unique_suffix


class TransformMixin(DeployerBase):
    """Start a batch transform job, with the model it needs created in the same transaction."""

    def start_transform(self, options: TransformOptions) -> Resource:
        """Start a batch transform job over every object under `options.input_prefix` (does not wait)."""
        problems: list = []
        if not NAME_RE.match(options.name or ""):
            problems.append((f"The name {options.name!r} is not a valid SageMaker name.", "Use 1-54 letters, digits and hyphens.", "name"))
        if options.input_data_type not in ("S3Prefix", "ManifestFile"):
            problems.append((f"The input data type {options.input_data_type!r} is not one a transform job takes.",
                             "Use S3Prefix (every object under a prefix) or ManifestFile.", "input_data_type"))
        if not 0 <= options.invocation_max_retries <= 3:
            problems.append(("invocation_max_retries must be 0-3 (ModelClientConfig.InvocationsMaxRetries).",
                             "Pass a value between 0 and 3.", "invocation_max_retries"))
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
        self._check_ami(options.transform_ami_version, options.instance_type, TRANSFORM_AMI_VERSIONS,
                        "transform_ami_version", "--transform-ami-version", problems)
        if not 1 <= options.max_payload_mb <= 100:
            problems.append(("max_payload_mb must be 1-100.", "Pass --max-payload-mb between 1 and 100.", "max_payload_mb"))
        elif options.max_concurrent_transforms * options.max_payload_mb > 100:
            # CreateTransformJob: MaxConcurrentTransforms x MaxPayloadInMB may not exceed 100 MB
            problems.append((
                f"max_concurrent_transforms x max_payload_mb is {options.max_concurrent_transforms} x "
                f"{options.max_payload_mb} MB, over SageMaker's 100 MB.",
                f"Lower --max-payload-mb to {100 // max(1, options.max_concurrent_transforms)} or fewer concurrent transforms.",
                "max_payload_mb"))
        self._raise(problems)

        tags = deployment_tags(options.name, options.tags)
        sm = self.aws.sagemaker
        with self._transaction(f"Starting batch transform {options.name}") as undo:
            model_name = options.model_name or self.create_model(options.name, options.model, tags, undo)  # type: ignore[arg-type]
            job_name = f"{options.name}-{unique_suffix()}"
            transform_input: dict[str, Any] = {
                "DataSource": {"S3DataSource": {"S3DataType": options.input_data_type, "S3Uri": options.input_prefix}},
                "SplitType": "None",
            }
            if options.content_type:
                transform_input["ContentType"] = options.content_type
            resources: dict[str, Any] = {"InstanceType": options.instance_type, "InstanceCount": options.instance_count}
            ami = options.resolved_transform_ami()
            if ami is not None:  # the host's NVIDIA driver (SageMaker's batch default is 470)
                resources["TransformAmiVersion"] = ami
            response = self._step(
                f"Creating transform job {job_name}",
                "Check --instance-type (transform quota in this region) and the model.",
                sm.create_transform_job,
                TransformJobName=job_name,
                ModelName=model_name,
                BatchStrategy="SingleRecord",
                MaxConcurrentTransforms=options.max_concurrent_transforms,
                MaxPayloadInMB=options.max_payload_mb,
                ModelClientConfig={"InvocationsTimeoutInSeconds": options.invocation_timeout_s, "InvocationsMaxRetries": options.invocation_max_retries},
                TransformInput=transform_input,
                TransformOutput={"S3OutputPath": options.output_path, "Accept": options.accept, "AssembleWith": "None"},
                TransformResources=resources,
                Tags=tag_list(tags),
            )
        self.progress(f"started transform job {job_name} over {options.input_prefix} -> {options.output_path}")
        return Resource("transform-job", job_name, response.get("TransformJobArn"))
