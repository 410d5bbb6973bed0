"""Batch transform jobs run by the local SageMaker emulator, as SageMaker documents them, with
unmodified boto3 as the caller (`create_transform_job`, `describe_transform_job`, `stop_transform_job`,
CloudWatch Logs) and moto as S3 and the control plane.

The container here is a STAND-IN (test only) that makes each rule observable: it echoes what it got,
refuses b"CORRUPT..." with 400 JSON as `serve` does, answers b"FLAKY..." 503 twice before succeeding,
sleeps on b"SLOW...", counts calls and requests in flight, and answers /execution-parameters only when
told to. The end-to-end run against the real `serve` is tests/test_bulk.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import boto3
import pytest
from botocore.config import Config
from conftest import reset_moto
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from whisper_triton.deploy import AwsClients, Deployer, TransformOptions
from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/whisper-sagemaker"
BUCKET = "whisper-transform-test"
LOG_GROUP = "/aws/sagemaker/TransformJobs"


def standin_container() -> FastAPI:
    app = FastAPI()
    app.state.calls, app.state.in_flight, app.state.max_in_flight = [], 0, 0
    app.state.execution_parameters = None
    app.state.flaky_left = 2

    @app.get("/ping")
    async def ping():
        return PlainTextResponse("")

    @app.get("/execution-parameters")
    async def execution_parameters():
        if app.state.execution_parameters is None:
            return JSONResponse({"message": "not found"}, status_code=404)
        return JSONResponse(app.state.execution_parameters)

    @app.post("/invocations")
    async def invocations(request: Request):
        body = await request.body()
        app.state.calls.append(body[:12])
        app.state.in_flight += 1
        app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
        try:
            if body.startswith(b"SLOW"):
                await asyncio.sleep(float(body[4:8]))
            elif body.startswith(b"PAUSE"):
                await asyncio.sleep(0.15)
            if body.startswith(b"CORRUPT"):
                return JSONResponse({"error": {"message": "The body is not a readable audio file.",
                                               "type": "invalid_audio", "param": "audio"}}, status_code=400)
            if body.startswith(b"FLAKY") and app.state.flaky_left > 0:
                app.state.flaky_left -= 1
                return JSONResponse({"error": {"message": "Triton is not available; retry shortly.",
                                               "type": "service_unavailable", "param": None}}, status_code=503)
            return JSONResponse({"text": f"received {len(body)} bytes", "content_type": request.headers.get("content-type"),
                                 "accept": request.headers.get("accept")})
        finally:
            app.state.in_flight -= 1

    return app


@pytest.fixture(scope="module")
def container():
    app = standin_container()
    with serve_in_thread(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def emulator(moto_url, container):
    """The emulator for the module (its own AWS calls to moto, a look for new jobs every 0.2 s)."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", REGION), ("AWS_ENDPOINT_URL", moto_url)):
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        options = EmulatorOptions(container_url=container.url, aws_endpoint_url=moto_url, transform_poll_s=0.2)
        with serve_in_thread(create_app(options)) as running:
            yield running


@pytest.fixture
def local(moto_url, container, emulator, monkeypatch):
    """Fresh moto state (a job re-created under an old name is a new job: its creation time differs);
    boto3's control-plane client pointed at the emulator, S3 and logs at moto."""
    reset_moto(moto_url)
    # a call the previous test's job gave up on (its client timed out) may still be sleeping in the
    # stand-in: let it end, or it would count as a second request in flight in this test
    deadline = time.monotonic() + 10
    while container.app.state.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert container.app.state.in_flight == 0, "a stand-in call of an earlier test never ended"
    container.app.state.calls.clear()
    container.app.state.max_in_flight, container.app.state.flaky_left = 0, 2
    container.app.state.execution_parameters = None
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", emulator.url)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    sm = boto3.client("sagemaker", config=Config(retries={"total_max_attempts": 1}))
    sm.create_model(ModelName="whisper", ExecutionRoleArn=ROLE,
                    PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0"})
    yield {"s3": s3, "sm": sm, "logs": boto3.client("logs"), "moto_url": moto_url, "emulator": emulator}


def put(s3, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def create_job(sm, name: str, input_uri: str, *, data_type: str = "S3Prefix", **extra) -> None:
    request = {
        "TransformJobName": name, "ModelName": "whisper",
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": data_type, "S3Uri": input_uri}},
                           "SplitType": "None", "ContentType": "audio/wav"},
        "TransformOutput": {"S3OutputPath": f"s3://{BUCKET}/out/{name}", "Accept": "application/json",
                            "AssembleWith": "None"},
        "TransformResources": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1},
    }
    for key, value in extra.items():
        if key == "InstanceCount":
            request["TransformResources"]["InstanceCount"] = value
        else:
            request[key] = value
    sm.create_transform_job(**request)


def wait_job(sm, name: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = sm.describe_transform_job(TransformJobName=name)
        if job["TransformJobStatus"] in ("Completed", "Failed", "Stopped"):
            return job
        assert time.monotonic() < deadline, f"{name} still {job['TransformJobStatus']} after {timeout_s} s"
        time.sleep(0.1)


def outputs(s3, prefix: str) -> dict[str, dict]:
    found = {}
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        found[item["Key"][len(prefix):]] = json.loads(s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
    return found


def data_log(logs, job: str) -> list[str]:
    streams = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{job}/")["logStreams"]
    names = [s["logStreamName"] for s in streams]
    assert names and all(n.startswith(f"{job}/i-") and n.endswith("/data-log") for n in names)
    events = logs.filter_log_events(logGroupName=LOG_GROUP, logStreamNames=names)["events"]
    return [e["message"].split("[sagemaker logs]: ", 1)[1] for e in events if e["logStreamName"] in names]


def test_a_job_sends_every_object_and_records_what_failed(local, container):
    put(local["s3"], {"in/a.wav": b"RIFF first", "in/sub/b.wav": b"RIFF second one", "in/c.wav": b"CORRUPT audio",
                      "in/big.wav": b"B" * (1024 * 1024 + 1), "other/x.wav": b"RIFF not under the prefix"})
    sm = local["sm"]
    create_job(sm, "job-a", f"s3://{BUCKET}/in/", MaxPayloadInMB=1, MaxConcurrentTransforms=2, BatchStrategy="SingleRecord")
    assert sm.describe_transform_job(TransformJobName="job-a")["TransformJobStatus"] in ("InProgress", "Failed")
    job = wait_job(sm, "job-a")
    assert job["TransformJobStatus"] == "Failed"
    reason = job["FailureReason"]
    assert reason.startswith("ClientError: 2 of 4 objects failed")
    assert f"{BUCKET}/in/c.wav: ClientError: 400" in reason and f"{BUCKET}/in/big.wav: ClientError: the record is" in reason
    assert job["TransformEndTime"] >= job["TransformStartTime"]
    # outputs: <path under the prefix's folder>.out, the container's answer as it came
    found = outputs(local["s3"], "out/job-a/")
    assert sorted(found) == ["a.wav.out", "sub/b.wav.out"]
    assert found["sub/b.wav.out"] == {"text": "received 15 bytes", "content_type": "audio/wav", "accept": "application/json"}
    # the oversize object never reached the container; the corrupt one did, once (a 4xx is not retried)
    assert sorted(container.app.state.calls) == [b"CORRUPT audi", b"RIFF first", b"RIFF second "]
    lines = data_log(local["logs"], "job-a")
    assert lines[0] == "MaxConcurrentTransforms=2, MaxPayloadInMB=1, BatchStrategy=SINGLE_RECORD"
    corrupt = [line for line in lines if line.startswith(f"{BUCKET}/in/c.wav: ")]
    assert [c.split(": ", 1)[1] for c in corrupt[:3]] == ["ClientError: 400", "", "Message:"]
    assert json.loads(corrupt[3].split(": ", 1)[1])["error"]["type"] == "invalid_audio"
    assert any(line.startswith(f"{BUCKET}/in/big.wav: ClientError: the record is 1048577 bytes, larger than "
                               "MaxPayloadInMB=1") for line in lines)


def test_execution_parameters_fill_what_the_job_leaves_unset(local, container):
    put(local["s3"], {f"in/{i}.wav": b"RIFF" for i in range(3)})
    sm = local["sm"]
    create_job(sm, "job-defaults", f"s3://{BUCKET}/in/")
    assert wait_job(sm, "job-defaults")["TransformJobStatus"] == "Completed"
    assert data_log(local["logs"], "job-defaults")[0] == "MaxConcurrentTransforms=1, MaxPayloadInMB=6, BatchStrategy=MULTI_RECORD"
    container.app.state.execution_parameters = {"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD",
                                                "MaxPayloadInMB": 2}
    create_job(sm, "job-asked", f"s3://{BUCKET}/in/")
    assert wait_job(sm, "job-asked")["TransformJobStatus"] == "Completed"
    assert data_log(local["logs"], "job-asked")[0] == "MaxConcurrentTransforms=3, MaxPayloadInMB=2, BatchStrategy=SINGLE_RECORD"
    create_job(sm, "job-too-much", f"s3://{BUCKET}/in/", MaxConcurrentTransforms=4, MaxPayloadInMB=50)
    job = wait_job(sm, "job-too-much")
    assert job["TransformJobStatus"] == "Failed" and "4 x 50 = 200 MB" in job["FailureReason"]


def test_model_client_config_retries_and_timeout(local, container):
    put(local["s3"], {"in/flaky.wav": b"FLAKY but fine", "in/slow.wav": b"SLOW1.50 too slow"})
    sm = local["sm"]
    create_job(sm, "job-retry", f"s3://{BUCKET}/in/", MaxConcurrentTransforms=2, MaxPayloadInMB=6,
               ModelClientConfig={"InvocationsTimeoutInSeconds": 1, "InvocationsMaxRetries": 2})
    job = wait_job(sm, "job-retry")
    assert job["TransformJobStatus"] == "Failed"
    assert job["FailureReason"].startswith("AlgorithmError: 1 of 2 objects failed")
    assert f"{BUCKET}/in/slow.wav: Model server did not respond to /invocations request within 1 seconds" in job["FailureReason"]
    assert sorted(outputs(local["s3"], "out/job-retry/")) == ["flaky.wav.out"]
    calls = container.app.state.calls
    assert calls.count(b"FLAKY but fi") == 3  # two 503s, then the answer
    assert calls.count(b"SLOW1.50 too") == 3  # the first try and two retries, each cut at 1 s
    lines = data_log(local["logs"], "job-retry")
    assert lines.count(f"{BUCKET}/in/flaky.wav: Bad HTTP status received from algorithm: 503") == 2


def test_concurrency_is_bounded_per_instance(local, container):
    put(local["s3"], {f"in/{i}.wav": b"PAUSE" for i in range(8)})
    sm = local["sm"]
    create_job(sm, "job-serial", f"s3://{BUCKET}/in/", MaxConcurrentTransforms=1, MaxPayloadInMB=6)
    assert wait_job(sm, "job-serial")["TransformJobStatus"] == "Completed"
    assert container.app.state.max_in_flight == 1
    container.app.state.max_in_flight = 0
    create_job(sm, "job-wide", f"s3://{BUCKET}/in/", MaxConcurrentTransforms=2, MaxPayloadInMB=6, InstanceCount=2)
    assert wait_job(sm, "job-wide")["TransformJobStatus"] == "Completed"
    assert 1 <= container.app.state.max_in_flight <= 4
    assert len(outputs(local["s3"], "out/job-wide/")) == 8
    streams = local["logs"].describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix="job-wide/")["logStreams"]
    assert len(streams) == 2  # one data-log per instance


def test_manifest_input_sends_only_the_listed_objects(local, container):
    put(local["s3"], {"in/a.wav": b"RIFF a", "in/deep/b.wav": b"RIFF bb", "in/c.wav": b"RIFF ccc"})
    manifest = [{"prefix": f"s3://{BUCKET}/in/"}, "deep/b.wav", "c.wav", "missing.wav"]
    local["s3"].put_object(Bucket=BUCKET, Key="jobs/input.manifest", Body=json.dumps(manifest).encode())
    sm = local["sm"]
    create_job(sm, "job-manifest", f"s3://{BUCKET}/jobs/input.manifest", data_type="ManifestFile", MaxPayloadInMB=6)
    job = wait_job(sm, "job-manifest")
    assert job["TransformJobStatus"] == "Failed" and f"{BUCKET}/in/missing.wav" in job["FailureReason"]
    assert sorted(outputs(local["s3"], "out/job-manifest/")) == ["c.wav.out", "deep/b.wav.out"]
    assert sorted(container.app.state.calls) == [b"RIFF bb", b"RIFF ccc"]


def test_stop_and_list_through_the_control_plane(local, container):
    put(local["s3"], {f"in/{i}.wav": b"SLOW0.30" for i in range(6)})
    sm = local["sm"]
    create_job(sm, "job-stop", f"s3://{BUCKET}/in/", MaxConcurrentTransforms=1, MaxPayloadInMB=6)
    deadline = time.monotonic() + 30
    while not container.app.state.calls:
        assert time.monotonic() < deadline, "the job never called the container"
        time.sleep(0.05)
    sm.stop_transform_job(TransformJobName="job-stop")
    job = wait_job(sm, "job-stop")
    assert job["TransformJobStatus"] == "Stopped"
    assert len(container.app.state.calls) < 6 and len(outputs(local["s3"], "out/job-stop/")) < 6
    with pytest.raises(sm.exceptions.ClientError) as info:
        sm.stop_transform_job(TransformJobName="job-stop")
    assert info.value.response["Error"]["Code"] == "ValidationException"
    summaries = sm.list_transform_jobs(StatusEquals="Stopped")["TransformJobSummaries"]
    assert [s["TransformJobName"] for s in summaries] == ["job-stop"]
    assert sm.list_transform_jobs(StatusEquals="Completed")["TransformJobSummaries"] == []
    # moto itself, asked directly, still says what it always says: the reason the state lives in the emulator
    direct = boto3.client("sagemaker", endpoint_url=local["moto_url"])
    assert direct.describe_transform_job(TransformJobName="job-stop")["TransformJobStatus"] == "Completed"


def test_a_job_created_directly_on_moto_is_observed_and_run(local, container, monkeypatch):
    """whisper-deploy's own code, talking to moto only: the emulator finds the job by listing."""
    put(local["s3"], {"audio/one.wav": b"RIFF one", "audio/two.wav": b"RIFF two"})
    deployer = Deployer(AwsClients(max_attempts=1, endpoint_url=local["moto_url"]), poll_interval_s=0.01)
    job = deployer.start_transform(TransformOptions(
        name="whisper-batch", input_prefix=f"s3://{BUCKET}/audio/", output_path=f"s3://{BUCKET}/text/",
        model_name="whisper", instance_type="ml.g5.xlarge", max_payload_mb=10))
    deadline = time.monotonic() + 30
    while len(outputs(local["s3"], "text/")) < 2:
        assert time.monotonic() < deadline, "the emulator did not run the job created on moto"
        time.sleep(0.1)
    assert wait_job(local["sm"], job.name)["TransformJobStatus"] == "Completed"
    assert sorted(container.app.state.calls) == [b"RIFF one", b"RIFF two"]  # run once, not once per look


def test_a_loop_back_to_the_emulator_is_refused(moto_url, container, monkeypatch):
    import httpx
    from conftest import free_port

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(name, value)
    port = free_port()
    options = EmulatorOptions(container_url=container.url, aws_endpoint_url=f"http://127.0.0.1:{port}")
    with serve_in_thread(create_app(options), port=port) as emulator:
        reply = httpx.post(emulator.url + "/", headers={"X-Amz-Target": "SageMaker.ListModels",
                                                       "Content-Type": "application/x-amz-json-1.1",
                                                       "Authorization": "AWS4-HMAC-SHA256 Credential=x/20260101/"
                                                                        "us-east-1/sagemaker/aws4_request"},
                           content=b"{}", timeout=30)
    assert reply.status_code == 508 and "--aws-endpoint-url" in reply.json()["message"]
