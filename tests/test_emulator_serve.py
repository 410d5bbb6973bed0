"""End to end on 127.0.0.1: unmodified boto3 -> runtime emulator -> the real `serve` (Triton, CPU
engine, the embedded tiny.en) with espeak-ng speech; moto in server mode is S3 and the control plane.

The endpoint is created with the deploy library, as a user would; the application code is plain
boto3 `invoke_endpoint` / `invoke_endpoint_async`, pointed at the emulator through
AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME only.
"""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.config import Config

from test_emulator import BUCKET, point_boto3_at, reset_moto, wait_for_object
from whisper_triton.clients import AsyncInvokeOptions, transcribe_async
from whisper_triton.deploy import (
    AsyncOptions,
    AwsClients,
    Deployer,
    DeploymentOptions,
    EndpointOptions,
    ModelOptions,
)
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

pytestmark = pytest.mark.triton

ROLE = "arn:aws:iam::123456789012:role/whisper-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0"


@pytest.fixture
def local_sagemaker(moto_url, serve, monkeypatch):
    """Moto with a real-time and an async endpoint made by the deploy library; the emulator in front of `serve`."""
    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    with serve_in_thread(create_app(EmulatorOptions(container_url=serve.url))) as emulator:
        point_boto3_at(monkeypatch, moto_url, emulator.url)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="model/README", Body=b"the embedded tiny.en ships in the image")
        deployer = Deployer(AwsClients(max_attempts=1), poll_interval_s=0.01)
        model = ModelOptions(IMAGE, f"s3://{BUCKET}/model/", ROLE)
        endpoint = EndpointOptions(instance_type="ml.g4dn.xlarge")
        deployer.deploy(DeploymentOptions("whisper-rt", model, endpoint))
        deployer.deploy(DeploymentOptions("whisper-async", model, endpoint, AsyncOptions(
            output_path=f"s3://{BUCKET}/async/out", failure_path=f"s3://{BUCKET}/async/failed")))
        yield s3


def test_invoke_endpoint_returns_the_transcript(local_sagemaker, speech_clips):
    runtime = boto3.client("sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}, read_timeout=120))
    clip = speech_clips[0]
    reply = runtime.invoke_endpoint(EndpointName="whisper-rt", Body=clip.wav_bytes, ContentType="audio/wav",
                                    Accept="application/json")
    assert reply["InvokedProductionVariant"] == "AllTraffic"
    payload = json.loads(reply["Body"].read())
    assert word_error_rate(clip.text, payload["text"]) <= 0.15, payload
    assert payload["language"] == "en" and payload["duration"] > 1.0

    with pytest.raises(runtime.exceptions.ModelError) as info:
        runtime.invoke_endpoint(EndpointName="whisper-rt", Body=b"this is not audio" * 20, ContentType="audio/wav")
    assert info.value.response["OriginalStatusCode"] == 400
    assert json.loads(info.value.response["OriginalMessage"])["error"]["type"] == "invalid_audio"


def test_invoke_endpoint_async_output_and_failure_objects(local_sagemaker, speech_clips):
    s3 = local_sagemaker
    runtime = boto3.client("sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}))
    clip = speech_clips[1]
    s3.put_object(Bucket=BUCKET, Key="in/speech.wav", Body=clip.wav_bytes)
    s3.put_object(Bucket=BUCKET, Key="in/corrupt.wav", Body=b"RIFF\x00\x00garbage that is not audio" * 10)
    good = runtime.invoke_endpoint_async(EndpointName="whisper-async", InputLocation=f"s3://{BUCKET}/in/speech.wav",
                                         ContentType="audio/wav")
    bad = runtime.invoke_endpoint_async(EndpointName="whisper-async", InputLocation=f"s3://{BUCKET}/in/corrupt.wav",
                                        ContentType="audio/wav")
    output = wait_for_object(s3, good["OutputLocation"], timeout_s=120)
    assert word_error_rate(clip.text, json.loads(output["body"])["text"]) <= 0.15, output
    failure = wait_for_object(s3, bad["FailureLocation"], timeout_s=120)
    error = json.loads(failure["body"])["error"]
    assert error["type"] == "invalid_audio" and error["message"]
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=bad["OutputLocation"].split(BUCKET + "/", 1)[1]).get("KeyCount") == 0


def test_async_client_transcribes_a_folder(local_sagemaker, speech_clips, tmp_path):
    files = []
    for i, clip in enumerate(speech_clips[:4]):
        path = tmp_path / f"speech{i}.wav"
        path.write_bytes(clip.wav_bytes)
        files.append((path, clip.text))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"definitely not audio" * 30)
    options = AsyncInvokeOptions("whisper-async", BUCKET, output_format="json", concurrency=4,
                                 poll_initial_s=0.2, poll_max_s=1.0, timeout_s=180)
    results = transcribe_async([p for p, _ in files] + [corrupt], options, progress=False)
    assert len(results) == 5
    for (path, text), result in zip(files, results):
        assert result.ok, result.error
        assert result.written == path.with_name(path.name + ".json")
        assert word_error_rate(text, json.loads(result.written.read_text())["text"]) <= 0.15
    assert not results[-1].ok and results[-1].written.name == "corrupt.wav.error.txt"
    assert results[-1].written.read_text().strip()


def test_client_script_as_a_process_with_environment_only(local_sagemaker, speech_clips, tmp_path):
    """client/invoke_realtime.py as users run it: no endpoint URL argument, only AWS_* variables."""
    import subprocess
    import sys
    from pathlib import Path

    clip = speech_clips[2]
    wav = tmp_path / "meeting.wav"
    wav.write_bytes(clip.wav_bytes)
    script = Path(__file__).resolve().parents[1] / "client" / "invoke_realtime.py"
    done = subprocess.run([sys.executable, str(script), "whisper-rt", str(wav), "--format", "srt", "--write"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    srt = (tmp_path / "meeting.wav.srt").read_text().splitlines()
    assert srt[0] == "1" and srt[1].startswith("00:00:00,000 --> 00:00:0")
    assert word_error_rate(clip.text, srt[2]) <= 0.15
