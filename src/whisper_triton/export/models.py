"""`whisper-export models`: several fine-tunes of one base in one step, and the manifest `serve` reads.

For each LoRA adapter (given one by one, or a folder whose subfolders are adapters), the adapter is
merged into the base with the verified PEFT merge (`merge.py`) and the merged model converted for the
CPU engine (`ctranslate2_export.py`, which writes its model card `whisper_model.json`); the base itself
is converted too, as the default model, unless told not to. Models exported before (or any CTranslate2
/ engine directory) can be listed beside them with `--model ID=DIR`. The output folder then holds one
directory per model id and `models.json` (`contract/models.py`):

    out/models.json                 {"format": 1, "default": "base", "models": [{"id": "base", "path": "base"},
    out/base/                        {"id": "legal", "path": "legal", "adapter": "/adapters/legal"}, ...]}
    out/legal/  out/medical/ ...

`serve` serves it with `WHISPER_TRITON_MODEL_MANIFEST=out/models.json` (the default from the
manifest, the others loaded when a request names them). Each model is written atomically and a model
whose verified output exists is not made again, so a failed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..contract.models import MANIFEST_NAME, ManifestModel, RegistryManifest, is_model_id
from .common import ExportError
from .ctranslate2_export import CT2ExportConfig, ctranslate2_ready, export_ctranslate2
from .merge import ADAPTER_WEIGHTS, MergeConfig, check_whisper_dir, merge_outputs_ready, run_merge

logger = logging.getLogger(__name__)

WORK_SUBDIR = ".merged"  # merged Hugging Face checkpoints, kept for a resumed run; removed at the end


@dataclass
class ModelsExportConfig:
    base_dir: str  # the Hugging Face Whisper directory the adapters were trained on
    output_dir: str
    adapters: dict[str, str] = field(default_factory=dict)  # model id -> adapter directory
    extra_models: dict[str, str] = field(default_factory=dict)  # model id -> an exported model directory
    base_id: str = "base"
    include_base: bool = True  # export the base itself too (the usual default model)
    default: str = ""  # the manifest's default id (empty: the base, else the first model)
    quantization: str = "float16"
    translate: str = "auto"
    keep_merged: bool = False


def adapter_id(path: Path) -> str:
    """A model id from an adapter's folder name: lower case, anything but letters, digits, '.', '_', '-' -> '-'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", path.name.lower()).strip("-.")[:64]
    if not is_model_id(name):
        raise ExportError(f"Cannot make a model id of the adapter folder {path.name!r}: name it with letters and "
                          "digits, or pass --adapter ID=DIR.")
    return name


def adapters_in(folder: str | Path) -> dict[str, str]:
    """Every subfolder of `folder` that holds a PEFT adapter, by id (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"The adapter folder {folder} does not exist.")
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "adapter_config.json").is_file() and any((sub / n).is_file() for n in ADAPTER_WEIGHTS):
            found[adapter_id(sub)] = str(sub)
    if not found:
        raise ExportError(f"{folder} holds no adapter folders (each with adapter_config.json and its weights).")
    return found


def parse_pairs(values: list[str], what: str) -> dict[str, str]:
    """`ID=DIR` (or a bare DIR for adapters, named after its folder) -> {id: dir}; ids checked, unique."""
    pairs: dict[str, str] = {}
    for value in values:
        model_id, sep, directory = value.partition("=")
        if not sep:
            if what != "adapter":
                raise ExportError(f"--{what} takes ID=DIR, got {value!r}.")
            model_id, directory = adapter_id(Path(value)), value
        if not is_model_id(model_id):
            raise ExportError(f"{model_id!r} is not a model id: 1-64 letters, digits, '.', '_', '-'.")
        if model_id in pairs:
            raise ExportError(f"The model id {model_id!r} is given twice.")
        pairs[model_id] = directory
    return pairs


def _export_one(config: ModelsExportConfig, model_id: str, adapter: str | None) -> Path:
    output = Path(config.output_dir) / model_id
    if ctranslate2_ready(output):
        logger.info("%s: verified output exists, skipped", model_id)
        return output
    merged = Path(config.output_dir) / WORK_SUBDIR / model_id
    if not merge_outputs_ready(merged):
        logger.info("%s: merging %s into %s", model_id, adapter or "no adapter", config.base_dir)
        run_merge(MergeConfig(base_dir=config.base_dir, adapter_dir=adapter, output_dir=str(merged)))
    export_ctranslate2(CT2ExportConfig(hf_dir=str(merged / "hf"), output_dir=str(output),
                                       quantization=config.quantization, translate=config.translate))
    return output


def export_models(config: ModelsExportConfig) -> RegistryManifest:
    """Merge and convert every adapter (and the base), then write `models.json`; returns the manifest."""
    check_whisper_dir(config.base_dir)
    for model_id, directory in config.extra_models.items():
        if not Path(directory).is_dir():
            raise ExportError(f"--model {model_id}={directory}: the directory does not exist.")
    ids = ([config.base_id] if config.include_base else []) + list(config.adapters) + list(config.extra_models)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ExportError(f"Model ids used twice: {', '.join(duplicates)}; rename one (--adapter ID=DIR).")
    if not ids:
        raise ExportError("Nothing to export: give adapters (--adapter, --adapters) or keep the base.")
    if config.default and config.default not in ids:
        raise ExportError(f"--default {config.default!r} is not one of the exported ids ({', '.join(ids)}).")
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    entries: list[ManifestModel] = []
    if config.include_base:
        _export_one(config, config.base_id, None)
        entries.append(ManifestModel(id=config.base_id, path=config.base_id, description="the base model"))
    for model_id, adapter in config.adapters.items():
        _export_one(config, model_id, adapter)
        entries.append(ManifestModel(id=model_id, path=model_id, adapter=str(Path(adapter).resolve()),
                                     description=f"{Path(config.base_dir).name} + LoRA {Path(adapter).name}"))
    for model_id, directory in config.extra_models.items():
        entries.append(ManifestModel(id=model_id, path=str(Path(directory).resolve())))
    default = config.default or (config.base_id if config.include_base else entries[0].id)
    manifest = RegistryManifest(default=default, models=entries).check(str(output / MANIFEST_NAME))
    manifest.save(output)
    if not config.keep_merged:
        shutil.rmtree(output / WORK_SUBDIR, ignore_errors=True)
    logger.info("%d models exported to %s (default %s); serve them with WHISPER_TRITON_MODEL_MANIFEST=%s",
                len(entries), output, default, output / MANIFEST_NAME)
    return manifest
