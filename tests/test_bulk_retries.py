"""Bounded retries and what a resumed run sends again, through the whole `whisper-transcribe-bucket
--via local` command against moto's S3 and a STAND-IN container (test only) whose answers are chosen
per file: 503 twice then a transcript, 500 always, 400 always. The real container end to end is
tests/test_bulk.py."""

from __future__ import annotations

import json

import boto3
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from conftest import reset_moto
from whisper_triton.bulk.cli import main
from whisper_triton.sagemaker_local.emulator import serve_in_thread

BUCKET = "bulk-retries"


def standin() -> FastAPI:
    app = FastAPI()
    app.state.calls = {}

    @app.get("/execution-parameters")
    async def execution_parameters():
        return JSONResponse({"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 6})

    @app.post("/invocations")
    async def invocations(request: Request):
        body = (await request.body()).decode()
        calls = app.state.calls[body] = app.state.calls.get(body, 0) + 1
        if body == "flaky" and calls <= 2:
            return JSONResponse({"error": {"message": "busy", "type": "service_unavailable", "param": None}},
                                status_code=503, headers={"Retry-After": "0"})
        if body == "broken":
            return JSONResponse({"error": {"message": "the engine failed", "type": "engine_error", "param": None}},
                                status_code=500)
        if body == "corrupt":
            return JSONResponse({"error": {"message": "not audio", "type": "invalid_audio", "param": "audio"}},
                                status_code=400)
        return JSONResponse({"text": f"said {body}", "language": "en", "duration": 2.5,
                             "segments": [{"id": 0, "start": 0.0, "end": 2.5, "text": f" said {body}"}]})

    return app


@pytest.fixture
def bucket(moto_url, monkeypatch):
    reset_moto(moto_url)
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", moto_url)):
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for name in ("flaky", "broken", "corrupt", "fine"):
        s3.put_object(Bucket=BUCKET, Key=f"in/{name}.wav", Body=name.encode())
    return s3


def manifest(s3) -> dict[str, dict]:
    body = s3.get_object(Bucket=BUCKET, Key="out/manifest.jsonl")["Body"].read().decode()
    return {json.loads(line)["key"]: json.loads(line) for line in body.splitlines()}


def test_retries_are_bounded_and_resume_sends_only_what_may_succeed(bucket):
    app = standin()
    with serve_in_thread(app) as container:
        argv = [f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out/", "--via", "local", "--url", container.url, "--retries", "2",
                "--no-progress", "--formats", "json,text"]
        assert main(argv) == 1
        records = manifest(bucket)
        assert (records["in/flaky.wav"]["status"], records["in/flaky.wav"]["attempts"]) == ("ok", 3)
        assert (records["in/fine.wav"]["status"], records["in/fine.wav"]["attempts"]) == ("ok", 1)
        broken, corrupt = records["in/broken.wav"], records["in/corrupt.wav"]
        assert (broken["status"], broken["attempts"], broken["error_kind"]) == ("failed", 3, "server")
        assert broken["error"] == "500: the engine failed"
        assert (corrupt["status"], corrupt["attempts"], corrupt["error_kind"]) == ("failed", 1, "client")
        assert app.state.calls == {"flaky": 3, "broken": 3, "corrupt": 1, "fine": 1}
        text = bucket.get_object(Bucket=BUCKET, Key="out/flaky.wav.txt")["Body"].read().decode()
        assert text == "said flaky\n"

        # resumed: the server failure may pass now and is sent again; the refused file and the done ones are not
        assert main(argv) == 1
        assert app.state.calls == {"flaky": 3, "broken": 6, "corrupt": 1, "fine": 1}
        summary = json.loads(bucket.get_object(Bucket=BUCKET, Key="out/summary.json")["Body"].read())
        assert summary["files"]["already_done"] == 2 and summary["files"]["refused_before"] == 1
        assert summary["files"]["failed"] == 1
        # --retry-failed sends the refused file too
        assert main([*argv, "--retry-failed"]) == 1
        assert app.state.calls["corrupt"] == 2 and app.state.calls["fine"] == 1
