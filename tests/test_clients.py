"""The invoke clients: formats, throttling retries, and the real-time and async clients through the
runtime emulator (moto for S3 and the control plane) in front of the stand-in container of
test_emulator.py. All servers are real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading

import boto3
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from test_emulator import BUCKET, create_endpoint, point_boto3_at, reset_moto, standin_container_app
from whisper_triton.clients import AsyncInvokeOptions, InvokeError, InvokeOptions, transcribe_async, transcribe_file
from whisper_triton.clients.asynchronous import main as async_main
from whisper_triton.clients.formats import accept_header, output_path_for, render
from whisper_triton.clients.realtime import main as realtime_main
from whisper_triton.clients.realtime import runtime_client, transcribe_bytes
from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

# ---------------------------------------------------------------- formats


def test_render_every_format_from_json():
    body = json.dumps({"text": " Hello there. ", "language": "en", "duration": 2.5}).encode()
    assert render(body, "application/json", "text") == "Hello there.\n"
    assert json.loads(render(body, "application/json; charset=utf-8", "json"))["duration"] == 2.5
    assert render(body, "application/json", "srt") == "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n"
    assert render(body, "application/json", "vtt") == "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n"


def test_render_uses_segments_when_the_answer_has_them():
    body = json.dumps({"text": "a b", "duration": 3725.25, "segments": [
        {"start": 0.0, "end": 1.2, "text": " a"}, {"start": 3723.0, "end": 3725.25, "text": "b "}]}).encode()
    assert render(body, "application/json", "srt") == (
        "1\n00:00:00,000 --> 00:00:01,200\na\n\n2\n01:02:03,000 --> 01:02:05,250\nb\n")
    assert render(body, "application/json", "vtt").splitlines()[5] == "01:02:03.000 --> 01:02:05.250"


def test_render_passes_native_answers_through_and_handles_silence():
    assert render(b"1\n00:00:00,000 --> 00:00:01,000\nhi\n", "application/x-subrip", "srt").startswith("1\n")
    assert render(b"hello ", "text/plain; charset=utf-8", "text") == "hello\n"
    assert render(b'{"text": "", "duration": 1.0}', "application/json", "srt") == ""
    assert render(b'{"text": "", "duration": 1.0}', "application/json", "vtt") == "WEBVTT\n\n"
    with pytest.raises(ValueError, match="Unknown output format"):
        render(b"x", "text/plain", "docx")


def test_accept_headers_and_output_names(tmp_path):
    assert accept_header("text") == "text/plain"
    assert accept_header("json") == "application/json"
    assert accept_header("srt") == "application/x-subrip, application/json;q=0.9"
    assert accept_header("vtt") == "text/vtt, application/json;q=0.9"
    assert output_path_for(tmp_path / "a.wav", "srt") == tmp_path / "a.wav.srt"
    assert output_path_for(tmp_path / "a.mp3", "srt") != output_path_for(tmp_path / "a.wav", "srt")


# ---------------------------------------------------------------- throttling (a runtime that throttles)


def throttling_runtime_app(throttle_first: int) -> FastAPI:
    """A SageMaker-runtime stand-in that throttles the first N calls, as the service does under load."""
    app = FastAPI()
    app.state.calls = 0
    lock = threading.Lock()

    @app.post("/endpoints/{name}/invocations")
    async def invocations(name: str, request: Request):
        with lock:
            app.state.calls += 1
            call = app.state.calls
        if call <= throttle_first:
            return JSONResponse({"message": "Rate exceeded"}, status_code=400,
                                headers={"x-amzn-ErrorType": "ThrottlingException"})
        return Response(json.dumps({"text": "after throttling", "duration": 1.0}), media_type="application/json")

    return app


def test_real_time_client_retries_throttling(monkeypatch):
    app = throttling_runtime_app(throttle_first=2)
    with serve_in_thread(app) as runtime:
        point_boto3_at(monkeypatch, "http://127.0.0.1:9", runtime.url)  # control plane unused here
        client = runtime_client(max_attempts=4, retry_mode="standard")
        transcript = transcribe_bytes(b"audio", InvokeOptions("ep", "text"), client=client)
        assert transcript.rendered == "after throttling\n"
        assert app.state.calls == 3


def test_real_time_client_gives_up_after_max_attempts(monkeypatch):
    app = throttling_runtime_app(throttle_first=100)
    with serve_in_thread(app) as runtime:
        point_boto3_at(monkeypatch, "http://127.0.0.1:9", runtime.url)
        client = runtime_client(max_attempts=2, retry_mode="standard")
        with pytest.raises(InvokeError, match="ThrottlingException: Rate exceeded"):
            transcribe_bytes(b"audio", InvokeOptions("ep", "text"), client=client)
        assert app.state.calls == 2


# ---------------------------------------------------------------- through the emulator


@pytest.fixture(scope="module")
def container():
    with serve_in_thread(standin_container_app()) as running:
        yield running


@pytest.fixture
def local_aws(moto_url, container, monkeypatch):
    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    with serve_in_thread(create_app(EmulatorOptions(container_url=container.url))) as emulator:
        point_boto3_at(monkeypatch, moto_url, emulator.url)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield emulator.url


def test_real_time_client_every_format(local_aws, tmp_path):
    create_endpoint("rt")
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"z" * 321)
    assert transcribe_file(clip, InvokeOptions("rt", "text")).rendered == "received 321 bytes\n"  # text/plain, as sent
    as_json = json.loads(transcribe_file(clip, InvokeOptions("rt", "json", language="de")).rendered)
    assert as_json["content_type"] == "audio/wav" and as_json["custom_attributes"] == "language=de"
    assert transcribe_file(clip, InvokeOptions("rt", "srt")).rendered == "1\n00:00:00,000 --> 00:00:01,500\nreceived 321 bytes\n"
    assert transcribe_file(clip, InvokeOptions("rt", "vtt")).rendered.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n")


def test_real_time_script_writes_next_to_the_input_and_reports_errors(local_aws, tmp_path, capsys):
    create_endpoint("rt")
    good, bad = tmp_path / "good.flac", tmp_path / "bad.wav"
    good.write_bytes(b"g" * 10)
    bad.write_bytes(b"CORRUPT")
    assert realtime_main(["rt", str(good), str(bad), "--format", "vtt", "--write"]) == 1
    assert (tmp_path / "good.flac.vtt").read_text() == "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nreceived 10 bytes\n"
    err = capsys.readouterr().err
    assert "bad.wav: The model refused the request (400)" in err and "invalid_audio" in err
    assert realtime_main(["no-such-endpoint", str(good)]) == 1
    assert "Endpoint no-such-endpoint of account 123456789012 not found." in capsys.readouterr().err


def test_async_client_transcribes_a_folder_with_none_lost(local_aws, tmp_path):
    create_endpoint("as", async_output=f"s3://{BUCKET}/out", async_failure=f"s3://{BUCKET}/failed", max_concurrent=3)
    folder = tmp_path / "recordings"
    (folder / "nested").mkdir(parents=True)
    expected = {}
    for i in range(14):
        path = folder / ("nested" if i % 3 == 0 else "") / f"clip{i:02d}.wav"
        data = b"CORRUPT" if i in (4, 9) else b"a" * (100 + i)
        path.write_bytes(data)
        expected[path] = None if data == b"CORRUPT" else f"received {len(data)} bytes\n"
    (folder / "notes.md").write_text("not audio")  # skipped by folder expansion
    from whisper_triton.clients.asynchronous import expand

    files = expand([folder])
    assert sorted(files) == sorted(expected)
    options = AsyncInvokeOptions("as", BUCKET, output_format="text", concurrency=6, poll_initial_s=0.05,
                                 poll_max_s=0.2, timeout_s=60)
    results = transcribe_async(files, options, progress=False)
    assert [r.input for r in results] == files  # one result per input, in order
    for result in results:
        if expected[result.input] is None:
            assert not result.ok and "not a readable audio file" in result.error
            assert result.written == result.input.with_name(result.input.name + ".error.txt")
            assert "not a readable audio file" in result.written.read_text()
        else:
            assert result.ok, result.error
            assert result.written.read_text() == expected[result.input]
            assert result.output_location == f"s3://{BUCKET}/out/{result.inference_id}.out"
    assert sum(r.ok for r in results) == 12


def test_async_script_with_subtitles_and_a_bad_endpoint(local_aws, tmp_path, capsys):
    create_endpoint("as", async_output=f"s3://{BUCKET}/out", async_failure=f"s3://{BUCKET}/failed")
    clip = tmp_path / "one.wav"
    clip.write_bytes(b"b" * 42)
    assert async_main(["as", str(tmp_path), "--bucket", BUCKET, "--format", "srt", "--poll-initial", "0.05",
                       "--no-progress"]) == 0
    assert (tmp_path / "one.wav.srt").read_text() == "1\n00:00:00,000 --> 00:00:01,500\nreceived 42 bytes\n"
    assert "1 of 1 transcribed; 0 failed" in capsys.readouterr().err
    assert async_main(["no-such-endpoint", str(clip), "--bucket", BUCKET, "--no-progress"]) == 1
    assert (tmp_path / "one.wav.error.txt").read_text().startswith("Endpoint no-such-endpoint of account 123456789012 not found.")
    assert async_main(["as", str(clip), "--bucket", "no-such-bucket-x", "--no-progress"]) == 1
    assert "NoSuchBucket" in (tmp_path / "one.wav.error.txt").read_text()
