"""Models, endpoint configs and endpoints: create, wait for, deploy, update and delete."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from .base import DeployerBase
from .errors import DeployError, aws_error_text
from .options import DeploymentOptions, ModelOptions
from .resources import ENDPOINT_BAD_STATES, DeploymentResult, Resource, Undo, deployment_tags, tag_list, unique_suffix

logger = logging.getLogger("whisper_triton.deploy.deployer")

ASYNC_ENVIRONMENT = {
    # async inference hands the container up to 1 GB and waits up to an hour
    "WHISPER_TRITON_MAX_BODY_BYTES": str(1024 * 1024 * 1024),
    "WHISPER_TRITON_REQUEST_TIMEOUT_S": "3600",
}


def with_async_environment(options: DeploymentOptions) -> ModelOptions:
    """The model's container environment, with the larger async limits unless the user set them."""
    if not options.is_async:
        return options.model
    environment = {**ASYNC_ENVIRONMENT, **options.model.environment}
    return dataclasses.replace(options.model, environment=environment)


class EndpointMixin(DeployerBase):
    """The model, its endpoint config and the endpoint, as one transaction per operation."""

    def create_model(self, name: str, model: ModelOptions, tags: dict[str, str], undo: Undo) -> str:
        model_name = f"{name}-{unique_suffix()}"
        container: dict[str, Any] = {"Image": model.image_uri, "Environment": dict(model.environment)}
        if model.multi_model:  # SageMaker hands each <id>.tar.gz under the prefix to the container on demand
            container["Mode"] = "MultiModel"
            container["ModelDataUrl"] = model.model_data if model.model_data.endswith("/") else model.model_data + "/"
        elif model.compressed:
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
            Tags=tag_list(tags),
        )
        undo.add(Resource("model", model_name, response.get("ModelArn")), lambda: sm.delete_model(ModelName=model_name))
        self.progress(f"created model {model_name}")
        return model_name

    def create_endpoint_config(self, options: DeploymentOptions, model_name: str, tags: dict[str, str], undo: Undo) -> str:
        config_name = f"{options.name}-{unique_suffix()}"
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
        ami = e.resolved_inference_ami()
        if ami is not None:  # the host's NVIDIA driver: SageMaker's default on ml.g5 (470) is too old for the image
            variant["InferenceAmiVersion"] = ami
        request: dict[str, Any] = {
            "EndpointConfigName": config_name,
            "ProductionVariants": [variant],
            "Tags": tag_list(tags),
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
        tags = deployment_tags(options.name, options.tags)
        sm = self.aws.sagemaker
        with self._transaction(f"Deploying {options.name}") as undo:
            model_name = self.create_model(options.name, with_async_environment(options), tags, undo)
            config_name = self.create_endpoint_config(options, model_name, tags, undo)
            response = self._step(
                f"Creating endpoint {options.name}",
                "Check the endpoint config and your sagemaker:CreateEndpoint permission and instance quota.",
                sm.create_endpoint,
                EndpointName=options.name,
                EndpointConfigName=config_name,
                Tags=tag_list(tags),
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
        tags = deployment_tags(options.name, options.tags)
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
