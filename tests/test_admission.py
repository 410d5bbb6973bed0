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


def test_a_request_alone_is_refused_only_when_the_measured_speed_says_it_cannot_be_in_time():
    a, clock = admission(prior=10.0, deadline=60.0)
    guess = a.admit(1_000.0)  # 100 s at the prior: alone, not measured yet: admitted
    clock.now = 200.0  # it took 200 s: the server does 5 audio seconds per second
    guess.actual_s = 1_000.0
    a.release(guess)
    assert a.speed() < 10.0
    with pytest.raises(OverloadedError) as refused:
        a.admit(1_000.0)
    assert refused.value.reason == "too_long" and "stream it" in refused.value.message
    a.release(a.admit(200.0))  # what fits alone still passes
    assert a.refusals["too_long"] == 1
    a.refuse_too_long = False  # WHISPER_TRITON_ADMISSION_REFUSE_TOO_LONG=false: alone is always admitted
    a.release(a.admit(1_000.0))


def test_short_clips_teach_no_speed_that_would_refuse_a_long_file():
    a, clock = admission(prior=10.0, deadline=60.0)
    for _ in range(20):  # clips of a second, each 0.2 s: their fixed costs, not the server's speed
        ticket = a.admit(1.0)
        clock.now += 0.2
        ticket.actual_s = 1.0
        a.release(ticket)
    assert a.speed() == 10.0
    a.release(a.admit(400.0))  # 40 s at the prior: alone, admitted (5 audio s/s would have said too_long)


def test_two_equal_charges_release_each_their_own():
    a, _ = admission(prior=10.0)
    first, second = a.admit(30.0), a.admit(30.0)
    a.release(second)
    assert a.tickets == [first] and a.tickets[0] is first
    a.release(first)
    assert a.tickets == []


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
    estimate.record(20.0, 2.0)  # the first sample is taken whole: 10 audio s/s
    assert estimate.value == pytest.approx(10.0)
    estimate.record(0.001, 1000.0)  # 1 ms of audio in 1000 s: a request that waited on something else
    assert estimate.value > 9.0
    estimate.record(10.0, 1e-6)
    assert estimate.value < 30.0
    estimate.record(0.0, 5.0)  # a failed request (no duration) is no sample
    assert estimate.samples == 3


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


# ---- through a real serve ---------------------------------------------------------------------------
DEADLINE_S = 2  # small, so a burst of a few long files is beyond it whatever this machine's speed
PRIOR_SPEED = 20


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    from conftest import start_serve

    instance = start_serve(tmp_path_factory.mktemp("admission"), {
        "WHISPER_TRITON_REALTIME_DEADLINE_S": str(DEADLINE_S),
        "WHISPER_TRITON_OPENAI_DEADLINE_S": str(DEADLINE_S),
        "WHISPER_TRITON_ADMISSION_PRIOR_SPEED": str(PRIOR_SPEED),
        "WHISPER_TRITON_LIVE_MAX_SHARE": "0.01",  # one live session needs 1/speed of it: always more
        # a long file alone is admitted whatever this machine's measured speed, so each burst has one
        "WHISPER_TRITON_ADMISSION_REFUSE_TOO_LONG": "false",
        "WHISPER_TRITON_MAX_BODY_BYTES": str(32 * 1024 * 1024),
    })
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not on /metrics")


@pytest.mark.triton
def test_lying_opus_headers_are_charged_by_the_body_and_corrected_by_the_real_duration(tight, opus_20s):
    for granule, least, most in ((2**62, 0, len(opus_20s) * 8 / 6_000 + 1), (1, len(opus_20s) * 8 / 510_000, 400)):
        body = lying_opus(opus_20s, granule)
        charged = metric(tight.url, "whisper_admission_charged_audio_seconds_total")
        decoded = metric(tight.url, "whisper_admission_decoded_audio_seconds_total")
        reply = httpx.post(tight.url + "/invocations", content=body, headers={"Content-Type": "audio/ogg"}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["text"].strip()
        charge = metric(tight.url, "whisper_admission_charged_audio_seconds_total") - charged
        assert least - 0.01 <= charge <= most  # 2^62 samples would be 3e9 years; 1 sample 20 us
        real = metric(tight.url, "whisper_admission_decoded_audio_seconds_total") - decoded
        assert real == pytest.approx(20.0, abs=0.5)  # the speed sample is the real duration
    assert metric(tight.url, "whisper_admission_backlog_seconds") == 0.0


def _burst(jobs: list) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: job(), jobs))


@pytest.fixture(scope="module")
def long_part(long_speech, speech_clips) -> tuple[bytes, str, float]:
    """The first ~90 s of the long recording, cut in a pause, and its text: at any speed below 60 audio
    seconds per second, two of them (or one and a stream's first 30 s) are over the 2 s deadline."""
    k = next(i for i, (start, end) in enumerate(long_speech.pauses) if end >= 90.0)
    cut = int((long_speech.pauses[k][0] + long_speech.pauses[k][1]) / 2 * 16_000)
    text = " ".join(speech_clips[i % len(speech_clips)].text for i in range(k + 1))
    return encode(long_speech.samples[:cut], 16_000, "flac", "flac"), text, cut / 16_000


@pytest.mark.triton
def test_a_burst_beyond_the_deadline_is_served_or_refused_at_once(tight, long_part):
    from whisper_triton.pipeline.evaluation import word_error_rate

    refused_before = metric(tight.url, 'whisper_admission_refused_total{reason="deadline"}')
    body, text, duration = long_part

    def sagemaker():
        return httpx.post(tight.url + "/invocations", content=body, headers={"Content-Type": "audio/flac"}, timeout=300)

    def openai():
        return httpx.post(tight.url + "/v1/audio/transcriptions", files={"file": ("long.flac", body, "audio/flac")},
                          data={"model": "whisper-1"}, timeout=300)

    replies = _burst([sagemaker, openai] * 2)
    served = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    assert served and refused, [r.status_code for r in replies]
    for reply in served:
        assert word_error_rate(text, reply.json()["text"]) < 0.35
    for reply in refused:
        openai_route = "/v1/" in str(reply.request.url)
        assert reply.status_code == (429 if openai_route else 503), reply.text
        assert int(reply.headers["retry-after"]) >= 1
        error = reply.json()["error"]
        assert "deadline" in error["message"]
        if not openai_route:  # our shape names the bound and the figures
            assert error["reason"] == "deadline" and error["deadline_s"] == DEADLINE_S
            assert error["charged_audio_s"] == pytest.approx(duration, rel=0.05)
    refusals = metric(tight.url, 'whisper_admission_refused_total{reason="deadline"}') - refused_before
    assert refusals == len(refused)
    assert metric(tight.url, "whisper_admission_backlog_seconds") == 0.0  # all admitted work released


@pytest.mark.triton
def test_a_streaming_route_is_bounded_too(tight, long_part):
    import threading

    statuses: list[int] = []
    answered = threading.Barrier(4, timeout=120)  # the admitted streams stay open until all have a status

    def stream() -> None:
        with httpx.stream("POST", tight.url + "/invocations", content=long_part[0], timeout=300,
                          headers={"Content-Type": "audio/flac", "Accept": "application/jsonlines"}) as reply:
            statuses.append(reply.status_code)
            if reply.status_code != 200:
                reply.read()
                assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1
                assert reply.json()["error"]["reason"] == "deadline"
            try:
                answered.wait()
            except threading.BrokenBarrierError:
                pass
        # leaving the block drops an admitted stream: its decoding is cancelled

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(stream) for _ in range(4)]:
            future.result()
    assert 200 in statuses and 503 in statuses, statuses


@pytest.mark.triton
def test_a_live_session_beyond_the_share_of_the_speed_is_refused_at_connect(tight):
    import websockets

    async def main():
        url = tight.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
        async with websockets.connect(url) as socket:
            event = json.loads(await asyncio.wait_for(socket.recv(), timeout=30))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), timeout=30)
        assert event["type"] == "error" and event["error"]["code"] == "server_busy"
        assert closed.value.rcvd.code == 1013 and "speed" in closed.value.rcvd.reason

    refused = metric(tight.url, 'whisper_admission_refused_total{reason="live"}')
    asyncio.run(main())
    assert metric(tight.url, 'whisper_admission_refused_total{reason="live"}') == refused + 1
