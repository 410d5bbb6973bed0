"""Admission: what work the server takes on, kept on the event loop (no await between a check and
its change). `Guards` (http/guards.py) holds a request slot for each metered request; the
transcription calls (`TritonClient`) hold their audio, admitted by deadline:

- the server knows its own speed per model: audio seconds decoded per wall second of the server's
  time (`SpeedEstimate`), from the requests it completed. While n requests are in flight each is
  given 1/n of the wall time (processor sharing), so a request's sample is its audio over its share
  and the estimate is the server's throughput under load, not one request's latency. Before any
  request the prior (`admission_prior_speed`) judges the first burst;
- the work admitted and not yet done (the backlog) is kept in audio seconds per request, drained at
  the estimated speed while in flight; in wall seconds it is the sum of each one's audio over its
  model's speed, divided by the share that live sessions leave to files;
- a request is admitted only when the backlog plus its own work ends before its deadline
  (`deadline_s`: SageMaker real time's 60 s on /invocations, the OpenAI client's 600 s on /v1, the
  configured one for async inference and batch transform); a stream only needs its first chunk
  (one 30 s window) within it. A request with nothing else in flight is admitted, unless its model's
  speed has been measured and says it cannot end in time alone (`too_long`: streaming, splitting or
  an async endpoint can serve it; the prior alone never refuses it, so a guess cannot lock out a file);
- its charge is the audio it decodes to: the container header's duration clamped to what the body
  could hold (`charge_seconds`: at most the bytes at the codec's lowest bitrate, at least the bytes at
  its highest), replaced by the real duration when the answer comes (the charge released, the real
  duration recorded as the speed sample);
- a refusal is immediate: 429 on /v1, 503 on the SageMaker routes, with Retry-After the seconds until
  the backlog has drained enough for this request to fit;
- a live session takes `realtime_factor` audio seconds per second: admitted while all sessions
  together take at most `live_max_share` of the server's speed.
"""

from __future__ import annotations

import contextvars
import math
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from ..errors import OverloadedError
from ..pipeline.audio import release_free_heap_soon

# the status a refusal for load gets on the current request's route (429 or 503), and its deadline
_OVERLOAD_STATUS: contextvars.ContextVar[int] = contextvars.ContextVar("overload_status", default=503)
_DEADLINE_S: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline_s", default=None)

DEFAULT_MODEL = "-"  # the key of the default model's speed
FIRST_CHUNK_AUDIO_S = 30.0  # a stream's first chunk: one window of audio
# a request shorter than this is no speed sample: its fixed costs (decode, VAD, a window's encoder
# pass) dominate, and clips of a second would teach a speed that refuses every long file as too_long
MIN_SAMPLE_AUDIO_S = 10.0
MIN_SPEED = 0.05  # audio s per wall s: a floor, so one bad sample cannot shut the server for hours
MAX_RETRY_AFTER_S = 3_600
MAX_SAMPLE_RATIO = 4.0

# bits per second of audio each codec can go down to (its lowest bitrate: a header claiming more
# audio than that is a lie) and up to (a header claiming less is a lie too). PCM is exact per format.
CODEC_BITRATES: dict[str, tuple[float, float]] = {
    "opus": (6_000, 510_000), "vorbis": (8_000, 500_000), "mp3": (8_000, 320_000), "mp2": (8_000, 384_000),
    "aac": (8_000, 576_000), "amr_nb": (4_750, 12_200), "amr_wb": (6_600, 23_850), "speex": (2_150, 44_200),
    "gsm": (13_000, 13_200), "gsm_ms": (13_000, 13_200), "pcm_mulaw": (64_000, 64_000),
    "pcm_alaw": (64_000, 64_000), "flac": (8_000, 4_608_000), "alac": (8_000, 4_608_000),
}
UNKNOWN_BITRATES = (2_000.0, 4_608_000.0)  # any other codec: the lowest speech codecs, 48 kHz 24-bit stereo PCM


def overload_status(path: str) -> int:
    """OpenAI clients back off on 429; SageMaker retries 503."""
    return 429 if path.startswith("/v1/") else 503


def set_route(path: str, deadline_s: float) -> tuple:
    """The current request's refusal status and deadline (Guards, per request); `reset_route` undoes it."""
    return _OVERLOAD_STATUS.set(overload_status(path)), _DEADLINE_S.set(deadline_s)


def reset_route(tokens: tuple) -> None:
    _OVERLOAD_STATUS.reset(tokens[0])
    _DEADLINE_S.reset(tokens[1])


class Refusal(OverloadedError):
    """A refusal for load whose JSON names the bound (`reason`) and, for a deadline, the figures."""

    def __init__(self, message: str, status: int, retry_after_s: int, reason: str, details: dict | None = None):
        super().__init__(message, status, retry_after_s)
        self.reason = reason
        self.details = details or {}

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["error"].update(reason=self.reason, retry_after_s=self.retry_after_s, **self.details)
        return body


REASONS = ("requests", "deadline", "too_long", "audio", "live")  # the bounds a refusal names (a fixed metric label set)


# ---- the charge: what a body really decodes to -------------------------------------------------
def clamp_seconds(header_s: float | None, body_bytes: int, codec: str | None, pcm_bits_per_second: float = 0) -> float:
    """The header's duration, kept within what `body_bytes` can hold for `codec` (module docstring)."""
    if pcm_bits_per_second > 0:  # raw PCM: the size says exactly how long it is
        return body_bytes * 8 / pcm_bits_per_second
    low, high = CODEC_BITRATES.get(codec or "", UNKNOWN_BITRATES)
    most, least = body_bytes * 8 / low, body_bytes * 8 / high
    if header_s is None or not math.isfinite(header_s) or header_s <= 0:
        return min(most, body_bytes / 32_000)  # no duration: the body as 16 kHz 16-bit PCM, as before
    return min(max(header_s, least), most)


def charge_seconds(data: bytes) -> float:
    """The audio seconds `data` is charged for, from its header, without decoding it (a thread's work)."""
    from ..pipeline import audio

    header_s, codec, pcm_bps = None, None, 0.0
    try:
        with audio._open(data) as container:
            stream = container.streams.audio[0] if container.streams.audio else None
            if stream is not None:
                context = stream.codec_context
                codec = context.name
                if codec.startswith("pcm_") and codec not in ("pcm_mulaw", "pcm_alaw"):
                    pcm_bps = float(context.sample_rate or 0) * (context.channels or 1) * 8 * \
                        max(1, (context.format.bytes if context.format is not None else 2))
            if container.duration and container.duration > 0:
                header_s = float(container.duration) / audio.av.time_base
            elif stream is not None and stream.duration and stream.time_base:
                header_s = float(stream.duration * stream.time_base)
    except Exception:  # noqa: BLE001 - an estimate: an unreadable header takes the body size (refused later anyway)
        pass
    return clamp_seconds(header_s, len(data), codec, pcm_bps)


# ---- the speed -------------------------------------------------------------------------------
@dataclass
class SpeedEstimate:
    """Audio seconds per wall second of one model: decayed sums of (audio, wall share) per completion,
    starting from the prior as `prior_weight_s` seconds of evidence (so the first samples move it)."""

    prior: float
    decay: float = 0.7
    prior_weight_s: float = 1.0
    audio_s: float = field(init=False)
    wall_s: float = field(init=False)
    samples: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.audio_s, self.wall_s = self.prior * self.prior_weight_s, self.prior_weight_s

    @property
    def value(self) -> float:
        return max(MIN_SPEED, self.audio_s / self.wall_s)

    def record(self, audio_s: float, wall_s: float) -> None:
        if audio_s <= 0 or wall_s <= 0:
            return
        # once measured, one sample moves the estimate at most 4x either way (a request that waited on
        # something else); the first is taken whole, the prior being a guess
        if self.samples:
            current = self.value
            wall_s = min(wall_s, audio_s * MAX_SAMPLE_RATIO / current)
            audio_s = min(audio_s, wall_s * MAX_SAMPLE_RATIO * current)
        self.audio_s = self.decay * self.audio_s + audio_s
        self.wall_s = self.decay * self.wall_s + wall_s
        self.samples += 1


@dataclass(eq=False)  # each ticket is itself: two equal charges must not release each other
class Ticket:
    """One request's admitted audio: `remaining_s` of it still to decode, `served_s` its wall share."""

    model: str
    charged_s: float
    remaining_s: float
    served_s: float = 0.0
    actual_s: float | None = None  # the real duration, when the answer says it


@dataclass(eq=False)
class LiveTicket:
    model: str
    realtime_factor: float


class Admission:
    """The bounds (module docstring): request slots, audio in flight, deadlines, live sessions."""

    def __init__(self, max_requests: int, max_audio_seconds: float, retry_after_s: int, prior_speed: float = 10.0,
                 deadline_s: float = 60.0, live_max_share: float = 0.8, refuse_too_long: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.max_requests = max_requests
        self.max_audio_seconds = max_audio_seconds
        self.retry_after_s = retry_after_s
        self.prior_speed = prior_speed
        self.deadline_s = deadline_s  # when the request's route set none (tools, tests)
        self.live_max_share = live_max_share
        self.refuse_too_long = refuse_too_long
        self.clock = clock
        self.requests = 0
        self.refused = 0
        self.speeds: dict[str, SpeedEstimate] = {}
        self.tickets: list[Ticket] = []
        self.live: list[LiveTicket] = []
        self.refusals = {reason: 0 for reason in REASONS}
        self.charged_total = 0.0  # audio seconds admitted, as charged
        self.decoded_total = 0.0  # audio seconds the answers said they were
        self._last = clock()

    # -- state ----------------------------------------------------------------------------------
    @property
    def audio_seconds(self) -> float:
        """Audio seconds admitted and not yet answered (as charged)."""
        return sum(t.charged_s for t in self.tickets)

    def speed(self, model: str | None = None) -> float:
        return self._estimate(model).value

    def _estimate(self, model: str | None) -> SpeedEstimate:
        key = model or DEFAULT_MODEL
        if key not in self.speeds:
            self.speeds[key] = SpeedEstimate(self.prior_speed)
        return self.speeds[key]

    def live_share(self) -> float:
        """The share of the server's time live sessions take (each `realtime_factor` / its model's speed)."""
        return sum(t.realtime_factor / self.speed(t.model) for t in self.live)

    def _file_share(self) -> float:
        return max(0.05, 1.0 - min(self.live_share(), self.live_max_share))

    def advance(self) -> None:
        """Drain the backlog for the time since the last call: each request in flight gets 1/n of it."""
        now = self.clock()
        elapsed, self._last = max(0.0, now - self._last), now
        if not self.tickets or elapsed == 0:
            return
        share = elapsed * self._file_share() / len(self.tickets)
        for ticket in self.tickets:
            ticket.served_s += share
            ticket.remaining_s = max(0.0, ticket.remaining_s - share * self.speed(ticket.model))

    def backlog_s(self) -> float:
        """Wall seconds until the work admitted is done, at the estimated speeds."""
        self.advance()
        return sum(t.remaining_s / self.speed(t.model) for t in self.tickets) / self._file_share()

    # -- refusals --------------------------------------------------------------------------------
    def overloaded(self, what: str, retry_after_s: int | float | None = None, reason: str = "requests",
                   details: dict | None = None) -> Refusal:
        self.refused += 1
        self.refusals[reason] += 1
        wait = int(max(self.retry_after_s, min(MAX_RETRY_AFTER_S, math.ceil(retry_after_s or 0))))
        return Refusal(f"The server is busy ({what}); retry after {wait} s.", _OVERLOAD_STATUS.get(), wait, reason,
                       details)

    def enter(self) -> None:
        if self.requests >= self.max_requests:
            raise self.overloaded(f"{self.requests} requests in flight, the limit is {self.max_requests}")
        self.requests += 1

    def leave(self) -> None:
        self.requests -= 1
        if self.requests == 0:  # idle: the bodies of the requests just ended go back to the OS
            release_free_heap_soon()

    # -- files -----------------------------------------------------------------------------------
    def admit(self, seconds: float, model: str | None = None, stream: bool = False,
              deadline_s: float | None = None) -> Ticket:
        """Admit `seconds` of audio for `model`, or raise OverloadedError (429/503 with Retry-After)."""
        deadline = deadline_s if deadline_s is not None else (_DEADLINE_S.get() or self.deadline_s)
        backlog = self.backlog_s()
        speed = self.speed(model)
        own = (min(seconds, FIRST_CHUNK_AUDIO_S) if stream else seconds) / speed / self._file_share()
        details = {"charged_audio_s": round(seconds, 3), "backlog_s": round(backlog, 3),
                   "speed": round(speed, 3), "deadline_s": deadline}
        measured = self._estimate(model).samples > 0
        if not self.tickets and measured and own > deadline and self.refuse_too_long:  # alone, at a measured speed: it cannot be in time
            raise self.overloaded(
                f"{seconds:.0f} s of audio takes {own:.0f} s alone at the measured {speed:.1f} audio seconds per "
                f"second, past the {deadline:.0f} s deadline: stream it (a stream needs only its first chunk in "
                f"time), split it, or send it to an async or batch endpoint", own, "too_long", details)
        if self.tickets:
            if backlog + own > deadline:
                what = "its first chunk" if stream else "it"
                raise self.overloaded(
                    f"{backlog:.0f} s of work is admitted and {seconds:.0f} s of audio takes {own:.0f} s more at "
                    f"{speed:.1f} audio seconds per second: {what} cannot finish within the {deadline:.0f} s deadline",
                    backlog - max(0.0, deadline - own) if own <= deadline else backlog, "deadline", details)
            if self.audio_seconds + seconds > self.max_audio_seconds:
                raise self.overloaded(f"{self.audio_seconds:.0f} s of audio in flight, the limit is "
                                      f"{self.max_audio_seconds:.0f} s", backlog, "audio", details)
        ticket = Ticket(model or DEFAULT_MODEL, seconds, seconds)
        self.tickets.append(ticket)
        self.charged_total += seconds
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The request is over: its charge goes; with its real duration, its speed sample is recorded."""
        self.advance()
        if ticket in self.tickets:
            self.tickets.remove(ticket)
        if ticket.actual_s is not None:
            self.decoded_total += ticket.actual_s
            if ticket.actual_s >= MIN_SAMPLE_AUDIO_S:
                self._estimate(ticket.model).record(ticket.actual_s, ticket.served_s)

    @asynccontextmanager
    async def audio(self, seconds: float, model: str | None = None, stream: bool = False) -> AsyncIterator[Ticket]:
        """Hold `seconds` of audio while it is transcribed; set `actual_s` on the ticket when known."""
        ticket = self.admit(seconds, model, stream)
        try:
            yield ticket
        finally:
            self.release(ticket)

    # -- live sessions ----------------------------------------------------------------------------
    def session_reason(self, realtime_factor: float = 1.0, model: str | None = None) -> str | None:
        """None when a live session of `realtime_factor` fits, else why not."""
        self.advance()
        taken = self.live_share()
        needed = realtime_factor / self.speed(model)
        if taken + needed > self.live_max_share:
            return (f"live sessions take {taken:.0%} of the server's speed ({self.speed(model):.1f} audio seconds "
                    f"per second); one more needs {needed:.0%} and the limit is {self.live_max_share:.0%}")
        return None

    @contextmanager
    def live_session(self, realtime_factor: float = 1.0, model: str | None = None) -> Iterator[LiveTicket]:
        self.advance()
        ticket = LiveTicket(model or DEFAULT_MODEL, realtime_factor)
        self.live.append(ticket)
        try:
            yield ticket
        finally:
            self.advance()
            self.live.remove(ticket)


class AdmissionCollector:
    """The admission's state on the proxy's /metrics (read when scraped, so nothing else keeps it)."""

    def __init__(self, admission: Admission):
        self.admission = admission

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        a = self.admission
        speed = GaugeMetricFamily("whisper_admission_speed", "Estimated audio seconds decoded per second",
                                  labels=["model"])
        for model, estimate in sorted(a.speeds.items()):
            speed.add_metric([model], estimate.value)
        if DEFAULT_MODEL not in a.speeds:
            speed.add_metric([DEFAULT_MODEL], a.speed())
        yield speed
        yield GaugeMetricFamily("whisper_admission_backlog_seconds", "Wall seconds of admitted work left",
                                value=a.backlog_s())
        yield GaugeMetricFamily("whisper_admission_live_share", "Share of the speed live sessions take",
                                value=a.live_share())
        yield CounterMetricFamily("whisper_admission_charged_audio_seconds", "Audio seconds admitted, as charged",
                                  value=a.charged_total)
        yield CounterMetricFamily("whisper_admission_decoded_audio_seconds", "Audio seconds answered, as decoded",
                                  value=a.decoded_total)
        refused = CounterMetricFamily("whisper_admission_refused", "Requests and sessions refused, by bound",
                                      labels=["reason"])
        for reason in REASONS:
            refused.add_metric([reason], a.refusals[reason])
        yield refused
