"""Batch transform and async limits, and SSH debugging, as `serve` reads them from SageMaker's variables."""

import logging

from fastapi.testclient import TestClient

from conftest import free_port
from whisper_triton.http.app import create_app
from whisper_triton.supervisor.serve import maybe_start_ssh
from whisper_triton.settings import load_settings


def app_with(monkeypatch, **env) -> TestClient:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WHISPER_TRITON_TRITON_GRPC_PORT", str(free_port()))  # no Triton there: 503 past the checks
    return TestClient(create_app(load_settings()))


def test_batch_transform_execution_parameters_and_payload(monkeypatch):
    with app_with(monkeypatch, SAGEMAKER_BATCH="true", SAGEMAKER_MAX_PAYLOAD_IN_MB="2") as client:
        parameters = client.get("/execution-parameters").json()
        assert parameters == {"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 2}
        over = client.post("/invocations", content=b"\0" * (2 * 1024 * 1024 + 1), headers={"Content-Type": "audio/wav"})
        assert over.status_code == 413
        # under the batch payload: past the size check, on to Triton (absent here)
        under = client.post("/invocations", content=b"\0" * (1024 * 1024 + 512 * 1024), headers={"Content-Type": "audio/wav"})
        assert under.status_code != 413


def test_real_time_keeps_its_cap_and_async_raises_it(monkeypatch):
    with app_with(monkeypatch) as client:
        assert client.get("/execution-parameters").json()["MaxPayloadInMB"] == 6
        assert client.post("/invocations", content=b"\0" * 6_291_457, headers={"Content-Type": "audio/wav"}).status_code == 413
    with app_with(monkeypatch, WHISPER_TRITON_MAX_BODY_BYTES=str(64 * 1024 * 1024)) as client:
        reply = client.post("/invocations", content=b"\0" * 7_000_000, headers={"Content-Type": "audio/wav"})
        assert reply.status_code != 413


def test_start_ssh_fails_soft_without_the_helper(monkeypatch, caplog):
    monkeypatch.setenv("START_SSH", "true")
    with caplog.at_level(logging.WARNING):
        assert maybe_start_ssh(load_settings()) is False
    assert "sagemaker-ssh-helper" in caplog.text
    monkeypatch.delenv("START_SSH")
    assert maybe_start_ssh(load_settings()) is False


def test_engine_options_follow_the_engine(monkeypatch):
    monkeypatch.setenv("WHISPER_TRITON_ENGINE", "tensorrtllm")
    monkeypatch.setenv("WHISPER_TRITON_KV_CACHE_FREE_GPU_MEMORY_FRACTION", "0.6")
    options = load_settings().engine_options()
    # unset, the cross-attention share is computed for Whisper's 1,500 encoder positions by the engine
    assert options["kv_cache_free_gpu_memory_fraction"] == 0.6 and options["cross_kv_cache_fraction"] is None
    monkeypatch.setenv("WHISPER_TRITON_CROSS_KV_CACHE_FRACTION", "0.5")
    assert load_settings().engine_options()["cross_kv_cache_fraction"] == 0.5
    monkeypatch.setenv("WHISPER_TRITON_ENGINE", "ctranslate2")
    assert "cross_kv_cache_fraction" not in load_settings().engine_options()
