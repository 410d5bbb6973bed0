"""The proxy's own Prometheus metrics, served at `GET /metrics` on the proxy's port (Triton's engine
metrics stay on Triton's metrics port, 8002). One registry per app, so several apps in one process
(tests) never share counters.

- whisper_http_requests_total{route,method,status}: status 499 where the client left before its answer;
  route is the route's template or `unmatched`, method one of GET POST HEAD OPTIONS PUT DELETE PATCH or
  `other` (neither a path nor a method a client invents adds a series)
- whisper_http_request_duration_seconds{route} (histogram; a stream counts until its last byte)
- whisper_http_requests_in_flight{route}
- whisper_audio_seconds_total{route}: seconds of audio transcribed
- whisper_errors_total{route,type}: error answers by their `type`
- whisper_stream_first_segment_seconds{route}: request start to the first segment sent (streaming)
- whisper_windows_total{route}: windows the speech was cut into
- whisper_window_decodes_total{route,kind}: engine decodes of windows, by kind: `first`, `fallback`
  (a higher temperature), `follow_up` (the rest of a window whose decode stopped early),
  `language_retry` (another candidate language where the detected one was unsure)
- whisper_stage_seconds_total{route,stage}: time per stage (`audio_decode`, `vad`, `detection`,
  `decoding`; the engine's `encoder`, `decoder`, `alignment` shares), from each answer's `info.work`
- whisper_live_sessions_open{route}: live sessions open; whisper_live_sessions_total{route,outcome}: sessions
  by how they ended or why they were refused (closed, idle, too_long, refused_capacity, refused_key, ...)
- whisper_live_utterances_total{outcome}: utterances transcribed (completed) or failed
- whisper_live_final_seconds: end of an utterance's speech (as its audio arrived) to its completed event
- whisper_live_first_delta_seconds: speech start detected to the utterance's first delta
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .guards import CLIENT_CLOSED_STATUS, CLIENT_GONE

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LIVE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
UNMATCHED = "unmatched"  # any path that is not a route: one label, whatever was asked
# the method label's values: a fixed set, so invented methods never add series
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})
OTHER_METHOD = "other"


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER_METHOD


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("whisper_http_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("whisper_http_request_duration_seconds", "Time from request to last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("whisper_http_requests_in_flight", "Requests being answered", ["route"],
                               registry=self.registry)
        self.audio_seconds = Counter("whisper_audio_seconds", "Seconds of audio transcribed", ["route"],
                                     registry=self.registry)
        self.errors = Counter("whisper_errors", "Error answers by type", ["route", "type"], registry=self.registry)
        self.first_segment = Histogram("whisper_stream_first_segment_seconds",
                                       "Streaming: request start to the first segment sent", ["route"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.live_sessions = Gauge("whisper_live_sessions_open", "Live sessions open", ["route"], registry=self.registry)
        self.live_sessions_total = Counter("whisper_live_sessions", "Live sessions by outcome", ["route", "outcome"],
                                           registry=self.registry)
        self.live_utterances = Counter("whisper_live_utterances", "Live utterances by outcome", ["outcome"],
                                       registry=self.registry)
        self.live_final = Histogram("whisper_live_final_seconds", "Live: end of speech to its completed transcript",
                                    buckets=LIVE_BUCKETS, registry=self.registry)
        self.live_first_delta = Histogram("whisper_live_first_delta_seconds",
                                          "Live: speech start detected to the first delta", buckets=LIVE_BUCKETS,
                                          registry=self.registry)
        self.windows = Counter("whisper_windows", "Windows the speech was cut into", ["route"], registry=self.registry)
        self.window_decodes = Counter("whisper_window_decodes", "Engine decodes of windows, by kind",
                                      ["route", "kind"], registry=self.registry)
        self.stage_seconds = Counter("whisper_stage_seconds", "Seconds per stage of transcription",
                                     ["route", "stage"], registry=self.registry)

    def record(self, route: str, result: dict) -> None:
        """An answer's audio seconds and the work it cost (`info.work`)."""
        self.audio_seconds.labels(route).inc(result.get("duration", 0.0) or 0.0)
        work = (result.get("info") or {}).get("work") or {}
        if not work:
            return
        self.windows.labels(route).inc(work.get("windows", 0))
        extra = {"fallback": work.get("fallback_decodes", 0), "follow_up": work.get("follow_up_decodes", 0),
                 "language_retry": work.get("language_retries", 0)}
        self.window_decodes.labels(route, "first").inc(max(0, work.get("decodes", 0) - sum(extra.values())))
        for kind, count in extra.items():
            self.window_decodes.labels(route, kind).inc(count)
        for stage, seconds in (work.get("seconds") or {}).items():
            self.stage_seconds.labels(route, stage).inc(max(0.0, float(seconds)))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_label(scope: dict, routes: set[str]) -> str:
    """The route's template (`/models/{model_name}/invoke`), so a label never holds a caller's name."""
    path = scope.get("path", "")
    if path in routes:
        return path
    parts = path.split("/")
    for route in routes:
        template = route.split("/")
        if "{" in route and len(template) == len(parts) and all(
                t == p or (t.startswith("{") and t.endswith("}") and ":" not in t and p) for t, p in zip(template, parts)):
            return route
    return UNMATCHED


class MetricsMiddleware:
    """Pure ASGI (so a streamed answer is timed until its last byte, not until its headers)."""

    def __init__(self, app, metrics: ProxyMetrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope, self.routes)
        scope.setdefault("state", {})["metrics_route"] = route
        started = time.perf_counter()
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.labels(route).inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.in_flight.labels(route).dec()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            if scope["state"].get(CLIENT_GONE):  # cancelled because the client left: no status was sent
                status["code"] = CLIENT_CLOSED_STATUS
            self.metrics.requests.labels(route, method_label(scope.get("method", "")), str(status["code"])).inc()
