"""The routes of `serve`'s HTTP side: the SageMaker contract (GET /ping, POST /invocations,
GET /execution-parameters). Parsing lives in `parsing`, Triton in `triton_client`; a route only
wires them together and renders the answer."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import WhisperTritonError
from ..formats import FORMATS, render
from ..settings import Settings
from .guards import Admission, Guards
from .parsing import choose_output_type, parse_invocation
from .triton_client import TritonClient

logger = logging.getLogger(__name__)


def error_response(exc: WhisperTritonError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.to_dict(), headers=exc.headers())


def create_app(settings: Settings, triton_url: str | None = None) -> FastAPI:
    url = triton_url or f"127.0.0.1:{settings.triton_grpc_port}"

    admission = Admission(settings.max_requests_in_flight, settings.max_queued_audio_seconds, settings.retry_after_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonClient(url, settings.request_timeout_s, admission)
        try:
            yield
        finally:
            await app.state.triton.close()

    app = FastAPI(title="whisper-triton", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.admission = admission
    app.add_middleware(Guards, settings=settings, admission=admission)  # request id, API key, load, disconnects

    @app.exception_handler(WhisperTritonError)
    async def _handle_known(request: Request, exc: WhisperTritonError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _handle_http(request: Request, exc: StarletteHTTPException):
        return error_response(WhisperTritonError(str(exc.detail), None, exc.status_code, "http_error"))

    @app.exception_handler(Exception)
    async def _handle_unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(WhisperTritonError("Internal error; retry, and check the server log if it persists.",
                                                 None, 500, "internal_error"))

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

    @app.post("/invocations")
    async def invocations(request: Request):
        output_type = choose_output_type(request.headers.get("accept"))
        invocation = await parse_invocation(request, settings)
        result = await request.app.state.triton.transcribe(invocation.audio, invocation.options)
        if output_type == "application/json":
            return JSONResponse(result)
        return Response(render(result, FORMATS[output_type]), media_type=output_type)

    return app
