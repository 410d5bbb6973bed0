"""CTranslate2 export of the merged Hugging Face model, for the CPU engine."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import ExportError, atomic_output_dir, is_complete, mark_complete
from .merge import check_whisper_dir
from .model_card import dims_from_hf_config_json, model_card

logger = logging.getLogger(__name__)

STEP = "ctranslate2"
COPY_FILES = ("tokenizer.json", "preprocessor_config.json")
QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16")


@dataclass
class CT2ExportConfig:
    hf_dir: str
    output_dir: str
    quantization: str = "float16"  # storage type; the CPU engine picks its compute type at load
    translate: str = "auto"  # whisper_model.json's `translate`: auto (from the layout), yes or no


def export_ctranslate2(config: CT2ExportConfig) -> Path:
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    if config.quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {config.quantization!r}.")
    hf_dir = Path(config.hf_dir)
    hf_config = check_whisper_dir(hf_dir)
    card = model_card(dims_from_hf_config_json(hf_config), config.translate)
    if not (hf_dir / "tokenizer.json").is_file():
        raise ExportError(f"{hf_dir} has no tokenizer.json; the CPU engine needs it beside model.bin.")
    copy_files = [name for name in COPY_FILES if (hf_dir / name).is_file()]
    with atomic_output_dir(config.output_dir) as staging:
        try:
            TransformersConverter(str(hf_dir), copy_files=copy_files).convert(str(staging), quantization=config.quantization, force=True)
        except (ValueError, OSError, RuntimeError) as exc:
            raise ExportError(f"CTranslate2 could not convert {hf_dir}: {exc}") from exc
        declare_translate(staging, card.translate)
        model = ctranslate2.models.Whisper(str(staging), device="cpu", compute_type="float32")
        if model.n_mels != card.n_mels:  # (CTranslate2 4.8's is_multilingual reads False for every model)
            raise ExportError(f"The converted model has n_mels={model.n_mels}, the source {card.n_mels}.")
        del model
        card.save(staging)
        mark_complete(staging, STEP, {**asdict(config), "model": asdict(card)})
    logger.info("CTranslate2 model written to %s (%s)", config.output_dir, config.quantization)
    return Path(config.output_dir)


def declare_translate(model_dir: Path, translate: bool) -> None:
    """Also state `translate` in the model's config.json, where the CTranslate2 engine reads it
    (CTranslate2 ignores keys it does not know); whisper_model.json has the full card."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["translate"] = bool(translate)
    path.write_text(json.dumps(config, indent=2) + "\n")


def ctranslate2_ready(output_dir: str | Path) -> bool:
    return is_complete(output_dir, STEP)
