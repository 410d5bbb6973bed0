"""The models an endpoint knows: their records, where their files are, and what each costs.

Three sources fill it: the default model (`serve`'s own, always loaded), a `models.json` manifest
(written by `whisper-export models`, entries by directory or S3 prefix), and SageMaker's
multi-model contract (`POST /models` with a local `url`). Every directory is checked before it is
used: it must hold a model this server runs (a CTranslate2 Whisper directory, a TensorRT-LLM engine
directory, or a repository laid out by `whisper-export model-repo`), and a SageMaker `url` must lie
under one of the configured roots (`WHISPER_TRITON_MODEL_LOAD_ROOTS`) after symlinks are resolved.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..contract.models import MANIFEST_NAME, RegistryManifest
from ..errors import WhisperTritonError, invalid_parameter

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "whisper-tiny.en"  # the embedded default (settings.default_model_dir)
GENERIC_DIR_NAMES = {"model", "models", "1", "ct2", "ctranslate2", "engine", "engines", "whisper", "opt", "ml"}
REPOSITORY_ENGINE_SUBDIR = Path("whisper") / "1" / "engine"  # export/model_repo.py ENGINE_SUBDIR
MB = 1024 * 1024
# What one engine model's stub takes on CPU, fitted to bench/models.py (2026-12-07, 2 cores, float32
# compute, after a request): tiny.en (72 MB of float16 weights) 437 MB, base (139 MB) 664 MB, i.e.
# about 190 MB + 3.4 x the weights file (float16 -> float32, encoder outputs, activations). The
# estimate rounds both up, so the budget errs on the side of room.
STUB_OVERHEAD_MB = 200.0
WEIGHTS_FACTOR = 3.5


def model_id_from_dir(model_dir: str) -> str:
    """A readable id for the model served from `model_dir` (its first non-generic folder name)."""
    if not model_dir:
        return EMBEDDED_MODEL_ID
    for part in reversed(Path(model_dir).parts):
        if part.lower() not in GENERIC_DIR_NAMES and part not in ("/", ""):
            return part.replace("_", "-")
    return "whisper"


@dataclass
class ModelRecord:
    """One model the endpoint can serve. `model_dir` is None until an S3 model has been fetched."""

    id: str
    source: str  # "default" | "manifest" | "sagemaker"
    model_dir: Path | None = None
    engine: str = ""  # "ctranslate2" | "tensorrtllm" (detected from the files)
    s3_uri: str = ""
    url: str = ""  # SageMaker's `url` (reported back by GET /models)
    target_model: str = ""  # SageMaker's X-Amzn-SageMaker-Target-Model when it loaded this model
    aliases: tuple[str, ...] = ()
    declared_memory_mb: float | None = None
    description: str = ""
    card: dict = field(default_factory=dict)  # whisper_model.json, when the export wrote one

    @property
    def pinned(self) -> bool:
        """The default model is never unloaded: the `whisper` front and `transcribe` without a model use it."""
        return self.source == "default"


# ---- what a directory holds -------------------------------------------------------------------------
def detect_engine(model_dir: Path) -> str | None:
    """"ctranslate2" or "tensorrtllm" when `model_dir` holds that kind of model, else None (files only)."""
    if (model_dir / "manifest.json").is_file() and (model_dir / "decoder").is_dir():
        return "tensorrtllm"
    if (model_dir / "model.bin").is_file():
        return "ctranslate2"
    return None


def find_model_dir(path: Path) -> tuple[Path, str]:
    """The model inside `path`: `path` itself, a repository's `whisper/1/engine`, or the one
    subdirectory that holds a model (an archive with a top folder). Raises a 400 naming `url`."""
    candidates = [path, path / REPOSITORY_ENGINE_SUBDIR]
    if path.is_dir():
        subdirs = [entry for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
        if len(subdirs) == 1:
            candidates += [subdirs[0], subdirs[0] / REPOSITORY_ENGINE_SUBDIR]
    for candidate in candidates:
        engine = detect_engine(candidate) if candidate.is_dir() else None
        if engine is not None:
            if not (candidate / "tokenizer.json").is_file():
                raise invalid_parameter("url", f"The model in {candidate.name!r} has no tokenizer.json: both engines "
                                        "read it. Export the model again (whisper-export ctranslate2 / build-engines).")
            return candidate, engine
    raise invalid_parameter("url", "The model directory holds no Whisper model this server runs: a CTranslate2 "
                            "directory (model.bin, tokenizer.json), a TensorRT-LLM engine directory (manifest.json, "
                            "encoder/, decoder/) or a repository from `whisper-export model-repo`.")


def under_roots(url: str, roots: list[Path]) -> Path:
    """SageMaker's `url` as a directory, only when it lies under one of `roots` once resolved (no
    `..`, no symlink out); a 400 naming `url` otherwise. The url is never echoed back."""
    if not url or not os.path.isabs(url) or "\x00" in url:
        raise invalid_parameter("url", "`url` must be the absolute path of the model's directory "
                                "(SageMaker sends /opt/ml/models/<name>/model).")
    resolved = Path(url).resolve()
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise invalid_parameter("url", "`url` is outside the directories models are loaded from "
                                "(WHISPER_TRITON_MODEL_LOAD_ROOTS).")
    if not resolved.is_dir():
        raise WhisperTritonError("The model directory `url` does not exist.", "url", 404, "not_found")
    return resolved


def read_card(model_dir: Path) -> dict:
    import json

    from ..contract.model_card import MODEL_CARD

    try:
        return json.loads((model_dir / MODEL_CARD).read_text()) if (model_dir / MODEL_CARD).is_file() else {}
    except ValueError:
        return {}


def describe_dir(record: ModelRecord, model_dir: Path) -> ModelRecord:
    """`record` with its located model directory, engine and card."""
    located, engine = find_model_dir(model_dir)
    record.model_dir, record.engine, record.card = located, engine, read_card(located)
    return record


# ---- memory -------------------------------------------------------------------------------------------
def estimate_memory_mb(model_dir: Path, engine: str) -> float:
    """What loading the model costs on its device, from its files (the budget's unit of account).

    CTranslate2 on CPU: one stub process (`STUB_OVERHEAD_MB`) plus `WEIGHTS_FACTOR` times the weights
    file (stored float16, computed float32 by default, with its activations). TensorRT-LLM: the engine files, which the runtime maps
    whole into GPU memory; its KV cache comes on top and is set by
    `WHISPER_TRITON_KV_CACHE_FREE_GPU_MEMORY_FRACTION` (docs/gpu.md has the arithmetic), so a
    manifest should declare `memory_mb` for engines."""
    if engine == "tensorrtllm":
        files = [p for p in model_dir.rglob("*.engine")] or [p for p in model_dir.rglob("*") if p.is_file()]
        return round(sum(p.stat().st_size for p in files) / MB, 1)
    weights = (model_dir / "model.bin").stat().st_size / MB
    return round(STUB_OVERHEAD_MB + WEIGHTS_FACTOR * weights, 1)


def stub_rss_mb(repository: Path, triton_model: str) -> float | None:
    """Resident memory of the Python-backend stub(s) running `triton_model` from `repository`
    (Linux /proc; None elsewhere or when none runs). Reported beside the estimate, never budgeted."""
    marker = str(repository / triton_model) + os.sep
    total, found = 0, False
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if not args or not args[0].endswith(b"triton_python_backend_stub") or len(args) < 2:
                continue
            if not args[1].decode(errors="replace").startswith(marker):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    found = True
        except (OSError, ValueError, IndexError):
            continue
    return round(total / MB, 1) if found else None


# ---- the manifest -------------------------------------------------------------------------------------
def manifest_records(path: Path) -> tuple[list[ModelRecord], str]:
    """(records, default id) of a `models.json`; directories relative to it, each checked now."""
    try:
        manifest = RegistryManifest.load(path)
    except ValueError as exc:
        raise ValueError(f"{exc}. Write it with `whisper-export models`, or fix the file.") from None
    root = (path if path.is_dir() else path.parent).resolve()
    records = []
    for model in manifest.models:
        record = ModelRecord(id=model.id, source="manifest", s3_uri=model.s3_uri, aliases=model.aliases,
                             declared_memory_mb=model.memory_mb, description=model.description)
        if model.path:
            directory = (root / model.path).resolve()
            try:
                describe_dir(record, directory)
            except WhisperTritonError as exc:
                raise ValueError(f"{path}: model {model.id!r} at {directory}: {exc.message}") from None
        records.append(record)
    return records, manifest.default_id


def manifest_path(setting: str, repository: Path | None) -> Path | None:
    """The manifest to read: the setting, else `models.json` at the repository's root when there is one."""
    if setting:
        return Path(setting)
    if repository is not None and (repository / MANIFEST_NAME).is_file():
        return repository / MANIFEST_NAME
    return None


def s3_target(cache_dir: Path, uri: str) -> Path:
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir / f"s3-model-{digest}"


def fetch_s3_model(record: ModelRecord, cache_dir: Path) -> ModelRecord:
    """Fetch an S3 model once (sha256-verified against the uploaded manifest), then describe it."""
    from ..export.common import ExportError
    from ..export.s3 import download_directory

    target = s3_target(cache_dir, record.s3_uri)
    if not target.is_dir():
        logger.info("fetching model %s from %s into %s", record.id, record.s3_uri, target)
        try:
            download_directory(record.s3_uri, target)
        except ExportError as exc:
            raise WhisperTritonError(f"The model {record.id!r} cannot be fetched from S3: {exc}", "model", 502,
                                     "model_fetch_failed") from None
    return describe_dir(record, target)
