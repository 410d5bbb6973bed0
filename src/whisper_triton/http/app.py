"""The routes of `serve`'s HTTP side: the SageMaker contract (GET /ping, POST /invocations,
GET /execution-parameters, the WebSocket /invocations-bidirectional-stream), OpenAI's audio API under
/v1 (`openai_router`), live transcription over WebSocket (`realtime`) and the proxy's Prometheus
metrics (GET /metrics). Parsing lives in `parsing`, Triton in `triton_client`; a route
only wires them together and renders the answer.

POST /invocations streams (SageMaker `InvokeEndpointWithResponseStream`: chunked transfer, one JSON
line per chunk of segments as they are decoded) when the Accept header asks for
application/jsonlines (or application/x-ndjson), or the query / custom attributes say stream=true."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import WhisperTritonError
from ..pipeline.formats import FORMATS, render
from ..settings import Settings
from .admission import Admission, AdmissionCollector
from .client_limits import ClientLimits, ClosingStreamingResponse
from .guards import CLIENT_GONE, Guards, clipped_error
from . import multi_model
from .metrics import MetricsMiddleware, ProxyMetrics
from .openai_router import OPENAI_PREFIX, openai_error_response
from .openai_router import router as openai_router
from .parsing import STREAM_TYPES, choose_output_type, parse_invocation, stream_type
from .realtime import SessionAdmission
from .realtime import router as realtime_router
from .streaming import first_chunk, json_lines, until_disconnected
from .triton_client import TritonClient

logger = logging.getLogger(__name__)


def error_response(exc: WhisperTritonError, path: str = "") -> JSONResponse:
    """The error in the shape the route's clients parse: OpenAI's under /v1, ours elsewhere."""
    exc = clipped_error(exc)  # whatever client text a message quotes, the answer stays short
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        response = openai_error_response(exc)
        response.headers.update(exc.headers())
        return response
    return JSONResponse(status_code=exc.status, content=exc.to_dict(), headers=exc.headers())


def _record_error(request: Request, exc: WhisperTritonError) -> None:
    route = request.scope.get("state", {}).get("metrics_route", "unmatched")
    request.app.state.metrics.errors.labels(route, exc.type).inc()


def create_app(settings: Settings, triton_url: str | None = None, registry=None) -> FastAPI:
    """`registry`: the model registry `serve` built (several models); None: the default model only."""
    url = triton_url or f"127.0.0.1:{settings.triton_grpc_port}"

    admission = Admission(settings.max_requests_in_flight, settings.max_queued_audio_seconds, settings.retry_after_s,
                          prior_speed=settings.admission_prior_speed, deadline_s=settings.realtime_deadline_s,
                          live_max_share=settings.live_max_share,
                          refuse_too_long=settings.admission_refuse_too_long)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonClient(url, settings.request_timeout_s, admission)
        app.state.registry = registry or multi_model.standalone_registry(settings)
        if registry is not None:  # serve's: its manifest and the default's capabilities, before requests
            await registry.start()
        app.state.live_lock = asyncio.Lock()
        try:
            yield
        finally:
            if app.state.live is not None:
                app.state.live.close()
            for service in app.state.live_models.values():
                service.close()
            await app.state.registry.close()
            await app.state.triton.close()

    app = FastAPI(title="whisper-triton", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = ProxyMetrics()
    app.state.metrics.registry.register(AdmissionCollector(admission))  # whisper_admission_* on /metrics
    app.state.admission = admission
    app.state.triton_url = url
    app.state.live = None  # the live transcription service, set up by the first session (http/realtime.py)
    app.state.live_models = {}  # one per other model a session names (?model=), set up by its first session
    app.state.session_admission = SessionAdmission(admission, settings.live_max_sessions)
    # inside Guards: a body that stops arriving is a 408, a reader that stops reading ends its stream
    app.add_middleware(ClientLimits, body_timeout_s=settings.client_body_timeout_s,
                       idle_timeout_s=settings.client_idle_timeout_s, send_timeout_s=settings.stream_send_timeout_s)
    app.add_middleware(Guards, settings=settings, admission=admission)  # request id, API key, load, disconnects

    @app.exception_handler(WhisperTritonError)
    async def _handle_known(request: Request, exc: WhisperTritonError):
        _record_error(request, exc)
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _handle_http(request: Request, exc: StarletteHTTPException):
        error = WhisperTritonError(str(exc.detail), None, exc.status_code, "http_error")
        _record_error(request, error)
        return error_response(error, request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def _handle_gone(request: Request, exc: ClientDisconnect):
        # the client left while its body was being read: not a server fault, one line, no traceback
        request.scope.setdefault("state", {})[CLIENT_GONE] = True
        logger.info("client disconnected while sending its body: %s %s dropped", request.method, request.url.path)
        return Response(status_code=400)  # never sent: nobody is left to read it

    @app.exception_handler(Exception)
    async def _handle_unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        error = WhisperTritonError("Internal error; retry, and check the server log if it persists.",
                                   None, 500, "internal_error")
        _record_error(request, error)
        return error_response(error, request.url.path)

    @app.get("/metrics")
    async def metrics(request: Request):
        payload, content_type = request.app.state.metrics.exposition()
        return Response(payload, media_type=content_type)

    @app.get("/ping")
    async def ping(request: Request):
        if await request.app.state.triton.ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/execution-parameters")
    async def execution_parameters():
        # batch transform asks this once at start; it caps what it sends with these values
        return JSONResponse({
            "MaxConcurrentTransforms": settings.max_concurrent_transforms,
            "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": max(1, settings.body_limit() // (1024 * 1024)),
        })

    async def invoke(request: Request, model_name: str | None = None):
        """/invocations, for the model the request names (SageMaker's multi-model invoke: `model_name`)."""
        started = time.perf_counter()
        streamed_type = stream_type(request.headers.get("accept"))
        output_type = None if streamed_type else choose_output_type(request.headers.get("accept"))
        invocation = await parse_invocation(request, settings)
        if output_type is not None and FORMATS[output_type] == "rttm" and not invocation.options.diarize:
            raise WhisperTritonError("RTTM lists who spoke when: add diarize=true to ask for speakers.", "Accept", 406,
                                     "not_acceptable")
        state = request.app.state
        model = model_name or multi_model.requested_model(request, invocation.options)
        if streamed_type or invocation.stream:
            chunks = await first_chunk(multi_model.transcribe_stream(request, model, invocation.audio,
                                                                     invocation.options, invocation.references))
            lines = json_lines(
                until_disconnected(request, chunks),
                on_first_segment=lambda: state.metrics.first_segment.labels("/invocations").observe(
                    time.perf_counter() - started),
                on_done=lambda chunk: state.metrics.record("/invocations", chunk))
            return ClosingStreamingResponse(lines, media_type=streamed_type or STREAM_TYPES[0])
        result = await multi_model.transcribe(request, model, invocation.audio, invocation.options,
                                              invocation.references)
        state.metrics.record("/invocations", result)
        if output_type == "application/json":
            return JSONResponse(result)
        return Response(render(result, FORMATS[output_type]), media_type=output_type)

    @app.post("/invocations")
    async def invocations(request: Request):
        return await invoke(request)

    @app.post("/models/{model_name}/invoke")
    async def invoke_model(model_name: str, request: Request):
        await multi_model.check_loaded(request, model_name)
        return await invoke(request, model_name)

    app.include_router(openai_router)
    app.include_router(realtime_router)
    app.include_router(multi_model.router)
    routes = {route.path for route in (*app.routes, *openai_router.routes, *multi_model.router.routes)
              if hasattr(route, "path")}
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=routes)
    return app
