"""Live transcription against a real `serve` (Triton + proxy, tiny.en on CPU): the unmodified
`openai` SDK holds a transcription session on /v1/realtime, recorded speech sent at real-time pace;
the same protocol on SageMaker's /invocations-bidirectional-stream; bad events answered with
`error` events and the session kept; refusal at connect beyond the session limit; the API key on
the WebSocket handshake."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest

from conftest import start_serve
from whisper_triton.pipeline.audio import encode_pcm16
from whisper_triton.pipeline.evaluation import word_error_rate

pytestmark = pytest.mark.triton

KEY = "live-test-key"
MAX_SESSIONS = 3
SR = 16_000
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


@pytest.fixture(scope="module")
def live_serve(tmp_path_factory):
    instance = start_serve(tmp_path_factory.mktemp("live"), {
        "WHISPER_TRITON_API_KEY": KEY, "WHISPER_TRITON_LIVE_MAX_SESSIONS": str(MAX_SESSIONS),
        "WHISPER_TRITON_LIVE_IDLE_TIMEOUT_S": "30"})
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


@pytest.fixture(scope="module")
def recorded():
    from testkit.real_speech import sentences

    return sentences(6, offset=4)


def ws_url(serve, path: str) -> str:
    return serve.url.replace("http://", "ws://") + path


def three_utterances(recorded, pause_s: float = 1.5) -> tuple[bytes, list[str]]:
    parts = [np.zeros(SR // 2, np.float32)]
    for samples, _ in recorded[:3]:
        parts += [samples, np.zeros(int(pause_s * SR), np.float32)]
    return encode_pcm16(np.concatenate(parts)), [text for _, text in recorded[:3]]


def check_three_transcripts(events: list[dict], texts: list[str]) -> None:
    completed = [e for e in events if e["type"] == COMPLETED]
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    assert len(completed) == len(committed) == len(started) == 3, [e["type"] for e in events]
    assert [e["item_id"] for e in completed] == [e["item_id"] for e in committed]
    for event, text in zip(completed, texts):
        assert word_error_rate(text, event["transcript"]) <= 0.2, (text, event["transcript"])
        deltas = [i for i, e in enumerate(events) if e["type"] == DELTA and e["item_id"] == event["item_id"]]
        assert deltas and max(deltas) < events.index(event)  # deltas first, the final replaces them


def test_the_openai_sdk_holds_a_session_of_three_utterances_at_real_time_pace(live_serve, recorded):
    from openai import AsyncOpenAI

    pcm, texts = three_utterances(recorded)
    step = 4_800  # 100 ms of 24 kHz 16-bit audio
    events: list[dict] = []

    async def main():
        client = AsyncOpenAI(api_key=KEY, base_url=live_serve.url + "/v1", websocket_base_url=ws_url(live_serve, "/v1"))
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
            await connection.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500,
                                   "prefix_padding_ms": 300}}}})
            started = time.monotonic()

            async def feed():
                for index in range(0, len(pcm), step):
                    await connection.input_audio_buffer.append(audio=base64.b64encode(pcm[index:index + step]).decode())
                    await asyncio.sleep(max(0.0, started + (index + step) / 48_000 - time.monotonic()))

            feeder = asyncio.ensure_future(feed())
            try:
                async with asyncio.timeout(120):
                    async for event in connection:
                        events.append(event.model_dump(exclude_none=True))
                        if sum(e["type"] == COMPLETED for e in events) == 3:
                            break
            finally:
                await feeder
            assert time.monotonic() - started >= len(pcm) / 48_000 - 0.2  # it was fed at real-time pace

    asyncio.run(main())
    assert events[0]["type"] == "session.created" and events[0]["session"]["type"] == "transcription"
    updated = [e for e in events if e["type"] == "session.updated"]
    assert updated and updated[0]["session"]["audio"]["input"]["transcription"]["language"] == "en"
    assert not [e for e in events if e["type"] == "error"]
    check_three_transcripts(events, texts)
    stopped = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert len(stopped) == 3


async def raw_session(serve, path: str, messages: list, until_completed: int, headers=None, pace_s: float = 0.0):
    """A plain WebSocket client: send `messages` (str: text frames, bytes: binary frames), collect events."""
    import websockets

    events: list[dict] = []
    async with websockets.connect(ws_url(serve, path), additional_headers=headers or {"Authorization": f"Bearer {KEY}"},
                                  max_size=None) as socket:
        async def feed():
            for message in messages:
                await socket.send(message)
                if pace_s:
                    await asyncio.sleep(pace_s)

        feeder = asyncio.ensure_future(feed())
        try:
            async with asyncio.timeout(120):
                while sum(e["type"] == COMPLETED for e in events) < until_completed:
                    events.append(json.loads(await socket.recv()))
        finally:
            feeder.cancel()
    return events


def appends(pcm: bytes, step: int = 9_600) -> list[str]:
    return [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step]).decode()})
            for i in range(0, len(pcm), step)]


def test_the_same_protocol_on_the_sagemaker_bidirectional_stream(live_serve, recorded):
    """SageMaker forwards payload parts as text or binary frames: both carry the JSON events here."""
    pcm, texts = three_utterances(recorded[3:6])
    messages = [message.encode() if index % 2 else message for index, message in enumerate(appends(pcm))]
    events = asyncio.run(raw_session(live_serve, "/invocations-bidirectional-stream", messages, 3, pace_s=0.05))
    assert events[0]["type"] == "session.created"
    check_three_transcripts(events, texts)


def test_bad_events_get_error_events_and_the_session_goes_on(live_serve, recorded):
    samples, text = recorded[0]
    manual = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": None}}}})
    bad = ["{not json", json.dumps({"type": "response.create", "event_id": "r1"}),
           json.dumps({"type": "input_audio_buffer.append", "audio": "***", "event_id": "a1"}),
           json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
               "format": {"type": "audio/pcm", "rate": 16000}}}}}),
           json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
               "transcription": {"language": "de"}}}}}),  # tiny.en speaks English only
           json.dumps({"type": "input_audio_buffer.commit", "event_id": "c0"})]
    good = appends(encode_pcm16(np.concatenate([samples, np.zeros(SR // 2, np.float32)])))
    events = asyncio.run(raw_session(live_serve, "/v1/realtime?intent=transcription",
                                     [manual] + bad + good + [json.dumps({"type": "input_audio_buffer.commit"})], 1))
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["invalid_json", "invalid_value", "invalid_value", "invalid_value",
                                          "invalid_value", "input_audio_buffer_commit_empty"]
    assert errors[1]["event_id"] == "r1" and errors[2]["param"] == "audio" and errors[2]["event_id"] == "a1"
    assert errors[4]["param"] == "session.audio.input.transcription.language"
    assert all(e["type"] == "invalid_request_error" and e["message"] for e in errors)
    completed = [e for e in events if e["type"] == COMPLETED]
    assert len(completed) == 1 and word_error_rate(text, completed[0]["transcript"]) <= 0.2


def test_sessions_beyond_the_limit_are_refused_at_connect_with_1013(live_serve):
    import websockets

    async def main():
        headers = {"Authorization": f"Bearer {KEY}"}
        held = []
        try:
            for _ in range(MAX_SESSIONS):
                socket = await websockets.connect(ws_url(live_serve, "/v1/realtime?intent=transcription"),
                                                  additional_headers=headers)
                held.append(socket)
                assert json.loads(await socket.recv())["type"] == "session.created"
            async with websockets.connect(ws_url(live_serve, "/invocations-bidirectional-stream"),
                                          additional_headers=headers) as refused:
                event = json.loads(await refused.recv())
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await refused.recv()
            assert event["type"] == "error" and event["error"]["code"] == "server_busy"
            assert closed.value.rcvd.code == 1013 and "live sessions" in closed.value.rcvd.reason
        finally:
            for socket in held:
                await socket.close()
        # once one closes, a new session is admitted
        for _ in range(50):
            async with websockets.connect(ws_url(live_serve, "/v1/realtime?intent=transcription"),
                                          additional_headers=headers) as again:
                first = json.loads(await again.recv())
            if first["type"] == "session.created":
                return
            await asyncio.sleep(0.1)
        raise AssertionError("no session admitted after the others closed")

    asyncio.run(main())


def test_the_api_key_is_required_on_the_websocket(live_serve):
    import websockets

    async def attempt(headers):
        async with websockets.connect(ws_url(live_serve, "/v1/realtime?intent=transcription"),
                                      additional_headers=headers) as socket:
            return json.loads(await socket.recv())["type"]

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(attempt(headers))
        assert refused.value.response.status_code == 403
    assert asyncio.run(attempt({"x-api-key": KEY})) == "session.created"


def test_another_intent_is_refused_with_an_error_event(live_serve):
    import websockets

    async def main():
        async with websockets.connect(ws_url(live_serve, "/v1/realtime?model=gpt-realtime"),
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as socket:
            event = json.loads(await socket.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await socket.recv()
        return event, closed.value.rcvd.code

    event, code = asyncio.run(main())
    assert event["error"]["code"] == "unsupported_intent" and code == 1008


def test_live_metrics_count_sessions_and_utterances(live_serve, recorded):
    import httpx

    samples, _ = recorded[2]  # one utterance of this test's own, committed by hand
    manual = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": None}}}})
    asyncio.run(raw_session(live_serve, "/v1/realtime?intent=transcription",
                            [manual] + appends(encode_pcm16(samples)) + [json.dumps({"type": "input_audio_buffer.commit"})], 1))

    text = httpx.get(live_serve.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("whisper_live_") and " " in line}
    assert values.get('whisper_live_utterances_total{outcome="completed"}', 0) >= 1
    assert values.get('whisper_live_final_seconds_count', 0) >= 1


def test_whisper_invoke_realtime_live_streams_a_file(live_serve, recorded, tmp_path, capsys):
    import io

    from speech import encode
    from whisper_triton.clients.live import file_chunks, run_live
    from whisper_triton.clients.realtime import main

    samples, text = recorded[1]
    path = tmp_path / "prompt.wav"
    path.write_bytes(encode(samples, 16_000, "wav", "pcm_s16le"))
    out, err = io.StringIO(), io.StringIO()
    finals = asyncio.run(run_live(ws_url(live_serve, ""), file_chunks(path, pace=False), KEY, "en", out, err))
    assert len(finals) == 1 and word_error_rate(text, finals[0]) <= 0.2
    assert out.getvalue() == finals[0] + "\n"
    # an endpoint name is not a WebSocket: the CLI says what --live needs
    assert main(["my-endpoint", "--live", str(path)]) == 1
    assert "WebSocket URL" in capsys.readouterr().err


# ---- session limits (a serve of its own: short idle and session limits) ---------------------------------
IDLE_S, SESSION_S = 2.0, 6.0


@pytest.fixture(scope="module")
def limited_serve(tmp_path_factory):
    instance = start_serve(tmp_path_factory.mktemp("live-limits"), {
        "WHISPER_TRITON_LIVE_IDLE_TIMEOUT_S": str(IDLE_S), "WHISPER_TRITON_LIVE_MAX_SESSION_S": str(SESSION_S)})
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


async def _events_until_closed(socket, sender=None, limit: int = 500) -> tuple[list[dict], int, str]:
    """Every event until the server closes the session (bounded in count), with the close code and reason."""
    import websockets

    events = []
    task = asyncio.ensure_future(sender(socket)) if sender else None
    try:
        for _ in range(limit):
            try:
                events.append(json.loads(await asyncio.wait_for(socket.recv(), timeout=60)))
            except websockets.ConnectionClosed as closed:
                return events, closed.rcvd.code, closed.rcvd.reason
        raise AssertionError(f"the session was not closed after {limit} events")
    finally:
        if task:
            task.cancel()


def test_an_idle_session_is_closed_with_an_error_event(limited_serve):
    import websockets

    async def main():
        async with websockets.connect(ws_url(limited_serve, "/v1/realtime?intent=transcription")) as socket:
            return await _events_until_closed(socket)

    events, code, reason = asyncio.run(main())
    assert events[0]["type"] == "session.created"
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "idle_timeout"
    assert code == 1000 and "No event" in reason


def test_a_session_past_its_limit_is_closed_though_it_keeps_sending(limited_serve):
    import websockets

    silence = base64.b64encode(encode_pcm16(np.zeros(int(0.5 * 24_000), np.float32))).decode()

    async def keep_sending(socket):
        for _ in range(100):  # 0.5 s of audio every 0.5 s, far past the limit if nothing stopped it
            await socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
            await asyncio.sleep(0.5)

    async def main():
        async with websockets.connect(ws_url(limited_serve, "/v1/realtime?intent=transcription")) as socket:
            return await _events_until_closed(socket, keep_sending)

    events, code, reason = asyncio.run(main())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "session_expired"
    assert code == 1008 and "limit" in reason


def test_an_event_over_the_size_limit_closes_the_session_with_1009(limited_serve):
    import websockets

    from whisper_triton.contract.realtime import MAX_EVENT_BYTES

    async def main():
        async with websockets.connect(ws_url(limited_serve, "/v1/realtime?intent=transcription"),
                                      max_size=None) as socket:
            assert json.loads(await socket.recv())["type"] == "session.created"
            await socket.send("x" * (MAX_EVENT_BYTES + 1))
            return await _events_until_closed(socket)

    events, code, _ = asyncio.run(main())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "event_too_large"
    assert code == 1009
