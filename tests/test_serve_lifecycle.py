"""`serve` as a process: readiness, SIGTERM, a dying Triton, a model that cannot load."""

import os
import signal
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from conftest import free_port, start_serve
from whisper_triton.http.app import create_app
from whisper_triton.settings import load_settings

pytestmark = pytest.mark.triton  # starts a real tritonserver / serve


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_exit(process, timeout_s: float) -> int | None:
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def test_ping_is_503_while_triton_is_not_there():
    settings = load_settings(triton_grpc_port=free_port())
    with TestClient(create_app(settings)) as client:
        reply = client.get("/ping")
        assert reply.status_code == 503


def test_sigterm_stops_proxy_and_triton_cleanly(tmp_path):
    instance = start_serve(tmp_path)
    try:
        instance.wait_ready()
        triton_pids = children_of(instance.process.pid)
        assert triton_pids, "serve should have a tritonserver child"
        started = time.monotonic()
        instance.process.send_signal(signal.SIGTERM)
        code = wait_exit(instance.process, 10)
        assert code == 0, instance.log()
        assert time.monotonic() - started < 10
        for pid in triton_pids:
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    finally:
        instance.terminate()


def test_serve_exits_non_zero_when_triton_dies(tmp_path):
    instance = start_serve(tmp_path)
    try:
        instance.wait_ready()
        for pid in children_of(instance.process.pid):
            os.kill(pid, signal.SIGKILL)
        code = wait_exit(instance.process, 20)
        assert code not in (None, 0), instance.log()
        assert "tritonserver exited unexpectedly" in instance.log()
    finally:
        instance.terminate()


def test_model_that_cannot_load_fails_fast_with_a_reason(tmp_path):
    instance = start_serve(tmp_path, {"WHISPER_TRITON_MODEL_DIR": str(tmp_path / "no-such-model")})
    try:
        code = wait_exit(instance.process, 120)
        assert code not in (None, 0)
        assert "no-such-model" in instance.log()
    finally:
        instance.terminate()


@pytest.mark.parametrize("argv", [["serve"], []])
def test_sagemaker_invocation_word_is_accepted(argv):
    from whisper_triton.supervisor.serve import parse_args

    assert parse_args(argv).command in ("serve", None)
