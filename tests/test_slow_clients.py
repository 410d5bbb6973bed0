"""Slow, vanishing and noisy clients against a real `serve` (issue 21, items 5 and 6): a body that
trickles or stops is cut with 408 and its slot released; a reader that stops reading a streamed answer
has it ended; megabytes of JSON keys do not stop /ping; invented methods and paths add no metric
series; client text is echoed short; a client gone mid-upload is no error; a path cannot forge a log line.

The session's `serve` (defaults) where defaults do; one more serve for the module (`limited`) with
small body timeouts and one request in flight, so a held slot is visible as a 503."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import free_port, start_serve

pytestmark = pytest.mark.triton

BODY_TIMEOUT_S = 4
IDLE_TIMEOUT_S = 2
ANNOUNCED = 6_000_000  # a 6 MB body announced, never sent whole


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    instance = start_serve(tmp_path_factory.mktemp("limited"), {
        "WHISPER_TRITON_CLIENT_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "WHISPER_TRITON_CLIENT_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
        "WHISPER_TRITON_MAX_REQUESTS_IN_FLIGHT": "1",
    })
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


def open_upload(url: str, path: str = "/invocations", length: int = ANNOUNCED) -> socket.socket:
    """A raw connection that announced a `length`-byte body and sent none of it yet."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    return sock


def trickle_until_answered(sock: socket.socket, interval_s: float, limit_s: float) -> bytes:
    """Send one byte every `interval_s` until the server answers (or `limit_s` passes): its answer."""
    sock.setblocking(False)
    reply, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline and b"\r\n\r\n" not in reply:
        try:
            sock.send(b"R")
        except OSError:  # the server closed after answering: read what it sent
            pass
        end = time.monotonic() + interval_s
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            except OSError:
                return reply
            if not chunk:
                return reply
            reply += chunk
    return reply


def read_answer(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    reply = b""
    try:
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except OSError:
        pass
    return reply


def json_error(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


def assert_slot_free(instance) -> None:
    """/ping answers and the one request slot is free again: a junk body is judged (400), not refused
    (503). A few tries: the server may see the previous client go a moment after this request arrives."""
    assert httpx.get(instance.url + "/ping", timeout=5).status_code == 200
    for _ in range(20):
        reply = httpx.post(instance.url + "/invocations", content=b"not audio at all", timeout=30,
                           headers={"Content-Type": "audio/wav"})
        if reply.status_code != 503:
            break
        time.sleep(0.25)
    assert reply.status_code == 400, reply.text


# ---- bodies that trickle or stop ----------------------------------------------------------------------
def test_a_trickled_body_is_cut_with_408_and_its_slot_freed(limited):
    # a byte every 0.5 s: never idle for IDLE_TIMEOUT_S, so the whole-body limit is the one that ends it
    with open_upload(limited.url) as sock:
        reply = trickle_until_answered(sock, 0.5, limit_s=BODY_TIMEOUT_S + 20)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    error = json_error(reply)
    assert error["param"] == "body" and error["type"] == "request_timeout"
    assert "CLIENT_BODY_TIMEOUT_S" in error["message"]
    assert_slot_free(limited)


def test_a_body_that_stops_is_cut_with_408(limited):
    with open_upload(limited.url) as sock:
        sock.sendall(b"RIFF")
        reply = read_answer(sock, limit_s=IDLE_TIMEOUT_S + 20)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"connection: close" in reply.lower()
    assert "CLIENT_IDLE_TIMEOUT_S" in json_error(reply)["message"]
    assert_slot_free(limited)


# ---- logs ---------------------------------------------------------------------------------------------
FORGED = "FORGED-BY-A-CLIENT"


def test_a_path_cannot_forge_a_log_line(limited):
    # the held slot makes the next request a logged refusal, and that line quotes the request's path
    forged_path = "/invocations%0A2026-01-01%2000:00:00,000%20INFO%20whisper_triton%20[-]:%20" + FORGED
    with open_upload(limited.url) as holder:
        holder.sendall(b"RI")
        statuses = []
        for _ in range(20):  # the holder's request may reach admission a moment after its headers
            statuses.append(httpx.post(limited.url + forged_path, content=b"x", timeout=10).status_code)
            if statuses[-1] == 503:
                break
            time.sleep(0.1)
    assert statuses[-1] == 503, statuses
    forged_lines = [line for line in limited.log().splitlines() if line.startswith(FORGED) or
                    re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO whisper_triton \[-\]: " + FORGED, line)]
    assert forged_lines == []
    assert_slot_free(limited)


def invocations_answered(instance) -> float:
    text = httpx.get(instance.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('whisper_http_requests_total{') and 'route="/invocations"' in line)


def test_a_client_gone_mid_upload_is_not_an_unexpected_error(limited):
    before = invocations_answered(limited)
    sock = open_upload(limited.url, length=200_000)
    sock.sendall(b"RIFF" + b"\0" * 50_000)
    sock.close()
    deadline = time.monotonic() + 30
    while invocations_answered(limited) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert invocations_answered(limited) > before  # the server has dealt with it (and logged what it logs)
    log = limited.log()
    assert "Traceback" not in log and "ClientDisconnect" not in log and "unexpected error" not in log
    assert_slot_free(limited)


# ---- the shared serve: flood, metrics, echo ---------------------------------------------------------
def test_ping_answers_while_megabytes_of_json_keys_are_refused(serve):
    # four ~5.6 MB bodies of 400,000 unknown keys at once: each a 400 naming `body`, /ping 200 throughout
    payload = {f"k{i:06d}": 1 for i in range(400_000)}
    payload["audio"] = "UklGRg=="
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(httpx.post, serve.url + "/invocations", content=body, headers=headers, timeout=120)
                  for _ in range(4)]
        pings, slowest = [], 0.0
        for _ in range(200):  # bounded: at most 200 pings, each given 2 s (SageMaker's health check)
            started = time.perf_counter()
            try:
                pings.append(httpx.get(serve.url + "/ping", timeout=2).status_code)
            except httpx.TimeoutException:
                pings.append("timeout")
            slowest = max(slowest, time.perf_counter() - started)
            if all(flood.done() for flood in floods):
                break
        replies = [flood.result() for flood in floods]
    print(f"slowest /ping during the flood: {slowest:.3f} s over {len(pings)} pings")
    assert set(pings) == {200}, pings
    for reply in replies:
        assert reply.status_code == 400, reply.text[:300]
        assert reply.json()["error"]["param"] == "body"
        assert "names" in reply.json()["error"]["message"]


def metric_series(serve) -> set[str]:
    text = httpx.get(serve.url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_invented_methods_and_paths_add_no_metric_series(serve):
    with httpx.Client(base_url=serve.url, timeout=10) as client:
        client.request("BREW", "/ping")  # the `other` method's series exist from here on
        client.request("BREW", "/no-such-route-0")
        metric_series(serve)
        before = metric_series(serve)
        for i in range(300):
            path = "/ping" if i % 2 else f"/no-such-route-{i}"
            assert client.request(f"M{i}X", path).status_code in (404, 405)
    after = metric_series(serve)
    print(f"/metrics series: {len(before)} before, {len(after)} after 300 invented methods and paths")
    # only series these requests could add are looked at: an earlier test's request that ends meanwhile
    # may add its own (its route, its status)
    added = [series for series in after - before
             if 'route="/ping"' in series or 'route="unmatched"' in series or 'method="other"' in series
             or re.search(r"M\d+X|no-such-route", series)]
    assert added == []


def test_long_client_text_is_not_echoed_whole(serve):
    junk = "a" * 7_000
    replies = [
        httpx.post(serve.url + "/invocations", content=b"x", timeout=10,
                   headers={"Accept": "audio/x-" + junk, "Content-Type": "audio/wav"}),
        httpx.post(serve.url + "/invocations", content=b"x", timeout=10, headers={"Content-Type": "text/x-" + junk}),
        httpx.post(serve.url + "/invocations?stream=" + junk, content=b"x", timeout=10,
                   headers={"Content-Type": "audio/wav"}),
    ]
    assert [reply.status_code for reply in replies] == [406, 415, 400]
    for reply in replies:
        assert len(reply.content) < 1_000, reply.text[:200]
        assert "a" * 100 not in reply.text


# ---- a reader that stops reading (a real uvicorn, with the middleware serve puts around every route) ----
def test_a_stream_its_reader_stopped_reading_is_ended():
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Route

    from whisper_triton.http.client_limits import ClientLimits, ClosingStreamingResponse

    ended = threading.Event()

    async def endless(request):
        async def chunks():
            try:
                while True:
                    yield b"data: " + b"x" * 65_536 + b"\n\n"
                    await asyncio.sleep(0)
            finally:
                ended.set()  # the generator closed: its request no longer holds anything

        return ClosingStreamingResponse(chunks(), media_type="text/event-stream")

    app = ClientLimits(Starlette(routes=[Route("/events", endless)]), body_timeout_s=5, idle_timeout_s=5,
                       send_timeout_s=1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that barely reads, then stops
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        assert ended.wait(timeout=30), "the stream is still being produced for a reader that stopped reading"
        sock.close()
    finally:
        server.should_exit = True
        thread.join(timeout=15)
