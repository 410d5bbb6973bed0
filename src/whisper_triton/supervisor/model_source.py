"""Where `serve` gets its Triton model repository, decided once before Triton starts.

In order:
1. `WHISPER_TRITON_MODEL_S3_URI` set: download the repository that `whisper-export upload` wrote
   there into a local cache, verifying every file's sha256 against the uploaded manifest; any
   corrupted or missing object stops `serve` (non-zero exit) before Triton starts.
2. `WHISPER_TRITON_SAGEMAKER_MODEL_DIR` (default `/opt/ml/model`, where SageMaker unpacks the
   model artifact) holds a repository (`whisper/config.pbtxt`): use it in place.
3. Otherwise `WHISPER_TRITON_MODEL_REPOSITORY`, or the repository shipped with the project.

A repository from 1 or 2 is checked (its whisper config parses, its relative `model_dir` exists)
so that a broken artifact fails here with its cause rather than inside Triton.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings
from .triton_server import TritonStartError

logger = logging.getLogger(__name__)

CACHE_NAME = "whisper-triton-models"


class ModelSourceError(TritonStartError):
    """The model repository cannot be fetched or is not usable; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "s3" | "sagemaker" | "configured"
    repository: Path
    origin: str = ""  # the S3 URI or directory it came from


def is_model_repository(path: Path) -> bool:
    return (path / "whisper" / "config.pbtxt").is_file()


def cache_dir(settings: Settings) -> Path:
    return Path(settings.model_cache_dir) if settings.model_cache_dir else Path(tempfile.gettempdir()) / CACHE_NAME


def download_target(settings: Settings, uri: str) -> Path:
    """One local directory per S3 URI (so two URIs never share a copy)."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir(settings) / f"s3-{digest}"


def fetch_from_s3(settings: Settings, uri: str) -> Path:
    from ..export.s3 import download_directory

    target = download_target(settings, uri)
    logger.info("fetching the model repository from %s into %s", uri, target)
    try:
        download_directory(uri, target)
    except Exception as exc:
        if _disk_full(exc):
            raise ModelSourceError(
                f"The model cache {cache_dir(settings)} is full (no space left on device) while fetching {uri}; "
                "nothing was kept. Free space there, or set WHISPER_TRITON_MODEL_CACHE_DIR to a larger disk."
            ) from exc
        raise _fetch_error(uri, exc) from exc
    return target


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (the transfer wraps the OSError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _fetch_error(uri: str, exc: Exception) -> ModelSourceError:
    from ..export.common import ExportError

    if isinstance(exc, ExportError):
        return ModelSourceError(f"Cannot fetch the model repository from {uri} (WHISPER_TRITON_MODEL_S3_URI): {exc}")
    # botocore/credential errors outside the export's own checks
    return ModelSourceError(
        f"Cannot fetch the model repository from {uri} (WHISPER_TRITON_MODEL_S3_URI): {type(exc).__name__}: {exc}. "
        "Check the URI, the credentials (the endpoint's execution role) and the region."
    )


def check_repository(source: ModelSource) -> None:
    from ..export.common import ExportError
    from ..export.model_repo import check_model_repository

    try:
        check_model_repository(source.repository)
    except ExportError as exc:
        raise ModelSourceError(f"The model repository from {source.origin or source.repository} is not usable: {exc}") from exc


def choose_model_source(settings: Settings, default_repository: Path) -> ModelSource:
    """Decide (and fetch, for S3) the repository; raises ModelSourceError with the cause and fix."""
    if settings.model_s3_uri:
        source = ModelSource("s3", fetch_from_s3(settings, settings.model_s3_uri), settings.model_s3_uri)
    elif settings.sagemaker_model_dir and is_model_repository(Path(settings.sagemaker_model_dir)):
        source = ModelSource("sagemaker", Path(settings.sagemaker_model_dir), settings.sagemaker_model_dir)
    else:
        repository = Path(settings.model_repository) if settings.model_repository else default_repository
        return ModelSource("configured", repository, str(repository))
    check_repository(source)
    logger.info("model repository: %s (from %s)", source.repository, source.origin)
    return source


def model_repository(settings: Settings, default_repository: Path) -> Path:
    """The repository directory Triton should load (see the module docstring for the order)."""
    return choose_model_source(settings, default_repository).repository


# ---- the copy Triton loads -------------------------------------------------------------------------
def model_parameters(config_path: Path) -> dict[str, str]:
    """A model's non-empty config.pbtxt parameters, a relative `model_dir` made absolute."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    values = {key: value.string_value for key, value in config.parameters.items() if value.string_value}
    if values.get("model_dir") and not Path(values["model_dir"]).is_absolute():
        values["model_dir"] = str((config_path.parent.parent / values["model_dir"]).resolve())
    return values


def render_repository(source: Path, target: Path, settings: Settings) -> Path:
    """`source` as Triton should load it, in `target`: each model's config.pbtxt with the parameters it
    declares set to the resolved settings (so the models see what serve decided), everything else
    linked, not copied (engines can be gigabytes)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    values = settings.model_parameters()
    if values.get("model_dir"):
        values["model_dir"] = str(Path(values["model_dir"]).resolve())
    target.mkdir(parents=True, exist_ok=True)
    for model in sorted(p for p in source.iterdir() if (p / "config.pbtxt").is_file()):
        (target / model.name).mkdir(exist_ok=True)
        for entry in model.iterdir():
            if entry.name != "config.pbtxt" and not (target / model.name / entry.name).exists():
                (target / model.name / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        for key in config.parameters:
            if key in values:
                config.parameters[key].string_value = values[key]
        (target / model.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    logger.info("model repository %s rendered into %s (%s)", source, target,
                ", ".join(f"{k}={v}" for k, v in values.items() if v))
    return target
