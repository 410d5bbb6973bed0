"""What a deployment is made of, as plain dataclasses the CLI fills from its flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TAG_KEY = "whisper-triton:deployment"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
DEFAULT_VARIANT = "AllTraffic"
# the AWS pattern for SageMaker resource names, less room for the suffix we add to models and configs
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,53}$")


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
    tags: dict[str, str] = field(default_factory=dict)
