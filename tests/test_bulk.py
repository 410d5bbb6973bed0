"""`whisper-transcribe-bucket` end to end on 127.0.0.1: 20 audio objects in moto's S3 (18 espeak-ng
sentences in 8 formats, one corrupt file, one over the payload limit) through --via local (the real
`serve`), --via async (an async endpoint made by the deploy library, run by the runtime emulator
against the same `serve`) and --via transform (a batch transform job, run by the emulator against it).

Each run must give the right transcript in every format for the 18, report the corrupt and the
oversize file in the manifest and the summary, and a second run must send nothing again.
"""

from __future__ import annotations

import json
import re
import urllib.request

import boto3
import numpy as np
import pytest
from conftest import reset_moto
from speech import FORMATS, encode

from whisper_triton.bulk.cli import main
from whisper_triton.deploy import (
    AsyncOptions,
    AutoscalingOptions,
    AwsClients,
    Deployer,
    DeploymentOptions,
    EndpointOptions,
    ModelOptions,
)
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

pytestmark = pytest.mark.triton

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/whisper-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0"
IN, OUT = "bulk-audio", "bulk-text"
CYCLE = ["wav", "flac", "mp3", "ogg-vorbis", "opus", "m4a-aac", "webm", "wav-stereo-44k"]
SUFFIX = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg-vorbis": ".ogg", "opus": ".opus", "m4a-aac": ".m4a",
          "webm": ".webm", "wav-stereo-44k": ".wav"}
CORRUPT, OVERSIZE = "calls/batch-a/corrupt.wav", "calls/batch-a/long-recording.wav"
LIMIT = ["--max-payload-mb", "1"]


def wav_bytes(seconds: float) -> bytes:
    tone = (0.1 * np.sin(np.arange(int(seconds * 16000)) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    return encode(tone, 16000, "wav", "pcm_s16le")


@pytest.fixture(scope="module")
def corpus(speech_clips) -> dict[str, tuple[bytes, str | None]]:
    """key -> (bytes, reference text); a key with a space, two folders, eight formats."""
    files: dict[str, tuple[bytes, str | None]] = {}
    for i in range(18):
        clip, fmt = speech_clips[i % len(speech_clips)], CYCLE[i % len(CYCLE)]
        data = clip.wav_bytes if fmt == "wav" else encode(clip.samples, 16000, *FORMATS[fmt])
        folder = "batch-a" if i < 9 else "batch b"
        files[f"calls/{folder}/clip{i:02d}{SUFFIX[fmt]}"] = (data, clip.text)
    files[CORRUPT] = (b"RIFF\x24\x00\x00\x00WAVEfmt this is not audio at all" * 20, None)
    files[OVERSIZE] = (wav_bytes(40.0), None)  # 1.28 MB: over the 1 MiB limit the runs are given
    return files


@pytest.fixture(scope="module")
def stack(moto_url, serve, corpus):
    """moto (S3, control plane, logs, autoscaling) + the emulator in front of `serve`; boto3 pointed at
    them through the environment only, as a user's shell would be."""
    reset_moto(moto_url)
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", REGION), ("AWS_ENDPOINT_URL", moto_url)):
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        options = EmulatorOptions(container_url=serve.url, aws_endpoint_url=moto_url)
        with serve_in_thread(create_app(options)) as emulator:
            env.setenv("AWS_ENDPOINT_URL_SAGEMAKER", emulator.url)
            env.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", emulator.url)
            s3 = boto3.client("s3")
            for bucket in (IN, OUT, "bulk-models"):
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket="bulk-models", Key="model/README", Body=b"the embedded tiny.en ships in the image")
            for key, (data, _) in corpus.items():
                s3.put_object(Bucket=IN, Key=key, Body=data)
            Deployer(AwsClients(max_attempts=1), poll_interval_s=0.01).deploy(DeploymentOptions(
                "whisper-async", ModelOptions(IMAGE, "s3://bulk-models/model/", ROLE),
                EndpointOptions(instance_type="ml.g4dn.xlarge"),
                AsyncOptions(output_path=f"s3://{OUT}/async-endpoint/out", failure_path=f"s3://{OUT}/async-endpoint/failed"),
                AutoscalingOptions(min_capacity=0, max_capacity=4)))
            yield {"s3": s3, "sm": boto3.client("sagemaker"), "aas": boto3.client("application-autoscaling"),
                   "serve": serve, "emulator": emulator}


def run_cli(*argv: str) -> int:
    return main([*argv, "--no-progress"])


def summary_of(s3, prefix: str) -> dict:
    return json.loads(s3.get_object(Bucket=OUT, Key=f"{prefix}/summary.json")["Body"].read())


def manifest_of(s3, prefix: str) -> dict[str, dict]:
    body = s3.get_object(Bucket=OUT, Key=f"{prefix}/manifest.jsonl")["Body"].read().decode()
    lines = [json.loads(line) for line in body.splitlines()]
    return {line["key"]: line for line in lines}


def text_of(s3, key: str) -> str:
    return s3.get_object(Bucket=OUT, Key=key)["Body"].read().decode()


def check_first_run(stack, corpus, prefix: str) -> None:
    """The 18 right in every format, the corrupt and oversize ones reported, nothing else written."""
    s3 = stack["s3"]
    manifest = manifest_of(s3, prefix)
    assert sorted(manifest) == sorted(corpus)
    for key, (_, reference) in corpus.items():
        record, relative = manifest[key], key[len("calls/"):]
        if reference is None:
            continue
        assert record["status"] == "ok", record
        assert record["language"] == "en" and 1.0 < record["duration"] < 10.0
        outputs = [f"{prefix}/{relative}{ext}" for ext in (".json", ".txt", ".srt", ".vtt")]
        assert record["outputs"] == outputs
        assert word_error_rate(reference, text_of(s3, outputs[1])) <= 0.15, (key, text_of(s3, outputs[1]))
        assert json.loads(text_of(s3, outputs[0]))["segments"]
        srt, vtt = text_of(s3, outputs[2]).splitlines(), text_of(s3, outputs[3]).splitlines()
        assert srt[0] == "1" and re.match(r"00:00:0\d,\d{3} --> 00:00:\d\d,\d{3}", srt[1])
        assert vtt[0] == "WEBVTT"
    corrupt, oversize = manifest[CORRUPT], manifest[OVERSIZE]
    assert corrupt["status"] == "failed" and corrupt["error_kind"] == "client"
    assert oversize["status"] == "too_large" and "1048576 bytes" in oversize["error"]
    written = {o["Key"] for o in s3.list_objects_v2(Bucket=OUT, Prefix=f"{prefix}/batch")["Contents"]}
    assert len(written) == 18 * 4  # nothing for the two that were not transcribed
    summary = summary_of(s3, prefix)
    assert summary["files"] == {"transcribed": 18, "failed": 1, "too_large": 1, "already_done": 0, "refused_before": 0,
                                "left_out_by_filters": 0}
    assert [item["key"] for item in summary["not_transcribed"]] == sorted([CORRUPT, OVERSIZE])
    transcribed = sum(m["duration"] for m in manifest.values() if m["status"] == "ok")
    assert summary["audio_seconds"] == pytest.approx(transcribed, abs=0.01)


def check_second_run_sends_nothing(stack, prefix: str) -> None:
    summary = summary_of(stack["s3"], prefix)
    assert summary["files"]["transcribed"] == 0 and summary["files"]["failed"] == 0
    assert summary["files"]["already_done"] == 18 and summary["files"]["refused_before"] == 1
    assert summary["files"]["too_large"] == 1
    assert len(manifest_of(stack["s3"], prefix)) == 20


def invocations_served(serve) -> float:
    with urllib.request.urlopen(serve.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("whisper_http_requests_total{") and 'route="/invocations"' in line)


def test_dry_run_lists_the_work_and_its_cost_and_changes_nothing(stack, corpus, capsys):
    code = run_cli(f"s3://{IN}/calls/", f"s3://{OUT}/dry/", "--via", "transform", "--model-name", "whisper",
                   "--instances", "2", "--rtfx", "70", "--price-per-hour", "1.408", "--dry-run", "--json", *LIMIT)
    out = capsys.readouterr().out
    assert code == 0
    plan = json.loads(out[out.index("\n{") + 1:])
    assert sorted(plan["todo"]) == sorted(k for k in corpus if k != OVERSIZE) and plan["too_large"] == [OVERSIZE]
    assert plan["done"] == [] and plan["refused_before"] == []
    # every file here fits in the probe: its length is exact (the corrupt one counts its size as 64 kbit/s)
    assert plan["audio_seconds"] > 18 * 1.0
    assert plan["wall_seconds"] == pytest.approx(plan["audio_seconds"] / (70 * 2) + 8 * 60)
    assert plan["cost_usd"] == pytest.approx(2 * 1.408 * plan["wall_seconds"] / 3600)
    assert "over the payload limit (1 MiB), not sent: 1" in out and "OpenAI whisper-1" in out
    assert stack["sm"].list_transform_jobs()["TransformJobSummaries"] == []
    assert stack["s3"].list_objects_v2(Bucket=OUT, Prefix="dry/").get("KeyCount") == 0


def test_via_local_transcribes_the_bucket_and_resumes(stack, corpus):
    argv = (f"s3://{IN}/calls/", f"s3://{OUT}/local/", "--via", "local", "--url", stack["serve"].url, *LIMIT)
    assert run_cli(*argv) == 1  # two inputs are not transcribed
    check_first_run(stack, corpus, "local")
    before = invocations_served(stack["serve"])
    assert run_cli(*argv) == 1
    check_second_run_sends_nothing(stack, "local")
    assert invocations_served(stack["serve"]) == before
    # a lost output is made again, and only that input is sent
    stack["s3"].delete_object(Bucket=OUT, Key="local/batch b/clip10.mp3.srt")
    assert run_cli(*argv) == 1
    assert summary_of(stack["s3"], "local")["files"]["transcribed"] == 1
    assert invocations_served(stack["serve"]) == before + 1
    assert text_of(stack["s3"], "local/batch b/clip10.mp3.srt").startswith("1\n")


def test_via_async_scales_out_and_back_and_resumes(stack, corpus):
    argv = (f"s3://{IN}/calls/", f"s3://{OUT}/async/", "--via", "async", "--endpoint", "whisper-async",
            "--instances", "2", "--poll-initial", "0.1", "--poll-max", "0.5", *LIMIT)
    assert run_cli(*argv) == 1
    check_first_run(stack, corpus, "async")
    runner = summary_of(stack["s3"], "async")["runner"]
    assert runner["min_capacity_during_run"] == 2 and runner["restored"] == {"MinCapacity": 0, "MaxCapacity": 4}
    [target] = stack["aas"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 4)  # back to zero after the run
    results = stack["s3"].list_objects_v2(Bucket=OUT, Prefix="async-endpoint/")["KeyCount"]
    assert results == 19  # 18 outputs and the corrupt file's failure object
    assert run_cli(*argv) == 1
    check_second_run_sends_nothing(stack, "async")
    assert stack["s3"].list_objects_v2(Bucket=OUT, Prefix="async-endpoint/")["KeyCount"] == results


def test_via_transform_runs_a_batch_job_and_resumes(stack, corpus):
    argv = (f"s3://{IN}/calls/", f"s3://{OUT}/transform/", "--via", "transform", "--image", IMAGE,
            "--model-data", "s3://bulk-models/model/", "--role", ROLE, "--instance-type", "ml.g5.xlarge",
            "--max-concurrent-transforms", "2", "--poll-interval", "0.2", *LIMIT)
    assert run_cli(*argv) == 1
    check_first_run(stack, corpus, "transform")
    [job] = summary_of(stack["s3"], "transform")["runner"]["jobs"]
    assert job["objects"] == 19 and job["outputs"] == 18 and job["status"] == "Failed"
    assert f"{IN}/{CORRUPT}: ClientError: 400" in job["failure_reason"]
    described = stack["sm"].describe_transform_job(TransformJobName=job["name"])
    assert described["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
    assert (described["MaxPayloadInMB"], described["MaxConcurrentTransforms"]) == (1, 2)
    corrupt = manifest_of(stack["s3"], "transform")[CORRUPT]
    assert corrupt["error"].startswith("ClientError: 400: ") and "audio" in corrupt["error"]
    assert run_cli(*argv) == 1
    check_second_run_sends_nothing(stack, "transform")
    assert len(stack["sm"].list_transform_jobs()["TransformJobSummaries"]) == 1  # no second job
