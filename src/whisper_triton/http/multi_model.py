"""Several models on one endpoint, as the HTTP side sees them: which model a request names, holding
it while Triton answers, and SageMaker's multi-model container contract.

A request names its model by OpenAI's `model`, the `model` option of /invocations (query, JSON body,
custom attributes) or SageMaker's `X-Amzn-SageMaker-Target-Model` header; none: the default. The
registry (`registry/`) resolves ids and aliases (unknown: 404 naming `model`), loads the model when
it is not loaded, and holds it for the request (never unloaded mid-request); the `model` option that
reaches Triton's `transcribe` is the resolved id (none for the default).

The multi-model contract (AWS "Custom Containers Contract for Multi-Model Endpoints"; the container
keeps track of models by SageMaker's opaque `model_name`, the TargetModel arriving only as a header
for logs), routes thin as the others:
- `POST /models` `{"model_name", "url"}`: load the model in the directory `url` (under
  WHISPER_TRITON_MODEL_LOAD_ROOTS); 409 if that name is loaded, 507 when it cannot fit in memory;
- `GET /models` (`next_page_token`, `page_size`): `{"models": [{"modelName", "modelUrl"}], "nextPageToken"}`;
- `GET /models/{model_name}`: `{"modelName", "modelUrl"}`, 404 if not loaded;
- `DELETE /models/{model_name}`: unload it (after its requests finish), 404 if not loaded;
- `POST /models/{model_name}/invoke`: `/invocations` for that model, 404 if it is not loaded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..contract.json_limits import load_object
from ..contract.options import TranscribeOptions
from ..errors import WhisperTritonError, invalid_parameter
from ..registry import ModelRegistry, RegistryConfig

logger = logging.getLogger(__name__)

TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"
MAX_TARGET_MODEL_CHARS = 1024  # SageMaker's own limit on TargetModel
DEFAULT_PAGE_SIZE = 100
MAX_LOAD_BODY_BYTES = 64 * 1024

router = APIRouter()


# ---- the registry of this app ---------------------------------------------------------------------
def standalone_registry(settings) -> ModelRegistry:
    """The registry of an app that `serve` did not give one (tests, tools): the default model only."""
    aliases = tuple(a.strip() for a in settings.model_aliases.split(",") if a.strip())
    return ModelRegistry(RegistryConfig(default_id=settings.served_model_name, default_aliases=aliases,
                                        retry_after_s=settings.retry_after_s, load_roots=()))


async def registry_of(request: Request) -> ModelRegistry:
    """The app's registry, started on first use (the default's id may need Triton's word)."""
    state = request.app.state
    registry: ModelRegistry = state.registry
    if not registry._started:
        triton_model_dir = None
        if not registry.default_id and not registry.config.default_model_dir:
            triton_model_dir = await state.triton.engine_model_dir()
        await registry.start(triton_model_dir)
    return registry


def target_model(request: Request) -> str | None:
    value = request.headers.get(TARGET_MODEL_HEADER)
    if value is not None and len(value) > MAX_TARGET_MODEL_CHARS:
        raise invalid_parameter("model", f"{TARGET_MODEL_HEADER} is over {MAX_TARGET_MODEL_CHARS} characters.")
    return value.strip() if value and value.strip() else None


def requested_model(request: Request, options: TranscribeOptions) -> str | None:
    """The model a request names: the `model` option, else SageMaker's TargetModel header."""
    return options.model or target_model(request)


# ---- holding a model while Triton answers ---------------------------------------------------------
async def transcribe(request: Request, name: str | None, audio: bytes, options: TranscribeOptions,
                     references: list[bytes] | None = None) -> dict:
    registry = await registry_of(request)
    async with registry.lease(name) as lease:
        options.model = lease.option
        return await request.app.state.triton.transcribe(audio, options, references)


async def transcribe_stream(request: Request, name: str | None, audio: bytes, options: TranscribeOptions,
                            references: list[bytes] | None = None) -> AsyncIterator[dict]:
    """The stream's chunks with the model held until the last one (or until the client leaves:
    closing the generator releases it). The lease is taken at the first chunk, so a model that is
    unknown or still loading is refused before the answer starts."""
    registry = await registry_of(request)
    async with registry.lease(name) as lease:
        options.model = lease.option
        chunks = request.app.state.triton.transcribe_stream(audio, options, references)
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # at once, not when the collector gets to it: closing it cancels the gRPC stream
            await chunks.aclose()


@contextlib.asynccontextmanager
async def session_model(connection) -> AsyncIterator:
    """A live session's model (`?model=` on the WebSocket URL; none: the default), held while it runs."""
    registry = await registry_of(connection)
    async with registry.lease(connection.query_params.get("model")) as lease:
        yield lease


# ---- SageMaker's multi-model contract -------------------------------------------------------------
def _entry(record) -> dict:
    return {"modelName": record.id, "modelUrl": record.url}


@router.post("/models")
async def load_model(request: Request):
    from .parsing import read_body

    body = await read_body(request, MAX_LOAD_BODY_BYTES)
    payload = load_object(body, "body")
    name, url = payload.get("model_name"), payload.get("url")
    if not isinstance(name, str) or not name:
        raise invalid_parameter("model_name", 'The body needs "model_name": the name to track the model by.')
    if not isinstance(url, str) or not url:
        raise invalid_parameter("url", 'The body needs "url": the directory of the model\'s files.')
    registry = await registry_of(request)
    target = target_model(request) or ""
    logger.info("loading SageMaker model %s (TargetModel %s)", name, target or "-")
    await registry.register_sagemaker(name, url, target)
    return JSONResponse({"modelName": name, "modelUrl": url})


@router.get("/models")
async def list_models(request: Request):
    registry = await registry_of(request)
    token = request.query_params.get("next_page_token") or "0"
    size = request.query_params.get("page_size") or str(DEFAULT_PAGE_SIZE)
    if not token.isdigit():
        raise invalid_parameter("next_page_token", "next_page_token is not one this server gave.")
    if not size.isdigit() or not 1 <= int(size) <= 1000:
        raise invalid_parameter("page_size", "page_size must be between 1 and 1000.")
    models = sorted(registry.sagemaker_models(), key=lambda record: record.id)
    start, end = int(token), int(token) + int(size)
    body: dict = {"models": [_entry(record) for record in models[start:end]]}
    if end < len(models):
        body["nextPageToken"] = str(end)
    return JSONResponse(body)


@router.get("/models/{model_name}")
async def get_model(model_name: str, request: Request):
    registry = await registry_of(request)
    return JSONResponse(_entry(registry.sagemaker_model(model_name)))


@router.delete("/models/{model_name}")
async def unload_model(model_name: str, request: Request):
    registry = await registry_of(request)
    logger.info("unloading SageMaker model %s (TargetModel %s)", model_name, target_model(request) or "-")
    await registry.unregister(model_name)
    return JSONResponse({"modelName": model_name})


async def check_loaded(request: Request, model_name: str) -> None:
    """404 unless SageMaker loaded `model_name` (POST /models/{model_name}/invoke)."""
    registry = await registry_of(request)
    try:
        registry.sagemaker_model(model_name)
    except WhisperTritonError:
        raise WhisperTritonError(f"The model {model_name!r} is not loaded (POST /models loads it).", "model",
                                 404, "model_not_found") from None
