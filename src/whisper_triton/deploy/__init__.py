"""Deploy whisper-triton to SageMaker with plain boto3: library (`Deployer`) and CLI (`whisper-deploy`).
May import `contract/`, `errors`, `settings`."""

from .aws import AwsClients
from .deployer import Deployer, DeploymentResult, Resource
from .errors import DeployError
from .options import (
    TAG_KEY,
    AsyncOptions,
    AutoscalingOptions,
    DeploymentOptions,
    EndpointOptions,
    ModelOptions,
    TransformOptions,
)

__all__ = [
    "TAG_KEY",
    "AsyncOptions",
    "AutoscalingOptions",
    "AwsClients",
    "DeployError",
    "Deployer",
    "DeploymentOptions",
    "DeploymentResult",
    "EndpointOptions",
    "ModelOptions",
    "Resource",
    "TransformOptions",
]
