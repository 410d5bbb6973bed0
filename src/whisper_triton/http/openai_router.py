"""The routes of OpenAI's audio API, on the proxy's port: GET /v1/models, GET /v1/models/{id},
POST /v1/audio/transcriptions, POST /v1/audio/translations. Thin: the form and the bodies are
`openai_serving`'s, the shapes `openai_protocol`'s; errors under /v1 take OpenAI's error shape
(`openai_protocol.error_body`, chosen by path in `app`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import WhisperTritonError
from . import multi_model
from . import openai_serving as serving
from .client_limits import ClosingStreamingResponse
from .openai_protocol import MEDIA_TYPES, error_body
from .streaming import first_chunk, until_disconnected

OPENAI_PREFIX = "/v1"
router = APIRouter(prefix=OPENAI_PREFIX)


def openai_error_response(exc: WhisperTritonError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=error_body(exc).model_dump())


async def models_of(request: Request) -> serving.ModelList:
    registry = await multi_model.registry_of(request)
    state = request.app.state
    if getattr(state, "models_created", None) is None:
        state.models_created = int(time.time())
    return serving.model_list(registry, state.models_created)


@router.get("/models")
async def list_models(request: Request):
    return JSONResponse((await models_of(request)).model_dump(exclude_none=True))


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request):
    (await multi_model.registry_of(request)).resolve(model_id)
    return JSONResponse(next(card for card in (await models_of(request)).data
                             if card.id == model_id).model_dump(exclude_none=True))


@router.post("/audio/transcriptions")
async def transcriptions(request: Request):
    return await _audio(request, "transcribe")


@router.post("/audio/translations")
async def translations(request: Request):
    return await _audio(request, "translate")


async def _audio(request: Request, task: str) -> Response:
    state = request.app.state
    started = time.perf_counter()
    route = request.url.path
    form = await serving.read_form(request, state.settings.body_limit())
    theirs, ours = serving.openai_fields(form.fields)
    audio_request, references = serving.audio_request(theirs, task)
    options = serving.transcribe_options(audio_request, ours, task)
    try:
        if audio_request.stream:
            chunks = await first_chunk(multi_model.transcribe_stream(request, audio_request.model, form.audio, options,
                                                                     references))
            events = serving.text_events(
                until_disconnected(request, chunks),
                on_first_segment=lambda: state.metrics.first_segment.labels(route).observe(time.perf_counter() - started),
                on_done=lambda chunk: state.metrics.record(route, chunk),
                diarized_segments=audio_request.response_format == "diarized_json")
            return ClosingStreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await multi_model.transcribe(request, audio_request.model, form.audio, options, references)
    except WhisperTritonError as exc:
        if task == "translate" and exc.param == "task":  # the endpoint chose the task: name the model
            exc.param = "model"
        raise
    state.metrics.record(route, result)
    content, fmt = serving.body(result, audio_request, task)
    if isinstance(content, dict):
        return JSONResponse(content)
    return Response(content, media_type=MEDIA_TYPES[fmt])
