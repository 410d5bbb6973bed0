"""SageMaker's side of a multi-model endpoint, for the local runtime emulator: what the service does
when `invoke_endpoint(TargetModel=...)` reaches an endpoint whose model has `Mode: MultiModel`.

As the AWS documentation describes it ("Invoke a Multi-Model Endpoint", "Custom Containers Contract
for Multi-Model Endpoints"): the target is a path relative to the model's `ModelDataUrl` prefix (a
`.tar.gz` there); the first call for it downloads and unpacks it on the instance, tells the container
`POST /models {"model_name", "url"}` with an opaque `model_name` of the service's choosing, then calls
`POST /models/{model_name}/invoke` with the original target in `X-Amzn-SageMaker-Target-Model`; a 507
from the load makes the service unload the model it used least recently (`DELETE /models/{name}`)
and try again. A target that is not in S3 is a 400 ValidationError, and so is a TargetModel sent to
an endpoint that is not multi-model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..deploy.aws import AwsClients, parse_s3_uri

logger = logging.getLogger(__name__)

H_TARGET_MODEL = "X-Amzn-SageMaker-Target-Model"
MAX_EVICTIONS = 8  # 507 -> unload one -> try again, at most this often per load


class MultiModelError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Endpoint:
    loaded: dict[str, str] = field(default_factory=dict)  # target model -> container model_name
    used: dict[str, float] = field(default_factory=dict)  # container model_name -> last use
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class MultiModelHost:
    """Per endpoint: which targets the container has loaded, and loading the ones it has not."""

    def __init__(self, aws: AwsClients, models_dir: Path):
        self.aws = aws
        self.models_dir = models_dir
        self._endpoints: dict[str, _Endpoint] = {}

    async def model_data(self, endpoint: dict, variant: str) -> str | None:
        """The S3 prefix of the variant's model when it is multi-model, else None."""
        config = await asyncio.to_thread(self.aws.sagemaker.describe_endpoint_config,
                                         EndpointConfigName=endpoint["EndpointConfigName"])
        variants = {v["VariantName"]: v for v in config.get("ProductionVariants", [])}
        model_name = (variants.get(variant) or next(iter(variants.values()), {})).get("ModelName")
        if not model_name:
            return None
        model = await asyncio.to_thread(self.aws.sagemaker.describe_model, ModelName=model_name)
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        if container.get("Mode") != "MultiModel":
            return None
        return container.get("ModelDataUrl")

    async def prepare(self, http: httpx.AsyncClient, container_url: str, endpoint: dict, variant: str,
                      target: str) -> str:
        """The container's model_name for `target`, downloading and loading it first if need be."""
        prefix = await self.model_data(endpoint, variant)
        if prefix is None:
            raise MultiModelError(400, "ValidationError", f"Endpoint {endpoint['EndpointName']} is not a multi-model "
                                  "endpoint: TargetModel is only for endpoints whose model has Mode MultiModel.")
        if target.startswith("/") or ".." in target.split("/"):
            raise MultiModelError(400, "ValidationError", f"TargetModel {target!r} is not a relative path.")
        state = self._endpoints.setdefault(endpoint["EndpointName"], _Endpoint())
        async with state.lock:
            name = state.loaded.get(target)
            if name is None:
                name = await self._load(http, container_url, state, prefix, target)
                state.loaded[target] = name
            state.used[name] = time.monotonic()
            return name

    async def _load(self, http: httpx.AsyncClient, container_url: str, state: _Endpoint, prefix: str,
                    target: str) -> str:
        name = hashlib.sha256(f"{prefix}|{target}".encode()).hexdigest()[:32]
        directory = self.models_dir / name / "model"
        await asyncio.to_thread(self._download, prefix, target, directory)
        for _ in range(MAX_EVICTIONS + 1):
            reply = await http.post(f"{container_url}/models", json={"model_name": name, "url": str(directory)},
                                    headers={H_TARGET_MODEL: target}, timeout=360.0)
            if reply.status_code in (200, 409):  # 409: the container had it already
                logger.info("loaded %s as %s", target, name)
                return name
            if reply.status_code != 507 or not state.used:
                raise MultiModelError(424, "ModelError", f"Received client error ({reply.status_code}) from primary "
                                      f"with message \"{reply.text}\" while loading model {target}.")
            victim = min(state.used, key=state.used.get)  # the service unloads its least recently used model
            await http.delete(f"{container_url}/models/{victim}", timeout=360.0)
            state.used.pop(victim, None)
            for key, value in list(state.loaded.items()):
                if value == victim:
                    del state.loaded[key]
        raise MultiModelError(424, "ModelError", f"Model {target} did not fit after unloading the others.")

    def _download(self, prefix: str, target: str, directory: Path) -> None:
        if directory.is_dir():
            return
        bucket, key = parse_s3_uri(prefix.rstrip("/") + "/" + target)
        staging = directory.parent / ".download"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        archive = staging / "model.tar.gz"
        try:
            self.aws.s3.download_file(bucket, key, str(archive))
        except Exception as exc:  # noqa: BLE001 - the service answers a missing model as a validation error
            shutil.rmtree(staging, ignore_errors=True)
            raise MultiModelError(400, "ValidationError", f"Failed to download model data (bucket: {bucket}, key: "
                                  f"{key}). Check that the TargetModel exists under the model's S3 prefix.") from exc
        with tarfile.open(archive) as tar:
            tar.extractall(staging / "model", filter="data")  # no absolute paths, no links out, no devices
        (staging / "model").rename(directory)
        shutil.rmtree(staging, ignore_errors=True)
