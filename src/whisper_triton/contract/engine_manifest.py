"""The engine manifest written next to built engines and read by the TensorRT-LLM engine at load.

Engines run only with the TensorRT-LLM version and GPU architecture that built them; the manifest
records both, plus the build limits that the Triton configuration must not exceed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def release_of(version: str) -> str:
    """The release a version belongs to: '0.17.0.post1' and '0.17.0+cu128' -> '0.17.0'.

    PyPI only has tensorrt-llm 0.17.0.post1 (a repackaging of the same build), so versions are
    compared by release numbers, never as strings."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version.strip()).base_version
    except InvalidVersion:
        return version.strip()


def same_release(a: str, b: str) -> bool:
    return release_of(a) == release_of(b)


@dataclass
class BuildConfig:
    """One build configuration for the encoder and decoder engines (rendered into trtllm-build flags)."""

    max_batch_size: int = 8
    max_beam_width: int = 4
    max_output_len: int = 448  # new tokens at most; prompt + new tokens share Whisper's 448 positions
    # decoder input (prompt) tokens: <|startofprev|>, up to 223 tokens of previous text (openai-whisper's
    # n_text_ctx // 2 - 1) and up to 4 start tokens (sot, language, task, notimestamps)
    max_prompt_len: int = 228
    # None: the checkpoint's (what `whisper-export` passes unless --n-mels is given). A value is checked
    # against the checkpoint, never silently used; the default is large-v3's and turbo's 128 because
    # readers of a manifest (engine limits) need a number
    n_mels: int | None = 128
    dtype: str = "float16"
    weight_only_precision: str | None = None  # None, "int8" or "int4"
    paged_kv_cache: bool = True
    remove_input_padding: bool = True


@dataclass
class EngineManifest:
    tensorrt_llm_version: str
    gpu_arch: str  # compute capability as "sm_86"
    gpu_name: str = ""
    build: BuildConfig = field(default_factory=BuildConfig)
    model: dict = field(default_factory=dict)  # e.g. {"name": "large-v3", "is_multilingual": true, "vocab_size": 51866}
    files: dict = field(default_factory=dict)  # relative path -> {"size": int, "sha256": str}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "EngineManifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"No {MANIFEST_NAME} in {directory}: engines must come from the project's export, which "
                "records the TensorRT-LLM version and GPU architecture they were built for."
            )
        data = json.loads(path.read_text())
        build = BuildConfig(**data.pop("build", {}))
        return cls(build=build, **data)
