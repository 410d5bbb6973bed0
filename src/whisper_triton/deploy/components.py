"""Inference components: several models on one endpoint, each its own container copy with its own
share of the instance (memory, GPUs), scaled by copies. The alternative to a multi-model endpoint
when models are large and each should keep its memory (no loading on demand):

- an endpoint config whose variant names no model (the execution role sits on the config);
- one SageMaker model per Whisper model, its repository (`whisper-export model-repo` + `upload`) as
  the uncompressed `ModelDataSource`, `WHISPER_TRITON_SERVED_MODEL_NAME` set to its id;
- one inference component per model (`ComputeResourceRequirements`, `RuntimeConfig.CopyCount`),
  invoked with `invoke_endpoint(..., InferenceComponentName=...)`.

moto 5.2.6 implements none of this (an endpoint config without a model fails there, and
CreateInferenceComponent is not implemented), so the requests are built here as plain data, checked
against botocore's own service model in the tests, and sent in one transaction by `Deployer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .options import DeploymentOptions
from .resources import tag_list


@dataclass
class ComponentOptions:
    memory_mb: int = 8192  # MinMemoryRequiredInMb of one copy (docs/gpu.md: ~7.2 GB for large-v3)
    accelerators: float = 1.0  # NumberOfAcceleratorDevicesRequired of one copy
    copies: int = 1


def component_requests(options: DeploymentOptions, models: dict[str, str], component: ComponentOptions,
                       suffix: str, tags: dict[str, str]) -> dict[str, Any]:
    """{"endpoint_config": ..., "models": [...], "components": [...]} as boto3 keyword arguments."""
    e = options.endpoint
    variant: dict[str, Any] = {"VariantName": e.variant_name, "InstanceType": e.instance_type,
                               "InitialInstanceCount": e.initial_instance_count,
                               "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"}}
    if e.container_startup_health_check_timeout_s is not None:
        variant["ContainerStartupHealthCheckTimeoutInSeconds"] = e.container_startup_health_check_timeout_s
    if e.model_data_download_timeout_s is not None:
        variant["ModelDataDownloadTimeoutInSeconds"] = e.model_data_download_timeout_s
    ami = e.resolved_inference_ami()
    if ami is not None:
        variant["InferenceAmiVersion"] = ami
    config = {"EndpointConfigName": f"{options.name}-{suffix}", "ExecutionRoleArn": options.model.role_arn,
              "ProductionVariants": [variant], "Tags": tag_list(tags)}
    model_requests, components = [], []
    for model_id, uri in models.items():
        model_name = f"{options.name}-{model_id}-{suffix}"[:63].rstrip("-")
        environment = {**options.model.environment, "WHISPER_TRITON_SERVED_MODEL_NAME": model_id}
        model_requests.append({
            "ModelName": model_name, "ExecutionRoleArn": options.model.role_arn, "Tags": tag_list(tags),
            "PrimaryContainer": {"Image": options.model.image_uri, "Environment": environment, "ModelDataSource": {
                "S3DataSource": {"S3Uri": uri if uri.endswith("/") else uri + "/", "S3DataType": "S3Prefix",
                                 "CompressionType": "None"}}}})
        components.append({
            "InferenceComponentName": f"{options.name}-{model_id}"[:63].rstrip("-"), "EndpointName": options.name,
            "VariantName": e.variant_name, "Tags": tag_list(tags),
            "Specification": {"ModelName": model_name, "ComputeResourceRequirements": {
                "MinMemoryRequiredInMb": component.memory_mb,
                "NumberOfAcceleratorDevicesRequired": component.accelerators}},
            "RuntimeConfig": {"CopyCount": component.copies}})
    return {"endpoint_config": config, "models": model_requests, "components": components}


class ComponentsMixin:
    """`Deployer.deploy_components`: the endpoint and one inference component per model, all or nothing."""

    def deploy_components(self, options: DeploymentOptions, models: dict[str, str], component: ComponentOptions,
                          *, wait: bool = True, wait_timeout_s: float = 3600.0):
        from .errors import DeployError
        from .resources import DeploymentResult, Resource, deployment_tags, unique_suffix

        if not models:
            raise DeployError(cause="No models were given for inference components.",
                              fix="Pass --inference-component ID=s3://BUCKET/PREFIX/ once per model.",
                              param="inference_components")
        import dataclasses

        # each component brings its own model data; the checks of the rest hold as for one model
        first = next(iter(models.values()))
        self.validate(dataclasses.replace(options, model=dataclasses.replace(options.model, model_data=first)))
        tags = deployment_tags(options.name, options.tags)
        requests = component_requests(options, models, component, unique_suffix(), tags)
        sm = self.aws.sagemaker
        with self._transaction(f"Deploying {options.name} with inference components") as undo:
            config = requests["endpoint_config"]
            self._step(f"Creating endpoint config {config['EndpointConfigName']} (no model: inference components)",
                       "Check --instance-type and the role.", sm.create_endpoint_config, **config)
            undo.add(Resource("endpoint-config", config["EndpointConfigName"]),
                     lambda: sm.delete_endpoint_config(EndpointConfigName=config["EndpointConfigName"]))
            self._step(f"Creating endpoint {options.name}", "Check your instance quota.", sm.create_endpoint,
                       EndpointName=options.name, EndpointConfigName=config["EndpointConfigName"],
                       Tags=config["Tags"])
            undo.add(Resource("endpoint", options.name), lambda: sm.delete_endpoint(EndpointName=options.name))
            if wait:
                self.wait_for_endpoint(options.name, timeout_s=wait_timeout_s)
            for model, request in zip(requests["models"], requests["components"]):
                self._step(f"Creating model {model['ModelName']}", "Check the image, the model data and the role.",
                           sm.create_model, **model)
                undo.add(Resource("model", model["ModelName"]), lambda n=model["ModelName"]: sm.delete_model(ModelName=n))
                self._step(f"Creating inference component {request['InferenceComponentName']}",
                           "Check that the instance has the memory and GPUs the components ask for together.",
                           sm.create_inference_component, **request)
                undo.add(Resource("inference-component", request["InferenceComponentName"]),
                         lambda n=request["InferenceComponentName"]: sm.delete_inference_component(
                             InferenceComponentName=n))
                self.progress(f"created inference component {request['InferenceComponentName']}")
            created = undo.created
        return DeploymentResult(options.name, options.name, ",".join(m["ModelName"] for m in requests["models"]),
                                config["EndpointConfigName"], None, created)
