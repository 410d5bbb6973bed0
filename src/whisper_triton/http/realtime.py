"""Live transcription over WebSocket: OpenAI's Realtime transcription protocol on
`GET /v1/realtime?intent=transcription`, and the same protocol on SageMaker's
`/invocations-bidirectional-stream` (InvokeEndpointWithBidirectionalStream: SageMaker connects
the caller's stream to this WebSocket; its payload parts arrive as text or binary frames, each one
JSON event here). Thin: events are parsed by `contract/realtime.py`, the session is `live/`'s,
its windows reach `whisper_window` over gRPC (`window_client.py`).

Around a session:
- the API key (`WHISPER_TRITON_API_KEY`): the WebSocket handshake carries it as any request does
  (`Authorization: Bearer`, as the openai SDK sends it, or `x-api-key`); without it the handshake
  is refused with 403 before any session exists;
- admission: a session holds one of `max_requests_in_flight`, one of `live_max_sessions` and one
  second of audio per second of the server's measured speed (http/admission.py); when any is full
  the connection is accepted, answered with an `error` event (code `server_busy`) and closed with 1013 (try again later) and the reason;
- limits: an event larger than 16 MiB, a client silent for `live_idle_timeout_s`, a session longer
  than `live_max_session_s`: an `error` event, then a close with its code (1009, 1000, 1008); a bad
  event is answered with an `error` event and the session goes on;
- the server accepts at once (SageMaker wants the connection accepted within 250 ms; the decoder is
  set up after the accept) and uvicorn answers WebSocket pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..contract.realtime import MAX_EVENT_BYTES, EventError, as_json, parse_client_event, server_error
from ..errors import OverloadedError, WhisperTritonError
from ..live.decoding import UtteranceDecoder
from ..live.session import LiveLimits, LiveObserver, LiveSession
from ..pipeline.longform import LongFormTranscriber
from ..pipeline.tokenizer import WhisperTokenizer
from ..settings import Settings
from . import multi_model
from .admission import Admission
from .guards import key_matches, presented_key
from .metrics import ProxyMetrics
from .window_client import GrpcWindowDecoder

logger = logging.getLogger(__name__)

router = APIRouter()
REALTIME_PATH = "/v1/realtime"
BIDIRECTIONAL_PATH = "/invocations-bidirectional-stream"
OUTGOING_EVENTS = 1024  # events queued for a client that reads slowly; beyond it the session waits
DRAIN_S = 10.0  # after the client's last event, how long its finals under way may still be sent

CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_ERROR, CLOSE_TRY_LATER = 1000, 1008, 1009, 1011, 1013


class SessionAdmission:
    """Whether one more live session can be served: `can_admit_session(realtime_factor)` is the whole
    interface the routes use (`realtime_factor`: audio seconds a session sends per second, 1.0 live).

    A session holds one request slot of `guards.Admission`, one of `live_max_sessions`, and its
    `realtime_factor` of the server's measured speed (`Admission.session_reason`: all sessions together
    take at most `live_max_share` of it, the rest is left to files, admitted by their deadlines)."""

    def __init__(self, admission: Admission, max_sessions: int):
        self.admission = admission
        self.max_sessions = max_sessions
        self.sessions = 0

    def can_admit_session(self, realtime_factor: float = 1.0, model: str | None = None) -> str | None:
        """None when a session can start now, else why not (the close reason)."""
        if self.sessions >= self.max_sessions:
            return f"{self.sessions} live sessions are open, the limit is {self.max_sessions}"
        if self.admission.requests >= self.admission.max_requests:
            return f"{self.admission.requests} requests in flight, the limit is {self.admission.max_requests}"
        return self.admission.session_reason(realtime_factor, model)

    @contextmanager
    def session(self, realtime_factor: float = 1.0, model: str | None = None) -> Iterator[None]:
        reason = self.can_admit_session(realtime_factor, model)
        if reason is not None:
            raise self.admission.overloaded(reason, reason="live")
        self.admission.enter()
        self.sessions += 1
        try:
            with self.admission.live_session(realtime_factor, model):
                yield
        finally:
            self.sessions -= 1
            self.admission.leave()


class _Observer(LiveObserver):
    def __init__(self, metrics: ProxyMetrics, route: str):
        self.metrics, self.route = metrics, route

    def utterance(self, latency_s: float | None, audio_s: float, failed: bool) -> None:
        self.metrics.live_utterances.labels("failed" if failed else "completed").inc()
        self.metrics.audio_seconds.labels(self.route).inc(audio_s)
        if latency_s is not None:
            self.metrics.live_final.observe(max(0.0, latency_s))

    def first_delta(self, latency_s: float) -> None:
        self.metrics.live_first_delta.observe(max(0.0, latency_s))


class LiveService:
    """What every session of one app shares: the decoder over gRPC, the decode threads, the limits."""

    def __init__(self, decoder: UtteranceDecoder, window: GrpcWindowDecoder, settings: Settings):
        self.decoder = decoder
        self.window = window
        self.executor = ThreadPoolExecutor(max_workers=max(4, 3 * settings.live_max_sessions),
                                           thread_name_prefix="live-decode")
        self.limits = LiveLimits(partial_interval_s=settings.live_partial_interval_s)

    @classmethod
    async def create(cls, settings: Settings, triton, url: str, lease=None) -> "LiveService":
        """`lease`: another model of the endpoint (registry), decoded by its own engine model."""
        if lease is not None and lease.option is not None:
            model_dir, engine_model = lease.model_dir, lease.triton_name
        else:
            model_dir = await asyncio.to_thread(_model_dir, settings, await triton.engine_model_dir())
            engine_model = None
        tokenizer = await asyncio.to_thread(WhisperTokenizer.from_model_dir, model_dir)
        window = GrpcWindowDecoder(url, timeout_s=min(settings.request_timeout_s, 300.0),
                                   **({"model_name": engine_model} if engine_model else {}))
        await asyncio.to_thread(lambda: window.capabilities)  # asked once, before the first utterance
        return cls(UtteranceDecoder(LongFormTranscriber(window, tokenizer), window.urgency), window, settings)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.window.close()


def _model_dir(settings: Settings, engine_dir: str) -> Path:
    """The served model's directory (its tokenizer): whisper_window's, relative ones against the repository."""
    if not engine_dir:
        return settings.resolved_model_dir()
    path = Path(engine_dir)
    if path.is_absolute():
        return path
    repository = Path(settings.model_repository) if settings.model_repository else Path.cwd()
    return (repository / path).resolve()


async def live_service(app, lease=None) -> LiveService:
    state = app.state
    async with state.live_lock:
        if lease is not None and lease.option is not None:  # another model (?model=): a service of its own
            key = (lease.triton_name, str(lease.model_dir))
            if key not in state.live_models:
                state.live_models[key] = await LiveService.create(state.settings, state.triton, state.triton_url, lease)
            return state.live_models[key]
        if state.live is None:
            state.live = await LiveService.create(state.settings, state.triton, state.triton_url)
        return state.live


@router.websocket(REALTIME_PATH)
async def realtime(websocket: WebSocket) -> None:
    if not await _authorized(websocket):
        return
    intent = websocket.query_params.get("intent")
    if intent != "transcription":
        await websocket.accept()
        await _refuse(websocket, "invalid_request_error", "unsupported_intent",
                      f"This server serves transcription sessions only: connect with ?intent=transcription "
                      f"(got intent={intent!r}).", CLOSE_POLICY)
        return
    await serve_session(websocket, REALTIME_PATH)


@router.websocket(BIDIRECTIONAL_PATH)
async def bidirectional(websocket: WebSocket) -> None:
    if not await _authorized(websocket):
        return
    await serve_session(websocket, BIDIRECTIONAL_PATH)


async def _authorized(websocket: WebSocket) -> bool:
    key = websocket.app.state.settings.api_key.get_secret_value()
    if not key or key_matches(presented_key(websocket.scope), key):
        return True
    websocket.app.state.metrics.live_sessions_total.labels(websocket.scope.get("path", ""), "refused_key").inc()
    logger.warning("live session refused: no valid API key")
    await websocket.close(code=CLOSE_POLICY, reason="A valid API key is required")  # before accept: HTTP 403
    return False


async def _refuse(websocket: WebSocket, type_: str, code: str, message: str, close_code: int) -> None:
    try:
        await websocket.send_text(as_json(server_error(message, code, type_)))
        await websocket.close(code=close_code, reason=message[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass


async def serve_session(websocket: WebSocket, route: str) -> None:
    app = websocket.app
    metrics: ProxyMetrics = app.state.metrics
    await websocket.accept()
    try:
        with app.state.session_admission.session(1.0):  # judged at the default model's speed
            metrics.live_sessions.labels(route).inc()
            try:
                outcome = await _run(websocket, route)
            finally:
                metrics.live_sessions.labels(route).dec()
    except OverloadedError as exc:
        logger.warning("live session refused: %s", exc.message)
        metrics.live_sessions_total.labels(route, "refused_capacity").inc()
        await _refuse(websocket, "server_error", "server_busy", exc.message, CLOSE_TRY_LATER)
        return
    metrics.live_sessions_total.labels(route, outcome).inc()


async def _run(websocket: WebSocket, route: str) -> str:
    app = websocket.app
    settings: Settings = app.state.settings
    held = contextlib.AsyncExitStack()  # the model the session names (?model=), held until the session ends
    try:
        service = await live_service(app, await held.enter_async_context(multi_model.session_model(websocket)))
    except WhisperTritonError as exc:  # an unknown model (404), or one still loading (503)
        await held.aclose()
        await _refuse(websocket, "invalid_request_error", exc.type, exc.message, CLOSE_POLICY)
        return "refused_model"
    except Exception:  # noqa: BLE001 - Triton not ready, model without tokenizer: tell the client, log the cause
        await held.aclose()
        logger.exception("live transcription could not start")
        await _refuse(websocket, "server_error", "service_unavailable",
                      "Live transcription is not available right now; retry shortly.", CLOSE_TRY_LATER)
        return "unavailable"
    outgoing: asyncio.Queue = asyncio.Queue(maxsize=OUTGOING_EVENTS)
    session = LiveSession(service.decoder, outgoing.put, service.executor, service.limits,
                          _Observer(app.state.metrics, route))
    writer = asyncio.ensure_future(_write(websocket, outgoing))
    started = time.monotonic()
    outcome = "closed"
    try:
        await session.start()
        while True:
            left = settings.live_max_session_s - (time.monotonic() - started)
            if left <= 0:
                await _end(websocket, outgoing, writer, "session_expired",
                           f"The session reached its limit of {settings.live_max_session_s:.0f} s; open a new one.",
                           CLOSE_POLICY, session)
                return "too_long"
            try:
                message = await asyncio.wait_for(websocket.receive(), timeout=min(left, settings.live_idle_timeout_s))
            except asyncio.TimeoutError:
                if time.monotonic() - started >= settings.live_max_session_s:
                    continue
                await _end(websocket, outgoing, writer, "idle_timeout",
                           f"No event for {settings.live_idle_timeout_s:.0f} s: the session is closed.",
                           CLOSE_NORMAL, session)
                return "idle"
            if message["type"] == "websocket.disconnect":
                return "closed"
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if len(data) > MAX_EVENT_BYTES:
                await _end(websocket, outgoing, writer, "event_too_large",
                           f"An event of {len(data)} bytes is over the limit of {MAX_EVENT_BYTES} bytes.",
                           CLOSE_TOO_BIG, session)
                return "too_large"
            try:
                await session.handle(parse_client_event(data))
            except EventError as exc:
                await outgoing.put(exc.event())
    except WebSocketDisconnect:
        return outcome
    except Exception:  # noqa: BLE001 - one session's failure is logged and closed, never the server's
        logger.exception("live session failed")
        await _end(websocket, outgoing, writer, "server_error", "The session failed; open a new one.",
                   CLOSE_ERROR, session, type_="server_error")
        return "failed"
    finally:
        await session.close()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await held.aclose()


async def _write(websocket: WebSocket, outgoing: asyncio.Queue) -> None:
    while True:
        event = await outgoing.get()
        if websocket.application_state != WebSocketState.CONNECTED:
            return
        try:
            await websocket.send_text(as_json(event))
        except (WebSocketDisconnect, RuntimeError):
            return


async def _end(websocket: WebSocket, outgoing: asyncio.Queue, writer: asyncio.Future, code: str, message: str,
               close_code: int, session: LiveSession, type_: str = "invalid_request_error") -> None:
    """Send the finals under way (bounded), then an error event saying why, then close."""
    await session.drain(DRAIN_S)
    await outgoing.put(server_error(message, code, type_))
    deadline = time.monotonic() + 2.0
    while not outgoing.empty() and not writer.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    try:
        await websocket.close(code=close_code, reason=message[:120])
    except (WebSocketDisconnect, RuntimeError):
        pass
