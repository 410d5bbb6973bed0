"""Pieces every export step shares: the error type, atomic output directories, file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

DONE_MARKER = ".export_complete.json"  # written last into every step's output directory
_CHUNK = 1 << 20


class ExportError(RuntimeError):
    """An export step cannot go on; the message says the cause and the fix."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(directory: str | Path) -> list[Path]:
    """Regular files under `directory`, relative, sorted; the completion marker is left out."""
    root = Path(directory)
    return sorted(
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and path.name != DONE_MARKER
    )


def file_table(directory: str | Path) -> dict[str, dict]:
    """relative path -> {"size", "sha256"} for every file under `directory`."""
    root = Path(directory)
    return {
        rel.as_posix(): {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in list_files(root)
    }


def check_writable_parent(output: Path) -> None:
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"Cannot create the output's parent directory {parent} ({exc}). Choose a writable output path.") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"The output directory {parent} is not writable. Choose a writable output path or fix its permissions.")


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `output`; on success it replaces `output`.

    On any error the temporary directory is removed and `output` is left as it was, so a later
    step never finds (and trusts) a half-written result. The step writes `DONE_MARKER` itself
    (via `mark_complete`) once it has verified what it wrote.
    """
    output = Path(output).absolute()
    check_writable_parent(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists. Remove it or pass overwrite.")
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    os.chmod(staging, 0o755)
    try:
        yield staging
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, trash / output.name)
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def mark_complete(directory: str | Path, step: str, details: dict | None = None) -> Path:
    """Record that `step` wrote and verified `directory`, with every file's sha256."""
    directory = Path(directory)
    record = {"step": step, "files": file_table(directory), "details": details or {}}
    path = directory / DONE_MARKER
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def is_complete(directory: str | Path, step: str | None = None) -> bool:
    """True when `directory` holds a completion record whose files all still hash the same."""
    directory = Path(directory)
    marker = directory / DONE_MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        return False
    if step is not None and record.get("step") != step:
        return False
    files = record.get("files", {})
    for rel, info in files.items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            logger.warning("%s: %s changed since it was written; the step will run again", directory, rel)
            return False
    return set(files) == {rel.as_posix() for rel in list_files(directory)}
