"""Segments as they are decoded, on a real `serve`: OpenAI SSE on a long file (the first event comes
while windows of the file are still to be decoded), the SageMaker container's response stream
(JSON lines), unmodified boto3 `invoke_endpoint_with_response_stream` through the runtime emulator,
the real-time client's `--stream`, and a client that leaves mid-stream stopping the decoding of its
file (Triton's whisper_window statistics stop growing)."""

from __future__ import annotations

import json
import time

import boto3
import httpx
import pytest
import tritonclient.grpc as grpcclient
from botocore.config import Config

from test_emulator import point_boto3_at, reset_moto
from whisper_triton.clients import realtime
from whisper_triton.contract.tensors import WHISPER_WINDOW
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

pytestmark = pytest.mark.triton

ROLE = "arn:aws:iam::123456789012:role/whisper-sagemaker"


def window_requests(serve) -> int:
    """How many requests whisper_window has executed so far (Triton's own statistics)."""
    with grpcclient.InferenceServerClient(serve.grpc_url) as client:
        stats = client.get_inference_statistics(WHISPER_WINDOW, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def settled_window_requests(serve, polls: int = 60, interval_s: float = 2.0) -> int:
    """The count once it stopped changing for three polls in a row (bounded: polls x interval)."""
    last, same = window_requests(serve), 0
    for _ in range(polls):
        time.sleep(interval_s)
        now = window_requests(serve)
        same = same + 1 if now == last else 0
        last = now
        if same >= 3:
            return now
    raise AssertionError(f"whisper_window kept executing for {polls * interval_s:.0f} s")


def sse_events(serve, audio: bytes, stop_after: int | None = None):
    """(events, whisper_window requests done when the first event came)."""
    events, at_first = [], None
    with httpx.stream("POST", serve.url + "/v1/audio/transcriptions", timeout=900,
                      files={"file": ("long.flac", audio)}, data={"model": "whisper-1", "stream": "true"}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(json.loads(line.removeprefix("data: ")))
            if at_first is None:
                at_first = window_requests(serve)
            if stop_after is not None and len(events) >= stop_after:
                break  # leaving the with-block closes the connection mid-stream
    return events, at_first


def test_long_file_streams_in_order_and_a_client_that_leaves_stops_its_decoding(serve, long_speech):
    before = window_requests(serve)
    events, at_first = sse_events(serve, long_speech.flac_bytes)
    full = settled_window_requests(serve) - before
    deltas, done = events[:-1], events[-1]
    assert done["type"] == "transcript.text.done" and {e["type"] for e in deltas} == {"transcript.text.delta"}
    assert [e["start"] for e in deltas] == sorted(e["start"] for e in deltas)  # segments in timeline order
    assert "".join(e["delta"] for e in deltas).strip() == done["text"]
    assert word_error_rate(long_speech.text, done["text"]) < 0.25
    # the first event came when only part of the file's windows had been decoded
    assert at_first - before < full, (at_first - before, full)

    start = window_requests(serve)
    partial, _ = sse_events(serve, long_speech.flac_bytes, stop_after=1)
    assert len(partial) == 1
    cancelled = settled_window_requests(serve) - start
    assert cancelled < full, (cancelled, full)  # the rest of the file was not decoded
    assert "client disconnected mid-stream" in serve.log()


def test_container_response_stream_json_lines(serve, speech_clips):
    clip = speech_clips[2]
    lines = []
    with httpx.stream("POST", serve.url + "/invocations", content=clip.wav_bytes, timeout=120,
                      headers={"Content-Type": "audio/wav", "Accept": "application/jsonlines"}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/jsonlines")
        assert "content-length" not in reply.headers  # chunked: SageMaker's streaming contract
        lines = [json.loads(line) for line in reply.iter_lines() if line.strip()]
    assert lines[-1]["done"] and all(not line["done"] for line in lines[:-1])
    assert word_error_rate(clip.text, lines[-1]["full_text"]) <= 0.15
    refused = httpx.post(serve.url + "/invocations?stream=true&beam_size=0", content=clip.wav_bytes,
                         headers={"Content-Type": "audio/wav"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "beam_size"
    bad = httpx.post(serve.url + "/invocations?stream=maybe", content=clip.wav_bytes,
                     headers={"Content-Type": "audio/wav"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"


@pytest.fixture
def streaming_endpoint(moto_url, serve, monkeypatch):
    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    with serve_in_thread(create_app(EmulatorOptions(container_url=serve.url))) as emulator:
        point_boto3_at(monkeypatch, moto_url, emulator.url)
        sagemaker = boto3.client("sagemaker")
        sagemaker.create_model(ModelName="m", ExecutionRoleArn=ROLE,
                               PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/w:1"})
        sagemaker.create_endpoint_config(EndpointConfigName="c", ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": "m", "InitialInstanceCount": 1,
            "InstanceType": "ml.g4dn.xlarge"}])
        sagemaker.create_endpoint(EndpointName="whisper-stream", EndpointConfigName="c")
        yield "whisper-stream"


def test_boto3_response_stream_and_the_realtime_client(streaming_endpoint, speech_clips, capsys):
    clip = speech_clips[3]
    runtime = boto3.client("sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}, read_timeout=120))
    reply = runtime.invoke_endpoint_with_response_stream(EndpointName=streaming_endpoint, Body=clip.wav_bytes,
                                                         ContentType="audio/wav")
    assert reply["InvokedProductionVariant"] == "AllTraffic" and reply["ContentType"].startswith("application/jsonl")
    parts = [event["PayloadPart"]["Bytes"] for event in reply["Body"]]
    lines = [json.loads(line) for line in b"".join(parts).splitlines() if line.strip()]
    assert parts and lines[-1]["done"] and word_error_rate(clip.text, lines[-1]["full_text"]) <= 0.15

    with pytest.raises(runtime.exceptions.ModelError) as info:  # refused before the first byte: ModelError
        runtime.invoke_endpoint_with_response_stream(EndpointName=streaming_endpoint, Body=b"not audio" * 30,
                                                     ContentType="audio/wav")
    assert info.value.response["OriginalStatusCode"] == 400

    path = clip.wav_path
    assert realtime.main([streaming_endpoint, str(path), "--stream", "--max-attempts", "1"]) == 0
    printed = capsys.readouterr().out
    assert word_error_rate(clip.text, printed) <= 0.15
