"""What a deployment is made of, as plain dataclasses the CLI fills from its flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TAG_KEY = "whisper-triton:deployment"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
DEFAULT_VARIANT = "AllTraffic"
# the AWS pattern for SageMaker resource names, less room for the suffix we add to models and configs
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,53}$")

# The host AMI of a SageMaker GPU instance decides its NVIDIA driver. Without one, ml.g5 / ml.g4dn /
# ml.p4d run driver 470 (CUDA 11.4), too old for the serving image's CUDA 12.8 (Triton 25.01 needs
# driver 570+, or CUDA forward compatibility on an older data-center driver, which `serve` sets up).
# Names and drivers: the ProductionVariant.InferenceAmiVersion and TransformResources.TransformAmiVersion
# documentation of the SageMaker API (botocore 1.44 service model).
AMI_AUTO = "auto"  # the default below on GPU instance types, none elsewhere
AMI_NONE = "none"  # leave it to SageMaker (its default AMI for the instance type)
INFERENCE_AMI_VERSIONS = {
    "al2-ami-sagemaker-inference-gpu-2": "NVIDIA driver 535, CUDA 12.2",
    "al2-ami-sagemaker-inference-gpu-2-1": "NVIDIA driver 535, CUDA 12.2, no CUDA-compat mounting",
    "al2-ami-sagemaker-inference-gpu-3-1": "NVIDIA driver 550, CUDA 12.4, no CUDA-compat mounting",
    "al2023-ami-sagemaker-inference-gpu-4-1": "NVIDIA driver 580, CUDA 13.0, no CUDA-compat mounting",
    "al2-ami-sagemaker-inference-neuron-2": "Inferentia2 / Trainium, Neuron driver 2.19",
}
# driver 580 runs the image's CUDA 12.8 as it is: no forward compatibility needed
DEFAULT_INFERENCE_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"
TRANSFORM_AMI_VERSIONS = {
    "al2-ami-sagemaker-batch-gpu-470": "NVIDIA driver 470",
    "al2-ami-sagemaker-batch-gpu-535": "NVIDIA driver 535",
}
# the newest batch driver: CUDA 12.8 runs on it through forward compatibility (R535 is a supported branch)
DEFAULT_TRANSFORM_AMI = "al2-ami-sagemaker-batch-gpu-535"
_GPU_INSTANCE_RE = re.compile(r"^ml\.[gp]\d+[a-z]*\.")  # ml.g4dn, ml.g5, ml.g6e, ml.p4d, ml.p5en, ...


def is_gpu_instance(instance_type: str) -> bool:
    return bool(_GPU_INSTANCE_RE.match(instance_type or ""))


def resolve_ami(value: str | None, instance_type: str, default: str) -> str | None:
    """The AMI version to send: `auto` gives `default` on GPU instance types and none elsewhere."""
    if value in (None, "", AMI_NONE):
        return None
    if value == AMI_AUTO:
        return default if is_gpu_instance(instance_type) else None
    return value


@dataclass
class ModelOptions:
    """The container and its weights: an image URI and an S3 location.

    `model_data` is either an S3 prefix (ending in '/') delivered uncompressed to /opt/ml/model
    (ModelDataSource, CompressionType None: recommended for large engines), or a `.tar.gz` object
    (ModelDataUrl), which SageMaker unpacks there.
    """

    image_uri: str
    model_data: str
    role_arn: str
    environment: dict[str, str] = field(default_factory=dict)
    # a multi-model endpoint: `model_data` is the S3 prefix holding one `<id>.tar.gz` per model
    # (`whisper-deploy models-upload` packs a models.json's models there); the container is told to
    # load each one when an invocation first names it (TargetModel)
    multi_model: bool = False

    @property
    def compressed(self) -> bool:
        return self.model_data.endswith(".tar.gz")


@dataclass
class EndpointOptions:
    instance_type: str = DEFAULT_INSTANCE_TYPE
    initial_instance_count: int = 1
    variant_name: str = DEFAULT_VARIANT
    container_startup_health_check_timeout_s: int | None = 600
    model_data_download_timeout_s: int | None = 1200
    volume_size_gb: int | None = None
    inference_ami_version: str = AMI_AUTO  # a name of INFERENCE_AMI_VERSIONS, "auto" or "none"

    def resolved_inference_ami(self) -> str | None:
        return resolve_ami(self.inference_ami_version, self.instance_type, DEFAULT_INFERENCE_AMI)


@dataclass
class AsyncOptions:
    """Asynchronous inference: where results and failures land, and how much each instance takes on."""

    output_path: str
    failure_path: str
    max_concurrent_invocations_per_instance: int = 4
    success_topic_arn: str | None = None
    error_topic_arn: str | None = None


@dataclass
class AutoscalingOptions:
    """Scaling of the endpoint's variant.

    Async endpoints default to `min_capacity` 0: target tracking on ApproximateBacklogSizePerInstance
    scales in to zero, and a step-scaling policy fired by a CloudWatch alarm on
    HasBacklogWithoutCapacity brings the first instance back. Real-time endpoints track
    SageMakerVariantInvocationsPerInstance (invocations per instance per minute).
    """

    min_capacity: int | None = None  # None: 0 for async, 1 for real-time
    max_capacity: int = 2
    target_backlog_per_instance: float = 5.0
    target_invocations_per_instance: float = 60.0
    scale_in_cooldown_s: int = 600
    scale_out_cooldown_s: int = 300
    scale_from_zero_cooldown_s: int = 300
    alarm_period_s: int = 60
    alarm_evaluation_periods: int = 2


@dataclass
class DeploymentOptions:
    """One deployment: its endpoint is called `name`; every resource it creates carries the tag
    `whisper-triton:deployment=<name>`, which is what `cleanup` looks for."""

    name: str
    model: ModelOptions
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)
    async_inference: AsyncOptions | None = None
    autoscaling: AutoscalingOptions | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def is_async(self) -> bool:
        return self.async_inference is not None


@dataclass
class TransformOptions:
    """A batch transform job over every object under an S3 prefix of audio files.

    Uses `model_name` when given, else creates a model from `model` (tagged, removed by cleanup).
    """

    name: str
    input_prefix: str
    output_path: str
    model_name: str | None = None
    model: ModelOptions | None = None
    instance_type: str = DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    max_payload_mb: int = 100
    max_concurrent_transforms: int = 1
    content_type: str | None = None
    accept: str = "application/json"
    invocation_timeout_s: int = 600
    invocation_max_retries: int = 1  # ModelClientConfig.InvocationsMaxRetries (0-3): 5xx, timeouts
    tags: dict[str, str] = field(default_factory=dict)
    transform_ami_version: str = AMI_AUTO  # a name of TRANSFORM_AMI_VERSIONS, "auto" or "none"
    # S3Prefix: every object under input_prefix; ManifestFile: input_prefix is a JSON manifest
    # ([{"prefix": "s3://bucket/dir/"}, "relative/key", ...]) naming the objects (how a resumed bulk run
    # sends only what is left)
    input_data_type: str = "S3Prefix"

    def resolved_transform_ami(self) -> str | None:
        return resolve_ami(self.transform_ami_version, self.instance_type, DEFAULT_TRANSFORM_AMI)
