"""A multi-model endpoint's models in S3: each model of a `models.json` (written by `whisper-export
models`) packed as `<id>.tar.gz` under one prefix, the layout SageMaker's multi-model endpoints read
(`TargetModel="<id>.tar.gz"` names one; the container unpacks nothing itself: SageMaker does)."""

from __future__ import annotations

import logging
import tarfile
import tempfile
from pathlib import Path

from ..contract.models import RegistryManifest
from .aws import parse_s3_uri
from .errors import DeployError

logger = logging.getLogger("whisper_triton.deploy")


def pack_model(model_dir: Path, archive: Path) -> Path:
    """`model_dir`'s files at the archive's root (SageMaker unpacks it into /opt/ml/models/<name>/model)."""
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # weights barely compress: save the CPU
        for path in sorted(model_dir.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                tar.add(path, arcname=str(path.relative_to(model_dir)))
    return archive


def upload_models(manifest_path: str | Path, prefix: str, s3) -> list[str]:
    """Pack and upload every model of the manifest that has a directory; returns the TargetModel names."""
    try:
        manifest = RegistryManifest.load(manifest_path)
    except ValueError as exc:
        raise DeployError(cause=str(exc), fix="Write it with `whisper-export models`.", param="manifest") from None
    try:
        bucket, key_prefix = parse_s3_uri(prefix)
    except ValueError as exc:
        raise DeployError(cause=str(exc), fix="Pass --uri s3://BUCKET/PREFIX/.", param="uri") from None
    root = Path(manifest_path)
    root = root if root.is_dir() else root.parent
    targets = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in manifest.models:
            if not model.path:
                logger.warning("model %s lives in S3 (%s): not packed", model.id, model.s3_uri)
                continue
            archive = pack_model((root / model.path).resolve(), Path(scratch) / f"{model.id}.tar.gz")
            key = f"{key_prefix.rstrip('/')}/{model.id}.tar.gz".lstrip("/")
            s3.upload_file(str(archive), bucket, key)
            targets.append(f"{model.id}.tar.gz")
            logger.info("uploaded %s to s3://%s/%s", model.id, bucket, key)
    return targets
