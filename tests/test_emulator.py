"""The local SageMaker runtime emulator's own protocol, with unmodified boto3 as the caller.

Everything is a real HTTP server on 127.0.0.1: moto (control plane + S3), the emulator, and a
STAND-IN CONTAINER: a minimal app implementing the container contract (/ping, /invocations that
echoes what it received; a body starting with b"CORRUPT" gets a 400 JSON error like `serve` gives).
It exists only to test the emulator's wire format; the end-to-end test against the real `serve`
is test_emulator_serve.py.
"""

from __future__ import annotations

import json
import time
import urllib.request

import boto3
import pytest
from botocore.config import Config
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from conftest import reset_moto
from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/whisper-sagemaker"
BUCKET = "whisper-emulator-test"
INSTANCE = "ml.g4dn.xlarge"


# ---------------------------------------------------------------- stand-in container (test only)

def standin_container_app() -> FastAPI:
    """Stand-in for `serve` in protocol tests: echoes the request, refuses b"CORRUPT..." with 400 JSON."""
    app = FastAPI()
    app.state.calls = 0

    @app.get("/ping")
    async def ping():
        return PlainTextResponse("")

    @app.post("/invocations")
    async def invocations(request: Request):
        app.state.calls += 1
        body = await request.body()
        if body.startswith(b"CORRUPT"):
            return JSONResponse(
                {"error": {"message": "The body is not a readable audio file.", "type": "invalid_audio", "param": "audio"}},
                status_code=400,
            )
        text = f"received {len(body)} bytes"
        if request.headers.get("accept", "").startswith("text/plain"):
            return PlainTextResponse(text)
        return JSONResponse({
            "text": text,
            "language": "en",
            "duration": 1.5,
            "content_type": request.headers.get("content-type"),
            "accept": request.headers.get("accept"),
            "custom_attributes": request.headers.get("x-amzn-sagemaker-custom-attributes"),
        })

    return app


def point_boto3_at(monkeypatch, moto_url: str, runtime_url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", runtime_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def create_endpoint(name: str, *, async_output: str | None = None, async_failure: str | None = None,
                    topics: dict | None = None, max_concurrent: int = 4) -> None:
    """An endpoint in the control plane, as the deploy CLI would make it."""
    sm = boto3.client("sagemaker")
    sm.create_model(ModelName=f"{name}-model", ExecutionRoleArn=ROLE,
                    PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0"})
    config: dict = {
        "EndpointConfigName": f"{name}-config",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": f"{name}-model",
                                "InstanceType": INSTANCE, "InitialInstanceCount": 1}],
    }
    if async_output:
        output = {"S3OutputPath": async_output}
        if async_failure:
            output["S3FailurePath"] = async_failure
        if topics:
            output["NotificationConfig"] = topics
        config["AsyncInferenceConfig"] = {"ClientConfig": {"MaxConcurrentInvocationsPerInstance": max_concurrent},
                                          "OutputConfig": output}
    sm.create_endpoint_config(**config)
    sm.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config")


def wait_for_object(s3, uri: str, timeout_s: float = 30.0) -> dict:
    bucket, _, key = uri[len("s3://"):].partition("/")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            obj = s3.get_object(Bucket=bucket, Key=key)
            return {"body": obj["Body"].read(), "content_type": obj.get("ContentType")}
        except s3.exceptions.NoSuchKey:
            if time.monotonic() > deadline:
                raise AssertionError(f"{uri} did not appear within {timeout_s} s")
            time.sleep(0.05)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def container():
    app = standin_container_app()
    with serve_in_thread(app) as running:
        running.app = app
        yield running


@pytest.fixture
def emulator_url(moto_url, container, monkeypatch):
    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)  # the emulator's own control-plane lookups
    with serve_in_thread(create_app(EmulatorOptions(container_url=container.url, max_body_bytes=100_000))) as emulator:
        point_boto3_at(monkeypatch, moto_url, emulator.url)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield emulator.url


@pytest.fixture
def runtime(emulator_url):
    return boto3.client("sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}))


# ---------------------------------------------------------------- real-time

def test_invoke_endpoint_forwards_to_the_container(runtime):
    create_endpoint("rt")
    reply = runtime.invoke_endpoint(EndpointName="rt", Body=b"x" * 1234, ContentType="audio/wav",
                                    Accept="application/json", CustomAttributes="language=de,task=translate")
    assert reply["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert reply["ContentType"] == "application/json"
    assert reply["InvokedProductionVariant"] == "AllTraffic"
    body = json.loads(reply["Body"].read())
    assert body == {"text": "received 1234 bytes", "language": "en", "duration": 1.5, "content_type": "audio/wav",
                    "accept": "application/json", "custom_attributes": "language=de,task=translate"}
    plain = runtime.invoke_endpoint(EndpointName="rt", Body=b"abc", Accept="text/plain")
    assert plain["ContentType"].startswith("text/plain") and plain["Body"].read() == b"received 3 bytes"


def test_container_error_reaches_boto3_as_model_error(runtime):
    create_endpoint("rt")
    with pytest.raises(runtime.exceptions.ModelError) as info:
        runtime.invoke_endpoint(EndpointName="rt", Body=b"CORRUPT audio", ContentType="audio/wav")
    response = info.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["Error"]["Code"] == "ModelError"
    assert response["OriginalStatusCode"] == 400
    assert json.loads(response["OriginalMessage"])["error"]["type"] == "invalid_audio"
    assert "Received client error (400) from primary" in response["Error"]["Message"]


def test_unknown_endpoint_is_a_validation_error(runtime):
    with pytest.raises(runtime.exceptions.ClientError) as info:
        runtime.invoke_endpoint(EndpointName="no-such-endpoint", Body=b"abc")
    error = info.value.response["Error"]
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["Code"] == "ValidationError"
    assert error["Message"] == "Endpoint no-such-endpoint of account 123456789012 not found."
    with pytest.raises(runtime.exceptions.ClientError) as info:
        runtime.invoke_endpoint_async(EndpointName="no-such-endpoint", InputLocation=f"s3://{BUCKET}/in.wav")
    assert info.value.response["Error"]["Code"] == "ValidationError"


def test_oversized_real_time_body_is_refused(runtime, container):
    create_endpoint("rt")
    calls = container.app.state.calls
    with pytest.raises(runtime.exceptions.ClientError) as info:
        runtime.invoke_endpoint(EndpointName="rt", Body=b"x" * 100_001)
    assert info.value.response["Error"]["Code"] == "ValidationError"
    assert "100001 bytes" in info.value.response["Error"]["Message"]
    assert container.app.state.calls == calls  # never reached the container


# ---------------------------------------------------------------- async

def test_async_invocation_writes_the_output_object(runtime):
    create_endpoint("as", async_output=f"s3://{BUCKET}/async/out", async_failure=f"s3://{BUCKET}/async/failed")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="in/clip.wav", Body=b"y" * 5000)
    reply = runtime.invoke_endpoint_async(EndpointName="as", InputLocation=f"s3://{BUCKET}/in/clip.wav",
                                          ContentType="audio/wav", Accept="application/json",
                                          CustomAttributes="language=en", InferenceId="req-1")
    assert reply["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert reply["InferenceId"] == "req-1"
    # as on SageMaker, the objects are named by a generated id, not by the caller's InferenceId
    object_id = reply["OutputLocation"].rsplit("/", 1)[1].removesuffix(".out")
    assert len(object_id) == 36 and "req-1" not in object_id
    assert reply["OutputLocation"] == f"s3://{BUCKET}/async/out/{object_id}.out"
    assert reply["FailureLocation"] == f"s3://{BUCKET}/async/failed/{object_id}-error.out"
    result = wait_for_object(s3, reply["OutputLocation"])
    assert result["content_type"] == "application/json"
    assert json.loads(result["body"]) == {"text": "received 5000 bytes", "language": "en", "duration": 1.5,
                                          "content_type": "audio/wav", "accept": "application/json",
                                          "custom_attributes": "language=en"}
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="async/failed").get("KeyCount") == 0


def test_async_container_error_writes_the_failure_object(runtime):
    create_endpoint("as", async_output=f"s3://{BUCKET}/async/out", async_failure=f"s3://{BUCKET}/async/failed")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="in/bad.wav", Body=b"CORRUPT not audio")
    reply = runtime.invoke_endpoint_async(EndpointName="as", InputLocation=f"s3://{BUCKET}/in/bad.wav")
    inference_id = reply["InferenceId"]
    assert len(inference_id) == 36  # a uuid when the caller gives none
    failure = wait_for_object(s3, reply["FailureLocation"])
    assert json.loads(failure["body"])["error"]["message"] == "The body is not a readable audio file."
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="async/out").get("KeyCount") == 0


def test_async_input_that_does_not_exist(runtime):
    create_endpoint("as", async_output=f"s3://{BUCKET}/async/out", async_failure=f"s3://{BUCKET}/async/failed")
    with pytest.raises(runtime.exceptions.ClientError) as info:
        runtime.invoke_endpoint_async(EndpointName="as", InputLocation=f"s3://{BUCKET}/in/missing.wav")
    assert info.value.response["Error"]["Code"] == "ValidationError"
    assert f"s3://{BUCKET}/in/missing.wav" in info.value.response["Error"]["Message"]
    assert boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="async/").get("KeyCount") == 0


def _async_raw(emulator_url: str, headers: dict[str, str]):
    """InvokeEndpointAsync as raw HTTP: boto3 checks types itself, a hand-written client does not."""
    import httpx

    base = {"X-Amzn-SageMaker-InputLocation": f"s3://{BUCKET}/in/clip.wav"}
    return httpx.post(f"{emulator_url}/endpoints/as/async-invocations", headers={**base, **headers}, timeout=30)


@pytest.mark.parametrize("header,value", [
    ("X-Amzn-SageMaker-InvocationTimeoutSeconds", "abc"),
    ("X-Amzn-SageMaker-InvocationTimeoutSeconds", "nan"),
    ("X-Amzn-SageMaker-InvocationTimeoutSeconds", "1e9"),
    ("X-Amzn-SageMaker-InvocationTimeoutSeconds", "0"),
    ("X-Amzn-SageMaker-InvocationTimeoutSeconds", "3601"),
    ("X-Amzn-SageMaker-InvocationTimeoutSeconds", "-5"),
    ("X-Amzn-SageMaker-RequestTTLSeconds", "soon"),
    ("X-Amzn-SageMaker-RequestTTLSeconds", "59"),
    ("X-Amzn-SageMaker-RequestTTLSeconds", "21601"),
    ("X-Amzn-SageMaker-Inference-Id", "x" * 65),
])
def test_bad_async_headers_are_a_validation_error_naming_the_header(emulator_url, header, value):
    create_endpoint("as", async_output=f"s3://{BUCKET}/async/out")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="in/clip.wav", Body=b"y" * 100)
    reply = _async_raw(emulator_url, {header: value})
    assert reply.status_code == 400, reply.text
    assert reply.headers["x-amzn-ErrorType"] == "ValidationError"
    message = reply.json()["message"]
    assert header in message and len(message) < 400
    assert boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="async/").get("KeyCount") == 0


@pytest.mark.parametrize("inference_id", ["../../escape", "a/b/c", "%2e%2e/x", "in/clip.wav"])
def test_inference_id_cannot_choose_the_output_key(emulator_url, inference_id):
    """The InferenceId is metadata only: the objects land under the configured prefixes, by a generated
    name, and the input is never overwritten."""
    create_endpoint("as", async_output=f"s3://{BUCKET}/async/out", async_failure=f"s3://{BUCKET}/async/failed")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="in/clip.wav", Body=b"y" * 100)
    reply = _async_raw(emulator_url, {"X-Amzn-SageMaker-Inference-Id": inference_id})
    assert reply.status_code == 202, reply.text
    assert reply.json()["InferenceId"] == inference_id
    output = reply.headers["X-Amzn-SageMaker-OutputLocation"]
    failure = reply.headers["X-Amzn-SageMaker-FailureLocation"]
    assert output.startswith(f"s3://{BUCKET}/async/out/") and failure.startswith(f"s3://{BUCKET}/async/failed/")
    for location in (output, failure):
        name = location.rsplit("/", 1)[1]
        assert location.count("/") == 5 and inference_id not in location and len(name.split(".")[0].split("-error")[0]) == 36
    wait_for_object(s3, output)
    assert s3.get_object(Bucket=BUCKET, Key="in/clip.wav")["Body"].read() == b"y" * 100


def test_async_call_on_a_real_time_endpoint_is_refused(runtime):
    create_endpoint("rt")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="in/clip.wav", Body=b"abc")
    with pytest.raises(runtime.exceptions.ClientError) as info:
        runtime.invoke_endpoint_async(EndpointName="rt", InputLocation=f"s3://{BUCKET}/in/clip.wav")
    assert info.value.response["Error"]["Code"] == "ValidationError"
    assert "not configured for asynchronous inference" in info.value.response["Error"]["Message"]


def test_async_notifies_the_sns_topics(runtime):
    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName="whisper-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    topics = {}
    for kind in ("SuccessTopic", "ErrorTopic"):
        arn = sns.create_topic(Name=f"whisper-{kind.lower()}")["TopicArn"]
        sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"})
        topics[kind] = arn
    create_endpoint("as", async_output=f"s3://{BUCKET}/o", async_failure=f"s3://{BUCKET}/f", topics=topics)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="in/good.wav", Body=b"good")
    s3.put_object(Bucket=BUCKET, Key="in/bad.wav", Body=b"CORRUPT")
    good = runtime.invoke_endpoint_async(EndpointName="as", InputLocation=f"s3://{BUCKET}/in/good.wav")
    bad = runtime.invoke_endpoint_async(EndpointName="as", InputLocation=f"s3://{BUCKET}/in/bad.wav")
    events = {}
    deadline = time.monotonic() + 30
    while len(events) < 2 and time.monotonic() < deadline:
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            event = json.loads(message["Body"])
            events[event["inferenceId"]] = event
    assert events[good["InferenceId"]]["invocationStatus"] == "Completed"
    assert events[good["InferenceId"]]["responseParameters"]["outputLocation"] == good["OutputLocation"]
    assert events[bad["InferenceId"]]["invocationStatus"] == "Failed"
    assert events[bad["InferenceId"]]["responseParameters"]["outputLocation"] == bad["FailureLocation"]
    assert events[good["InferenceId"]]["requestParameters"]["endpointName"] == "as"


def test_emulator_command_line(moto_url, container, monkeypatch):
    """`python -m whisper_triton.sagemaker_local.emulator` as a process, used by plain boto3."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    reset_moto(moto_url)
    port = free_port()
    point_boto3_at(monkeypatch, moto_url, f"http://127.0.0.1:{port}")
    process = subprocess.Popen(
        [sys.executable, "-m", "whisper_triton.sagemaker_local.emulator", "--container-url", container.url,
         "--host", "127.0.0.1", "--port", str(port)],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the emulator did not start within 60 s"
                time.sleep(0.1)
        create_endpoint("cli")
        runtime = boto3.client("sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}))
        reply = runtime.invoke_endpoint(EndpointName="cli", Body=b"12345", Accept="text/plain")
        assert reply["Body"].read() == b"received 5 bytes"
    finally:
        process.terminate()
        process.wait(timeout=30)
