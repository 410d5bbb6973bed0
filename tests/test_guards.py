"""The HTTP guards without Triton: request ids, the API key, admission (429/503 with Retry-After),
and a disconnecting client cancelling its route. A small app with the real middleware."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from whisper_triton.http.admission import Admission
from whisper_triton.http.guards import REQUEST_ID, Guards, RequestIdFilter, request_id_from
from whisper_triton.settings import load_settings


def guarded_app(**settings) -> tuple[FastAPI, dict]:
    config = load_settings(**settings)
    admission = Admission(config.max_requests_in_flight, config.max_queued_audio_seconds, config.retry_after_s)
    app = FastAPI()
    seen: dict = {"ids": [], "gate": None, "cancelled": 0}
    app.add_middleware(Guards, settings=config, admission=admission)

    @app.get("/ping")
    async def ping():
        return {"status": "ok"}

    @app.post("/invocations")
    @app.post("/v1/audio/transcriptions")
    async def work(request: Request):
        await request.body()  # as every real route does before its work (the disconnect watch starts after it)
        seen["ids"].append(REQUEST_ID.get())
        if seen["gate"] is not None:
            try:
                await seen["gate"].wait()
            except asyncio.CancelledError:
                seen["cancelled"] += 1
                raise
        return {"ok": True}

    @app.post("/boom")
    async def boom():
        raise RuntimeError("/secret/path/internal_name exploded")

    app.state.admission = admission
    return app, seen


def test_request_id_is_kept_when_sane_and_made_otherwise():
    app, seen = guarded_app()
    with TestClient(app) as client:
        reply = client.post("/invocations", headers={"X-Request-Id": "job-42.a:b"})
        assert reply.headers["x-request-id"] == "job-42.a:b" and seen["ids"][-1] == "job-42.a:b"
        for hostile in ["x" * 500, "bad id with spaces", "<script>", "-leading-dash", "é".encode()]:
            reply = client.post("/invocations", headers={"X-Request-Id": hostile})
            made = reply.headers["x-request-id"]
            assert made != hostile and len(made) == 32 and seen["ids"][-1] == made
        assert client.get("/ping").headers["x-request-id"]
        assert client.get("/nope").headers["x-request-id"]  # 404s too


def test_unexpected_error_is_a_json_500_without_internals():
    app, _ = guarded_app()
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.post("/boom", headers={"X-Request-Id": "r1"})
    assert reply.status_code == 500 and reply.headers["x-request-id"] == "r1"
    error = reply.json()["error"]
    assert error["type"] == "internal_error" and "r1" in error["message"]
    assert "secret" not in reply.text and "RuntimeError" not in reply.text and "Traceback" not in reply.text


def test_log_lines_carry_the_request_id(caplog):
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    token = REQUEST_ID.set("abc")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    assert record.request_id == "abc"
    assert request_id_from(None) != request_id_from(None)


def test_api_key_is_off_by_default():
    app, _ = guarded_app()
    with TestClient(app) as client:
        assert client.post("/invocations").status_code == 200


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": "Basic s3cret-key"}, 401),
    ({"Authorization": "Bearer s3cret-key-longer"}, 401),
    ({"Authorization": "Bearer s3cret-key"}, 200),
    ({"Authorization": "bearer s3cret-key"}, 200),
    ({"x-api-key": "s3cret-key"}, 200),
    ({"x-api-key": ""}, 401),
])
def test_api_key_when_set(headers, status, caplog):
    app, _ = guarded_app(api_key="s3cret-key")
    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        reply = client.post("/invocations", headers=headers)
        assert reply.status_code == status
        if status == 401:
            assert reply.json()["error"]["param"] == "Authorization"
            assert reply.headers["www-authenticate"] == "Bearer"
            assert "s3cret" not in reply.text
        assert client.get("/ping").status_code == 200  # the health check sends no key
        assert client.post("/v1/audio/transcriptions", headers=headers).status_code == status
    assert "s3cret-key" not in caplog.text


def test_api_key_is_not_in_the_settings_repr():
    assert "s3cret" not in repr(load_settings(api_key="s3cret-key"))


async def _burst(app, seen, path: str, n: int):
    seen["gate"] = asyncio.Event()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        tasks = [asyncio.create_task(client.post(path)) for _ in range(n)]
        for _ in range(200):  # until the bound is reached and the rest refused
            await asyncio.sleep(0.01)
            if sum(t.done() for t in tasks) >= n - app.state.admission.max_requests:
                break
        ping = await client.get("/ping")
        seen["gate"].set()
        replies = await asyncio.gather(*tasks)
        after = await client.post(path)
    return replies, ping, after


@pytest.mark.parametrize("path,status", [("/invocations", 503), ("/v1/audio/transcriptions", 429)])
def test_beyond_the_bound_requests_are_refused_at_once(path, status):
    app, seen = guarded_app(max_requests_in_flight=2, retry_after_s=7)
    replies, ping, after = asyncio.run(_burst(app, seen, path, 10))
    served = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == status]
    assert len(served) == 2 and len(refused) == 8, [r.status_code for r in replies]
    for reply in refused:
        assert reply.headers["retry-after"] == "7"
        assert reply.json()["error"]["type"] in ("service_unavailable", "rate_limit_exceeded")
    assert ping.status_code == 200
    assert after.status_code == 200 and app.state.admission.requests == 0


def test_audio_seconds_bound():
    admission = Admission(10, 100.0, 3, prior_speed=10.0, clock=lambda: 0.0)

    async def run():
        async with admission.audio(500.0):  # alone: admitted however long
            with pytest.raises(Exception) as info:
                async with admission.audio(1.0):
                    pass
            # Retry-After: the 500 s in flight take 50 s at the prior speed of 10 audio seconds per second
            assert info.value.status == 503 and info.value.headers() == {"Retry-After": "50"}
        async with admission.audio(60.0):
            async with admission.audio(40.0):
                assert admission.audio_seconds == 100.0
        assert admission.audio_seconds == 0

    asyncio.run(run())


def test_a_client_that_disconnects_cancels_its_route():
    app, seen = guarded_app()
    seen["gate"] = asyncio.Event()
    sent: list = []

    async def run():
        messages = [{"type": "http.request", "body": b"audio", "more_body": False}]
        disconnect = asyncio.Event()

        async def receive():
            if messages:
                return messages.pop(0)
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1), "server": ("test", 80)}
        async with app.router.lifespan_context(app):
            call = asyncio.create_task(app(scope, receive, send))
            for _ in range(100):
                await asyncio.sleep(0.01)
                if seen["ids"]:
                    break
            assert app.state.admission.requests == 1
            disconnect.set()
            await asyncio.wait_for(call, 5)

    asyncio.run(run())
    assert seen["cancelled"] == 1 and app.state.admission.requests == 0
    assert not [m for m in sent if m["type"] == "http.response.start"]
