"""Async jobs whose container fails end in a failure object, never in silence: a container that
crashes with a 500, one that drops the connection mid-request, and one that is gone altogether.
Real servers on 127.0.0.1 (moto, the emulator, small failing containers); unmodified boto3."""

from __future__ import annotations

import json
import socket
import threading

import boto3
import pytest
from botocore.config import Config
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from conftest import free_port, reset_moto
from test_emulator import BUCKET, create_endpoint, point_boto3_at, wait_for_object
from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread


def crashing_container() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping():
        return PlainTextResponse("")

    @app.post("/invocations")
    async def invocations(request: Request):
        await request.body()
        raise RuntimeError("the model crashed")  # Starlette answers a bare 500

    return app


class DroppingContainer:
    """Accepts the connection, reads the request, then closes it without an answer (a dead process)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def failing_runtime(moto_url, monkeypatch):
    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    dropping = DroppingContainer()
    with serve_in_thread(crashing_container()) as crashing:
        options = EmulatorOptions(container_url=crashing.url, endpoints={
            "dropping": dropping.url, "gone": f"http://127.0.0.1:{free_port()}"})
        with serve_in_thread(create_app(options)) as emulator:
            point_boto3_at(monkeypatch, moto_url, emulator.url)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield boto3.client("sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}))
    dropping.server.close()


@pytest.mark.parametrize("endpoint,expected_type", [("crashing", None), ("dropping", "container_unreachable"),
                                                    ("gone", "container_unreachable")])
def test_a_failing_container_writes_the_failure_object(failing_runtime, endpoint, expected_type):
    create_endpoint(endpoint, async_output=f"s3://{BUCKET}/out", async_failure=f"s3://{BUCKET}/failed")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="in/audio.wav", Body=b"RIFF audio bytes")
    reply = failing_runtime.invoke_endpoint_async(EndpointName=endpoint, InputLocation=f"s3://{BUCKET}/in/audio.wav")
    failure = wait_for_object(s3, reply["FailureLocation"])
    assert failure["body"], "a failure object must say what failed"
    if expected_type:
        assert json.loads(failure["body"])["error"]["type"] == expected_type
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="out").get("KeyCount") == 0
