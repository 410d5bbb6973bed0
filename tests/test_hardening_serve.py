"""Hardening against a real `serve` (Triton + proxy, tiny.en): hostile input through the proxy,
a burst far over the admission bound, a client that disconnects and a deadline that passes (the
engine stops decoding), a Python-backend stub that dies, and Triton dying mid-request.

One serve for the module, with small bounds; the destructive tests run last, in file order."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import start_serve
from speech import encode
from whisper_triton.pipeline.evaluation import word_error_rate

pytestmark = pytest.mark.triton

BOUND = 2
# The deadline test runs on its own serve: with a short deadline on the shared one, a slow first
# window on a loaded machine let the deadline (not the client) end the disconnect test's request,
# so the proxy never saw the client go (the flaky failure of issue 21).
DEADLINE_S = 10


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    instance = start_serve(tmp_path_factory.mktemp("hardened"), {
        "WHISPER_TRITON_MAX_REQUESTS_IN_FLIGHT": str(BOUND),
        "WHISPER_TRITON_RETRY_AFTER_S": "3",
        "WHISPER_TRITON_MAX_BODY_BYTES": str(32 * 1024 * 1024),  # the long file below
        "WHISPER_TRITON_REALTIME_DEADLINE_S": "3600",  # the 21 minutes below are admitted alone at any speed
    })
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


@pytest.fixture(scope="module")
def http(hardened):
    with httpx.Client(base_url=hardened.url, timeout=120) as client:
        yield client


def post_wav(http, body: bytes, **kwargs):
    return http.post("/invocations", content=body, headers={"Content-Type": "audio/wav", **kwargs.pop("headers", {})},
                     **kwargs)


def assert_refused(reply, status: int, param: str | None):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    for internal in ("Traceback", "site-packages", ".py", "RecursionError"):
        assert internal not in reply.text


def stats(instance, model: str) -> int:
    import tritonclient.grpc as grpcclient  # Triton's HTTP endpoint is off: statistics over gRPC

    with grpcclient.InferenceServerClient(instance.grpc_url) as client:
        return int(client.get_inference_statistics(model).model_stats[0].inference_count)


# ---- hostile input through the proxy ------------------------------------------------------------------
JUNK = np.random.default_rng(7).integers(0, 256, 30_000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("container,codec,rate", [("mp3", "libmp3lame", 22050), ("ogg", "libopus", 48000),
                                                  ("flac", "flac", 16000)])
def test_trailing_junk_keeps_the_speech(http, speech_clips, container, codec, rate):
    clip = speech_clips[1]
    reply = http.post("/invocations", content=encode(clip.samples, 16000, container, codec, 1, rate) + JUNK,
                      headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 200, reply.text
    assert word_error_rate(clip.text, reply.json()["text"]) <= 0.15


@pytest.mark.parametrize("container,codec", [("wav", "pcm_f32le"), ("matroska", "pcm_f32le")])
def test_non_finite_samples_are_a_400_naming_audio(http, speech_clips, container, codec):
    samples = speech_clips[2].samples.copy()
    samples[5_000::11_000] = np.nan
    samples[9_000::13_000] = np.inf
    assert_refused(post_wav(http, encode(samples, 16000, container, codec)), 400, "audio")


def test_hostile_json_and_strings(http, speech_clips):
    b64 = base64.b64encode(speech_clips[0].wav_bytes).decode()
    json_headers = {"Content-Type": "application/json"}
    deep = ("[" * 10_000 + "]" * 10_000)
    assert_refused(http.post("/invocations", content=f'{{"audio": "{b64}", "x": {deep}}}', headers=json_headers),
                   400, "body")
    assert_refused(http.post("/invocations", content="[" * 100_000, headers=json_headers), 400, "body")
    huge_prompt = json.dumps({"audio": b64, "initial_prompt": "word " * 200_000})  # 1 MB
    assert_refused(http.post("/invocations", content=huge_prompt, headers=json_headers), 400, "initial_prompt")
    long_name = json.dumps({"audio": b64, "x" * 10_000: 1})
    reply = http.post("/invocations", content=long_name, headers=json_headers)
    assert reply.status_code == 400 and len(reply.text) < 2_000
    assert_refused(post_wav(http, speech_clips[0].wav_bytes,
                            headers={"X-Amzn-SageMaker-Custom-Attributes": "language=en," + "a=b," * 400}),
                   400, "X-Amzn-SageMaker-Custom-Attributes")
    assert_refused(post_wav(http, speech_clips[0].wav_bytes, params={"initial_prompt": "w" * 9_000}),
                   400, "initial_prompt")
    assert_refused(post_wav(http, speech_clips[0].wav_bytes, params={"hotwords": "w" * 9_000}), 400, "hotwords")
    assert_refused(post_wav(http, speech_clips[0].wav_bytes, params={"language": "e" * 100}), 400, "language")
    reply = post_wav(http, speech_clips[0].wav_bytes, headers={"X-Request-Id": "caller-id-1"})
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "caller-id-1"


# ---- cancellation and deadlines --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_opus(long_speech) -> tuple[bytes, int]:
    """About 21 minutes of speech as Ogg Opus, and its count of 30 s windows: at beam 10 and one window
    a round, far more engine time than DEADLINE_S."""
    samples = np.concatenate([long_speech.samples] * 6)
    return encode(samples, 16000, "ogg", "libopus", 1, 48000), int(np.ceil(samples.size / 16000 / 30))


def raw_post(instance, body: bytes, query: str, request_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", instance.http_port), timeout=10)
    head = (f"POST /invocations?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: audio/ogg\r\n"
            f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def admitted_post(instance, body: bytes, query: str, request_id: str, before: int, tries: int = 20,
                  timeout_s: float = 180.0) -> socket.socket:
    """`raw_post`, once its first window is decoded (`whisper_window`'s count past `before`); sent again
    while the server refuses it as busy (503 + Retry-After: a request of an earlier test may still hold
    an admission slot). Any other answer fails the test."""
    for _ in range(tries):
        sock = raw_post(instance, body, query, request_id)
        sock.settimeout(0.25)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                head = sock.recv(64)
            except socket.timeout:
                head = None
            if head is not None:
                sock.close()
                assert head.startswith(b"HTTP/1.1 503"), head
                time.sleep(3)
                break
            if stats(instance, "whisper_window") > before:
                return sock
        else:
            raise AssertionError(f"{request_id}: no window decoded within {timeout_s} s:\n{instance.log(3000)}")
    raise AssertionError(f"{request_id} was never admitted")


def metric(instance, name: str, **labels: str) -> float:
    """The value of one series of the proxy's /metrics (0 when it does not exist yet)."""
    with urllib.request.urlopen(instance.url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if wanted <= set(series[len(name) + 1:-1].split(",")):
                total += float(value)
    return total


def wait_until(condition, timeout_s: float, step_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return False


def settled_count(instance, model: str, quiet_s: float = 4.0, timeout_s: float = 120.0) -> int:
    """The model's inference count once it has stopped changing for `quiet_s`."""
    last, since, deadline = stats(instance, model), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = stats(instance, model)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    return last


def test_a_client_that_disconnects_stops_being_decoded(hardened, http, long_opus, speech_clips):
    body, windows = long_opus
    before = settled_count(hardened, "whisper_window")
    gone = metric(hardened, "whisper_http_requests_total", route="/invocations", status="499")
    sock = admitted_post(hardened, body, "batch_size=1&beam_size=10", "gone-client-1", before)
    sock.close()  # the client goes away after its first window
    # the proxy saw it go and cancelled the request (counted as 499, "client closed request")
    assert wait_until(lambda: metric(hardened, "whisper_http_requests_total", route="/invocations",
                                     status="499") == gone + 1, 60), hardened.log(4000)
    decoded = settled_count(hardened, "whisper_window") - before
    assert decoded < windows / 2, f"{decoded} of {windows} windows decoded after the client left"
    # its admission slot came back (released before the 499 is counted): a short request is served
    reply = post_wav(http, speech_clips[0].wav_bytes)
    assert reply.status_code == 200 and word_error_rate(speech_clips[0].text, reply.json()["text"]) <= 0.15


def test_a_request_past_its_deadline_is_a_504_and_stops(tmp_path, long_opus):
    body, windows = long_opus
    instance = start_serve(tmp_path, {"WHISPER_TRITON_REQUEST_TIMEOUT_S": str(DEADLINE_S),
                                      "WHISPER_TRITON_MAX_BODY_BYTES": str(32 * 1024 * 1024)})
    try:
        instance.wait_ready()
        before = stats(instance, "whisper_window")
        with httpx.Client(base_url=instance.url, timeout=120) as client:
            reply = client.post("/invocations?batch_size=1&beam_size=10", content=body,
                                headers={"Content-Type": "audio/ogg"})
        assert_refused(reply, 504, None)
        decoded = settled_count(instance, "whisper_window") - before
        assert decoded < windows, f"{decoded} of {windows} windows decoded past the deadline"
        assert metric(instance, "whisper_http_requests_total", route="/invocations", status="504") == 1
    finally:
        instance.terminate()


# ---- backpressure --------------------------------------------------------------------------------------
def test_a_burst_far_over_the_bound_is_served_or_refused_never_lost(hardened, http, speech_clips):
    clips = [speech_clips[k % len(speech_clips)] for k in range(20)]

    def post(clip):
        with httpx.Client(base_url=hardened.url, timeout=180) as client:
            return clip, client.post("/invocations", content=clip.wav_bytes, headers={"Content-Type": "audio/wav"})

    pings = []
    with ThreadPoolExecutor(max_workers=len(clips) + 1) as pool:
        futures = [pool.submit(post, clip) for clip in clips]
        with httpx.Client(base_url=hardened.url, timeout=2.0) as pinger:  # SageMaker's /ping limit
            while not all(f.done() for f in futures) and len(pings) < 200:
                pings.append(pinger.get("/ping").status_code)
                time.sleep(0.05)
        results = [f.result() for f in futures]  # an exception (a timeout, a reset) fails the test
    served = refused = 0
    for clip, reply in results:
        if reply.status_code == 200:
            served += 1
            assert word_error_rate(clip.text, reply.json()["text"]) <= 0.15
        else:
            refused += 1
            assert_refused(reply, 503, None)
            assert reply.json()["error"]["type"] == "service_unavailable" and reply.headers["retry-after"] == "3"
    assert served >= BOUND and refused >= 1 and served + refused == len(clips)
    assert pings and set(pings) == {200}
    assert post_wav(http, speech_clips[0].wav_bytes).status_code == 200  # healthy after


# ---- faults (destructive: last) ---------------------------------------------------------------------------
def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, full command line) of every process below `pid`, from /proc (ps would cut long lines)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            try:
                args = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found.append((child, args))
            stack.append(child)
    return found


def test_a_dead_window_stub_ends_serve_non_zero_and_in_flight_gets_json(hardened, speech_clips, long_opus):
    """Triton does not bring a killed stub back in time (requests to it hang), so serve stops Triton,
    answers what is in flight with 503 JSON, and exits non-zero for the platform to restart it."""
    body, _ = long_opus
    with ThreadPoolExecutor(max_workers=1) as pool, httpx.Client(base_url=hardened.url, timeout=120) as client:
        before = stats(hardened, "whisper_window")
        future = pool.submit(client.post, "/invocations?batch_size=1", content=body, headers={"Content-Type": "audio/ogg"})
        assert wait_until(lambda: stats(hardened, "whisper_window") > before, 120)
        stubs = [pid for pid, args in descendants(hardened.process.pid)
                 if "triton_python_backend_stub" in args and "/whisper_window/" in args]
        assert stubs, descendants(hardened.process.pid)
        for pid in stubs:
            os.kill(pid, signal.SIGKILL)
        reply = future.result()
    assert 500 <= reply.status_code < 600 and reply.json()["error"]["message"], reply.text
    assert "Traceback" not in reply.text
    assert hardened.process.wait(timeout=60) not in (None, 0)
    assert "stub of model whisper_window died" in hardened.log()


def test_triton_dying_mid_request_is_a_503_and_serve_exits_non_zero(tmp_path, long_opus):
    body, _ = long_opus
    instance = start_serve(tmp_path, {"WHISPER_TRITON_MAX_BODY_BYTES": str(32 * 1024 * 1024)})
    try:
        instance.wait_ready()
        with ThreadPoolExecutor(max_workers=1) as pool, httpx.Client(base_url=instance.url, timeout=120) as client:
            before = stats(instance, "whisper_window")
            future = pool.submit(client.post, "/invocations?batch_size=1", content=body,
                                 headers={"Content-Type": "audio/ogg"})
            assert wait_until(lambda: stats(instance, "whisper_window") > before, 120)
            for pid, args in descendants(instance.process.pid):
                if args.split() and args.split()[0].endswith("/tritonserver"):
                    os.kill(pid, signal.SIGKILL)
            reply = future.result()
        assert_refused(reply, 503, None)
        assert instance.process.wait(timeout=30) not in (None, 0)
        assert "tritonserver exited unexpectedly" in instance.log()
    finally:
        instance.terminate()
