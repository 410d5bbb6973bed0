"""Admission by deadline (issue 21 item 3): the arithmetic with an injected clock (no wall clock),
the charge of lying container headers, and through real serves: a burst beyond the deadline is
served or refused at once (503/429 + Retry-After), a lying Opus header is charged by its size, a
streaming route is bounded, a live session that would not fit is refused at connect."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from speech import encode
from whisper_triton.errors import OverloadedError
from whisper_triton.http.admission import (
    FIRST_CHUNK_AUDIO_S, Admission, SpeedEstimate, charge_seconds, clamp_seconds, set_route, reset_route,
)
from whisper_triton.settings import load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admission(prior: float = 10.0, deadline: float = 60.0, **kwargs) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(64, 28_800.0, 2, prior_speed=prior, deadline_s=deadline, clock=clock, **kwargs), clock


# ---- the arithmetic ----------------------------------------------------------------------------------
def test_a_request_alone_is_admitted_and_the_next_only_if_both_end_before_the_deadline():
    a, clock = admission(prior=10.0, deadline=60.0)
    first = a.admit(279.0)  # 27.9 s of work: alone, admitted
    second = a.admit(279.0)  # 27.9 + 27.9 = 55.8 s <= 60 s
    with pytest.raises(OverloadedError) as refused:
        a.admit(279.0)  # 83.7 s > 60 s
    assert refused.value.status == 503 and refused.value.reason == "deadline"
    # Retry-After: the backlog must drain to 60 - 27.9 = 32.1 s: 55.8 - 32.1 = 23.7 -> 24 s
    assert refused.value.headers() == {"Retry-After": "24"}
    body = refused.value.to_dict()["error"]
    assert body["reason"] == "deadline" and body["charged_audio_s"] == 279.0 and body["deadline_s"] == 60.0
    clock.now = 24.0  # 24 s later the backlog is 31.8 s: the same request fits
    third = a.admit(279.0)
    for ticket in (first, second, third):
        a.release(ticket)
    assert a.tickets == [] and a.backlog_s() == 0.0


def test_the_backlog_drains_at_the_speed_shared_by_the_requests_in_flight():
    a, clock = admission(prior=10.0)
    tickets = [a.admit(100.0) for _ in range(2)]  # 20 s of work
    clock.now = 5.0  # 5 s: each got 2.5 s of the server, 25 audio seconds
    assert a.backlog_s() == pytest.approx(15.0)
    assert [t.remaining_s for t in tickets] == [pytest.approx(75.0)] * 2
    assert [t.served_s for t in tickets] == [pytest.approx(2.5)] * 2


def test_the_speed_is_learnt_from_completed_requests_under_load():
    a, clock = admission(prior=10.0)
    tickets = [a.admit(60.0) for _ in range(4)]
    clock.now = 4.0  # four 60 s files answered in 4 s: the server does 60 audio s/s together
    for ticket in tickets:
        ticket.actual_s = 60.0
        a.release(ticket)
    assert a.speed() > 40.0  # from the prior of 10 most of the way to 60 after four samples
    for _ in range(20):
        ticket = a.admit(60.0)
        clock.now += 1.0
        ticket.actual_s = 60.0
        a.release(ticket)
    assert a.speed() == pytest.approx(60.0, rel=0.01)
    assert a.speed("other-model") == 10.0  # each model its own estimate, the prior until measured


def test_the_real_duration_replaces_the_charge():
    a, clock = admission(prior=10.0)
    ticket = a.admit(300.0)  # a header that claimed 300 s
    clock.now = 1.0
    ticket.actual_s = 20.0  # it was 20 s, decoded in 1 s
    a.release(ticket)
    assert a.decoded_total == 20.0 and a.charged_total == 300.0 and a.audio_seconds == 0.0
    assert 10.0 < a.speed() < 20.0  # 20 s in 1 s pulls the prior up, not the 300 s the header said


def test_a_stream_needs_only_its_first_chunk_within_the_deadline():
    a, _ = admission(prior=10.0, deadline=60.0)
    a.admit(500.0)  # 50 s of work
    with pytest.raises(OverloadedError):
        a.admit(279.0)  # a file: 50 + 27.9 > 60
    a.admit(279.0, stream=True)  # a stream: 50 + 3 (its first 30 s window) <= 60
    assert FIRST_CHUNK_AUDIO_S == 30.0
    with pytest.raises(OverloadedError):
        a.admit(279.0, stream=True)  # now 77.9 + 3 > 60


def test_the_route_sets_the_deadline_and_the_status():
    a, _ = admission(prior=10.0, deadline=60.0)
    a.admit(100.0)
    settings = load_settings()
    tokens = set_route("/v1/audio/transcriptions", settings.deadline_s("/v1/audio/transcriptions"))
    try:
        a.admit(5000.0)  # 500 s more: within /v1's 600 s
        with pytest.raises(OverloadedError) as refused:
            a.admit(1000.0)
        assert refused.value.status == 429
    finally:
        reset_route(tokens)
    assert settings.deadline_s("/invocations") == 60.0
    assert load_settings(async_inference=True).deadline_s("/invocations") == 3600.0
    assert load_settings(sagemaker_batch=True).deadline_s("/invocations") == 3600.0


def test_live_sessions_take_their_share_of_the_speed_and_files_get_the_rest():
    a, _ = admission(prior=10.0, deadline=60.0, live_max_share=0.5)
    held = [a.live_session(1.0) for _ in range(5)]
    for session in held:
        session.__enter__()  # 5 sessions x 1 audio s/s = half of 10 audio s/s
    assert a.session_reason(1.0) is not None  # a sixth would pass the 50 % share
    a.admit(100.0)  # files now get half the speed: 100 s takes 20 s
    assert a.backlog_s() == pytest.approx(20.0)
    for session in held:
        session.__exit__(None, None, None)
    assert a.session_reason(1.0) is None and a.backlog_s() == pytest.approx(10.0)


def test_one_bad_sample_cannot_stop_the_server():
    estimate = SpeedEstimate(prior=10.0)
    estimate.record(0.001, 1000.0)  # 1 ms of audio in 1000 s: a request that waited on something else
    assert estimate.value > 9.0
    estimate.record(10.0, 1e-6)
    assert estimate.value < 30.0
    estimate.record(0.0, 5.0)  # a failed request (no duration) is no sample
    assert estimate.samples == 2


# ---- the charge of a body -------------------------------------------------------------------------
def ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


def lying_opus(ogg: bytes, granule: int) -> bytes:
    """The Ogg file with its last page claiming `granule` samples (the duration FFmpeg reads), CRC fixed."""
    last = ogg.rfind(b"OggS")
    page = bytearray(ogg[last:])
    page[6:14] = struct.pack("<q", granule)
    page[22:26] = b"\0\0\0\0"
    page[22:26] = struct.pack("<I", ogg_crc(bytes(page)))
    return ogg[:last] + bytes(page)


@pytest.fixture(scope="module")
def opus_20s(speech_clips) -> bytes:
    samples = np.concatenate([clip.samples for clip in speech_clips])[: 16_000 * 20]
    return encode(samples, 16_000, "ogg", "libopus", out_rate=48_000)


def test_header_lies_are_clamped_by_the_body_size(opus_20s):
    from whisper_triton.pipeline.audio import estimate_seconds

    honest = charge_seconds(opus_20s)
    assert honest == pytest.approx(estimate_seconds(opus_20s), rel=0.05)
    huge, tiny = lying_opus(opus_20s, 2**62), lying_opus(opus_20s, 1)
    assert estimate_seconds(huge) > 1e12 and estimate_seconds(tiny) < 0.001  # what the header says
    assert charge_seconds(huge) == pytest.approx(len(huge) * 8 / 6_000)  # the bytes at Opus's lowest bitrate
    assert charge_seconds(tiny) == pytest.approx(len(tiny) * 8 / 510_000)  # ... and at its highest


def test_pcm_is_charged_by_its_size_and_unknown_bodies_as_16_khz_pcm():
    assert clamp_seconds(1e9, 32_000, "pcm_s16le", 16_000 * 16) == 1.0
    assert clamp_seconds(None, 64_000, None) == 2.0
    assert clamp_seconds(float("nan"), 64_000, "opus") == 2.0
