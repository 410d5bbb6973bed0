"""boto3 clients for the deployer. Endpoints and credentials come from boto3's own configuration
(AWS_ENDPOINT_URL, AWS_PROFILE, ...), so the same code runs against AWS and against moto on loopback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config


@dataclass
class AwsClients:
    session: Any = None  # a boto3.Session; None: the default session
    region_name: str | None = None
    max_attempts: int = 5
    # every service at one URL (a local moto server) whatever boto3's configuration says; None: boto3's
    # own configuration (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE>, or AWS itself)
    endpoint_url: str | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def client(self, service: str) -> Any:
        if service not in self._cache:
            session = self.session or boto3.session.Session(region_name=self.region_name)
            config = Config(retries={"total_max_attempts": self.max_attempts, "mode": "standard"})
            self._cache[service] = session.client(service, config=config, endpoint_url=self.endpoint_url)
        return self._cache[service]

    @property
    def sagemaker(self) -> Any:
        return self.client("sagemaker")

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def autoscaling(self) -> Any:
        return self.client("application-autoscaling")

    @property
    def cloudwatch(self) -> Any:
        return self.client("cloudwatch")

    @property
    def logs(self) -> Any:
        return self.client("logs")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'key/prefix') of an s3:// URI; ValueError for anything else."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, key
