"""Triton's side of the registry: one engine model per loaded model, rendered into the repository
copy Triton runs from, and loaded / unloaded through Triton's model repository API (gRPC, loopback,
`--model-control-mode=explicit`).

Why one engine model per model, and not one model that swaps engines: Triton then owns each engine's
lifetime (its own stub process, freed whole on unload), batches each model's windows on its own
dynamic batcher, reports each one's statistics, and a load that fails leaves every other model as
it was. The engine model of model `<id>` is `whisper_window-<id>`, rendered from the default's
`whisper_window` (same `model.py`, its config with the name, `model_dir` and, for engines, the GPU
instance group changed), so it has the same inputs, outputs and rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..contract.models import ENGINE_MODEL, engine_model_name
from ..contract.tensors import WHISPER_WINDOW_SPEC
from ..errors import WhisperTritonError

logger = logging.getLogger(__name__)

UNLOAD_POLL_S = 0.1


def render_engine_model(repository: Path, model_id: str, model_dir: Path, engine: str) -> str:
    """Write `whisper_window-<id>/` into `repository` from its rendered `whisper_window/`; returns its name.

    The config is edited structurally (Triton's ModelConfig protobuf): name, `model_dir` (absolute),
    `engine`, and for TensorRT-LLM engines `device` cuda, one instance per GPU and `max_batch_size` never
    above the engines' build. Written to a temporary file and renamed, so Triton never reads half a file."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    name = engine_model_name(model_id)
    template = repository / ENGINE_MODEL
    config = text_format.Parse((template / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config.name = name
    config.parameters["model_dir"].string_value = str(model_dir)
    config.parameters["engine"].string_value = engine
    if engine == "tensorrtllm":
        from ..export.model_repo import tensorrtllm_facts

        facts = tensorrtllm_facts(model_dir)
        if facts.max_batch_size:
            config.max_batch_size = min(config.max_batch_size, facts.max_batch_size)
        config.parameters["device"].string_value = "cuda"
        del config.instance_group[:]
        group = config.instance_group.add()
        group.count, group.kind = 1, model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    target = repository / name
    target.mkdir(exist_ok=True)
    version = target / "1"
    if not version.exists():
        version.symlink_to((template / "1").resolve(), target_is_directory=True)
    text = f"# rendered by the model registry from {ENGINE_MODEL}/config.pbtxt for model {model_id}\n"
    fd, temporary = tempfile.mkstemp(dir=target, prefix=".config-", suffix=".pbtxt")
    with os.fdopen(fd, "w") as handle:
        handle.write(text + text_format.MessageToString(config))
    os.replace(temporary, target / "config.pbtxt")
    return name


def is_out_of_memory(message: str) -> bool:
    """Triton's SageMaker frontend reads these words in a load error as "no memory" (its 507)."""
    words = ("out of memory", "outofmemory", "memoryerror", "cuda_out_of_memory", "failed to allocate memory",
             "no space left on device", "cannot allocate memory")
    text = message.lower()
    return any(word in text for word in words)


class TritonControl:
    """Load, unload and ask one engine model, over Triton's gRPC API on loopback."""

    def __init__(self, url: str, load_timeout_s: float, headers: dict[str, str] | None = None):
        import tritonclient.grpc.aio as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.load_timeout_s = load_timeout_s
        # the key of Triton's restricted repository protocol (triton_server.RESTRICTED_PROTOCOLS)
        self.headers = dict(headers or {})

    async def load(self, name: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            await self.client.load_model(name, headers=self.headers, client_timeout=self.load_timeout_s)
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            logger.error("loading %s failed: %s", name, message)
            if is_out_of_memory(message):
                raise WhisperTritonError("There is not enough memory to load the model; unload another model or "
                                         "raise the instance size.", "model", 507, "insufficient_storage") from None
            raise WhisperTritonError("The model failed to load (its files may be incomplete or for another "
                                     "engine version); the server log has the cause.", "model", 500,
                                     "model_load_failed") from None

    async def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Unload and wait until Triton reports it gone (its stub ended, its memory freed)."""
        await self.client.unload_model(name, headers=self.headers, client_timeout=timeout_s)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if not await self._present(name):
                return
            await asyncio.sleep(UNLOAD_POLL_S)
        logger.warning("%s was still unloading after %.0f s", name, timeout_s)

    async def _present(self, name: str) -> bool:
        index = await self.client.get_model_repository_index(headers=self.headers, as_json=True)
        for model in index.get("models", []):
            if model.get("name") == name and model.get("state") in ("READY", "LOADING", "UNLOADING"):
                return True
        return False

    async def ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name))
        except Exception:  # noqa: BLE001 - any failure to answer means not ready
            return False

    async def capabilities(self, name: str) -> dict:
        """What the engine model declares (output CAPABILITIES alone never calls the engine)."""
        import json

        spec = WHISPER_WINDOW_SPEC
        wav = self._grpc.InferInput("WAV", [1, 1], spec.input("WAV").client_dtype)
        wav.set_data_from_numpy(np.zeros((1, 1), dtype=np.float32))
        result = await self.client.infer(name, [wav], outputs=[self._grpc.InferRequestedOutput("CAPABILITIES")],
                                         client_timeout=30)
        return json.loads(result.as_numpy("CAPABILITIES").reshape(-1)[0])

    async def close(self) -> None:
        await self.client.close()
