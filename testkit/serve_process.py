"""A fresh `serve` for benchmarks (tests use tests/conftest.py's fixtures): started on free loopback
ports, waited for, stopped with its whole process group, and read from outside (its process tree's
RSS and CPU time, Triton's inference counts over gRPC: Triton's HTTP endpoint is off)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(log_path: Path, extra_env: dict | None = None, root: Path = ROOT,
                timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`serve` of the checkout at `root` (its own package first on PYTHONPATH, so another checkout's code
    can be measured with this venv), ready; (process, proxy URL)."""
    ports = [free_port() for _ in range(4)]
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(ports[0]), "WHISPER_TRITON_BIND_HOST": "127.0.0.1",
           "WHISPER_TRITON_TRITON_HTTP_PORT": str(ports[1]), "WHISPER_TRITON_TRITON_GRPC_PORT": str(ports[2]),
           "WHISPER_TRITON_TRITON_METRICS_PORT": str(ports[3]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")])),
           **(extra_env or {})}
    process = subprocess.Popen([str(root / "serve")], env=env, cwd=root, stdout=log_path.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=3) as reply:
                if reply.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.5)
    stop_serve(process)
    raise RuntimeError(f"serve was not ready within {timeout_s:.0f} s; see {log_path}")


def stop_serve(process: subprocess.Popen) -> None:
    """SIGTERM to serve's process group (serve, tritonserver, the stubs), SIGKILL after 45 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss_mb(pid: int) -> float:
    """Resident memory of serve's whole process tree (proxy, tritonserver, Python-backend stubs), MiB."""
    import psutil

    total = 0
    for process in _tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of serve's whole process tree."""
    import psutil

    total = 0.0
    for process in _tree(pid):
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def inference_count(process: subprocess.Popen, model: str) -> int:
    """Triton's inference count of `model` in the serve `process` started (over gRPC)."""
    import psutil
    import tritonclient.grpc as grpcclient

    port = psutil.Process(process.pid).environ()["WHISPER_TRITON_TRITON_GRPC_PORT"]
    with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        return int(client.get_inference_statistics(model).model_stats[0].inference_count)
