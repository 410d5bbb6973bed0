"""Least privilege (issue 21, item 7), against one real `serve` started the way a careless deployment
would: an API key and AWS credentials in its environment.

- Triton and its Python-backend stubs (which parse untrusted media) get an explicit environment: no
  API key, no AWS variable, no token, while serve itself has them.
- Triton's HTTP endpoint is off (everything speaks gRPC), and its gRPC repository, shared-memory,
  logging and trace protocols answer only with this start's key, which the registry alone holds.
"""

from __future__ import annotations

import re
import time

import httpx
import psutil
import pytest

from conftest import start_serve

pytestmark = pytest.mark.triton

API_KEY = "lp-test-key-0123456789"
LEAKY_ENV = {
    "WHISPER_TRITON_API_KEY": API_KEY,
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_SESSION_TOKEN": "fake-session-token",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/fake",
    "HF_TOKEN": "hf_fake_token",
    "WHISPER_TRITON_CPU_THREADS": "2",  # a setting the stubs do need still reaches them
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    instance = start_serve(tmp_path_factory.mktemp("least-privilege"), extra_env=LEAKY_ENV)
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


def triton_of(instance) -> psutil.Process:
    children = psutil.Process(instance.process.pid).children(recursive=True)
    return next(child for child in children if child.name() == "tritonserver")


def stubs_of(triton: psutil.Process) -> list[psutil.Process]:
    return [child for child in triton.children() if "triton_python_backend_stub" in child.name()
            or any("triton_python_backend_stub" in part for part in child.cmdline()[:1])]


def control_key(triton: psutil.Process) -> tuple[str, str]:
    """The restricted protocols' header and value, as serve gave them to Triton (the registry's secret)."""
    argument = next(arg for arg in triton.cmdline() if arg.startswith("--grpc-restricted-protocol="))
    header, value = argument.split(":", 1)[1].split("=", 1)
    return "triton-grpc-protocol-" + header, value  # the metadata name Triton checks


def test_triton_and_its_stubs_get_neither_the_api_key_nor_aws_credentials(guarded):
    serve_env = psutil.Process(guarded.process.pid).environ()
    assert serve_env["WHISPER_TRITON_API_KEY"] == API_KEY and "AWS_SECRET_ACCESS_KEY" in serve_env
    triton = triton_of(guarded)
    stubs = stubs_of(triton)
    assert len(stubs) >= 3  # transcribe, transcribe_stream, whisper_window (and whisper)
    for process in (triton, *stubs):
        env = process.environ()
        leaked = sorted(name for name in env if name.startswith("AWS_") or re.search("API_KEY|TOKEN|SECRET", name))
        assert leaked == [], f"{process.name()} ({process.pid}) was given {leaked}"
        assert API_KEY not in "\n".join(env.values())
        assert env["WHISPER_TRITON_CPU_THREADS"] == "2" and env["PATH"]
    # the proxy still asks for the key
    assert httpx.post(guarded.url + "/invocations", content=b"not audio", timeout=60).status_code == 401


def test_the_stubs_transcribe_with_the_reduced_environment(guarded, speech_clips):
    clip = speech_clips[0]
    reply = httpx.post(guarded.url + "/invocations", content=clip.wav_bytes, timeout=120,
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "audio/wav"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"].strip()


def test_triton_listens_on_grpc_and_metrics_only(guarded):
    triton = triton_of(guarded)
    sockets = [c.laddr for c in triton.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert {address.port for address in sockets} == {guarded.triton_grpc_port, guarded.triton_metrics_port}
    # loopback only (gRPC binds the IPv4-mapped form of 127.0.0.1)
    assert {address.ip for address in sockets} <= {"127.0.0.1", "::ffff:127.0.0.1"}


def _refused(call) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value)


def test_repository_shared_memory_logging_and_trace_need_the_key(guarded):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(guarded.grpc_url) as client:
        refusals = [
            _refused(lambda: client.get_model_repository_index()),
            _refused(lambda: client.unload_model("whisper_window")),
            _refused(lambda: client.load_model("whisper_window")),
            _refused(lambda: client.get_system_shared_memory_status()),
            _refused(lambda: client.register_system_shared_memory("probe", "/probe", 64)),
            _refused(lambda: client.get_log_settings()),
            _refused(lambda: client.update_log_settings({"log_verbose_level": 1})),
            _refused(lambda: client.get_trace_settings()),
        ]
        assert all("restricted" in text.lower() or "permission" in text.lower() for text in refusals), refusals
        # nothing was unloaded; inference, health, metadata and statistics stay open on loopback
        assert client.is_server_ready() and client.is_model_ready("whisper_window")
        assert client.get_inference_statistics("whisper_window").model_stats
        # a wrong key is refused too
        header, key = control_key(triton_of(guarded))
        _refused(lambda: client.get_model_repository_index(headers={header: key[::-1]}))
        # and serve's own key opens it (the registry loads and unloads models with it)
        index = client.get_model_repository_index(headers={header: key}, as_json=True)
        assert {"whisper_window", "transcribe"} <= {model["name"] for model in index["models"]}


def test_the_control_key_is_long_and_never_logged(guarded):
    _, key = control_key(triton_of(guarded))
    assert len(key) >= 32
    deadline = time.monotonic() + 5
    while "starting tritonserver" not in guarded.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "--grpc-restricted-protocol" in guarded.log()  # the command line is logged ...
    assert key not in guarded.log()  # ... with the secret masked


def test_the_child_environment_is_an_allowlist():
    """The filter itself, on names a deployment might inject (any case: settings read them case-blind)."""
    from whisper_triton.supervisor.triton_server import child_environment

    given = {"whisper_triton_api_key": "k", "WHISPER_TRITON_API_KEY": "k", "AWS_REGION": "us-east-1",
             "AWS_WEB_IDENTITY_TOKEN_FILE": "/t", "HF_TOKEN": "t", "CUDA_SECRET": "s", "DATABASE_URL": "db",
             "SAGEMAKER_BIND_TO_PORT": "8080", "OPENAI_API_KEY": "o", "WHISPER_TRITON_MODEL_DIR": "/m",
             "WHISPER_TRITON_CPU_THREADS": "2", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0",
             "PATH": "/bin", "HOME": "/home/whisper", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert child_environment(given) == {"WHISPER_TRITON_MODEL_DIR": "/m", "WHISPER_TRITON_CPU_THREADS": "2",
                                        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                        "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0", "PATH": "/bin",
                                        "HOME": "/home/whisper"}
