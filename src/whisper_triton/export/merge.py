"""Merge: a Hugging Face Whisper directory plus an optional PEFT LoRA adapter -> one merged model,
saved as a Hugging Face checkpoint and as an openai-whisper checkpoint, verified before saving.

Checks (on a fixed, seeded input: random log-mel window and a short decoder prompt):
1. merged-model logits equal the PEFT model's within `MergeConfig.lora_atol`;
2. the openai-layout model (our own forward over the converted state dict, loaded strictly)
   reproduces the merged HF logits within `MergeConfig.openai_atol`;
3. after saving, the files are reloaded and checked again (both formats).
Output is written to a temporary directory beside the target and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .common import ExportError, atomic_output_dir, is_complete, mark_complete
from .openai_model import dims_from_hf_config, hf_to_openai_state_dict, load_openai_model

logger = logging.getLogger(__name__)

STEP = "merge"
HF_SUBDIR = "hf"
OPENAI_SUBDIR = "openai"
OPENAI_FILE = "model.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
                   "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json", "generation_config.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class MergeConfig:
    base_dir: str
    output_dir: str
    adapter_dir: str | None = None
    save_dtype: str = "float32"  # "float32", "float16" or "bfloat16"
    # float32 logits of Whisper are O(10-40); merging W + BA reorders float32 sums only
    lora_atol: float = 1e-3
    openai_atol: float = 1e-3
    seed: int = 0


@dataclass
class MergeReport:
    adapter: str | None
    lora_max_abs_diff: float | None  # merged vs PEFT logits
    lora_changed_logits: float | None  # PEFT vs base logits: 0 for a zero-initialised adapter
    openai_max_abs_diff: float  # openai layout vs merged HF logits
    saved_max_abs_diff: float  # reloaded saved files vs in-memory merged logits


def check_whisper_dir(model_dir: str | Path) -> dict:
    """Return config.json of a Hugging Face Whisper directory or raise a clear error."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ExportError(f"Base model directory {model_dir} does not exist. Pass a local Hugging Face Whisper directory.")
    if not config_path.is_file():
        raise ExportError(f"{model_dir} has no config.json: it is not a Hugging Face model directory.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{config_path} is not valid JSON ({exc}).") from exc
    if config.get("model_type") != "whisper":
        raise ExportError(
            f"{model_dir} holds a {config.get('model_type')!r} model, not Whisper (config.json model_type must be 'whisper')."
        )
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise ExportError(f"{model_dir} has a Whisper config but no weights (*.safetensors or *.bin).")
    return config


def check_adapter_dir(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise ExportError(f"LoRA adapter directory {adapter_dir} does not exist. Pass the directory PEFT's save_pretrained wrote.")
    if not config_path.is_file():
        raise ExportError(f"{adapter_dir} has no adapter_config.json: it is not a PEFT adapter directory.")
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ExportError(f"{adapter_dir} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{adapter_dir} is a {config.get('peft_type')} adapter; only LoRA adapters can be merged.")
    return config


def fixed_inputs(config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded log-mel window in Whisper's value range and a short prompt of real token ids."""
    generator = torch.Generator().manual_seed(seed)
    mel = (torch.rand(1, config.num_mel_bins, 3000, generator=generator) * 2.0 - 1.0).clamp(-1.0, 1.5)
    start = config.decoder_start_token_id
    tokens = torch.tensor([[start, start + 1, 440, 1002, 296, 13]], dtype=torch.long)
    tokens = tokens.clamp(max=config.vocab_size - 1)
    return mel, tokens


@torch.no_grad()
def hf_logits(model, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_features=mel, decoder_input_ids=tokens).logits.float()


def _load_base(base_dir: Path):
    from transformers import WhisperForConditionalGeneration

    try:
        return WhisperForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ExportError(f"Could not load {base_dir} as WhisperForConditionalGeneration: {exc}") from exc


def _apply_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(
            f"The LoRA adapter in {adapter_dir} does not fit the base model ({_short(exc)}). "
            "Use the adapter trained on this base model (same size and target modules)."
        ) from exc


def _short(exc: Exception, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def merge_model(config: MergeConfig) -> tuple[object, MergeReport]:
    """Load, merge and verify in memory; returns (merged HF model, report)."""
    base_dir = Path(config.base_dir)
    check_whisper_dir(base_dir)
    model = _load_base(base_dir)
    mel, tokens = fixed_inputs(model.config, config.seed)
    lora_diff = changed = None
    if config.adapter_dir:
        check_adapter_dir(config.adapter_dir)
        base_logits = hf_logits(model, mel, tokens)
        peft_model = _apply_adapter(model, Path(config.adapter_dir))
        peft_logits = hf_logits(peft_model, mel, tokens)
        changed = float((peft_logits - base_logits).abs().max())
        model = peft_model.merge_and_unload()
        merged_logits = hf_logits(model, mel, tokens)
        lora_diff = float((merged_logits - peft_logits).abs().max())
        logger.info("LoRA merge: merged vs PEFT max |dlogit| = %.3g (tolerance %g); adapter moved logits by %.3g",
                    lora_diff, config.lora_atol, changed)
        if not lora_diff <= config.lora_atol:
            raise ExportError(
                f"The merged model's logits differ from the PEFT model's by {lora_diff:.3g} (> {config.lora_atol}). "
                "The adapter may use features merge_and_unload cannot fold in; nothing was written."
            )
    else:
        merged_logits = hf_logits(model, mel, tokens)
    openai_diff = _check_openai(model, mel, tokens, merged_logits, config.openai_atol)
    report = MergeReport(adapter=config.adapter_dir, lora_max_abs_diff=lora_diff, lora_changed_logits=changed,
                         openai_max_abs_diff=openai_diff, saved_max_abs_diff=float("nan"))
    return model, report


def openai_checkpoint(model) -> dict:
    dims = dims_from_hf_config(model.config)
    state = hf_to_openai_state_dict(model.state_dict(), dims)
    return {"dims": dims.to_dict(), "model_state_dict": state}


def _check_openai(model, mel, tokens, reference: torch.Tensor, atol: float) -> float:
    checkpoint = openai_checkpoint(model)
    openai_model = load_openai_model(checkpoint)  # strict: every name and shape must fit
    with torch.no_grad():
        logits = openai_model(mel, tokens).float()
    diff = float((logits - reference).abs().max())
    logger.info("openai layout vs Hugging Face: max |dlogit| = %.3g (tolerance %g)", diff, atol)
    if not diff <= atol:
        raise ExportError(f"The openai-format weights give logits {diff:.3g} away from the HF model's (> {atol}); nothing was written.")
    return diff


def _save(model, base_dir: Path, staging: Path, dtype: str) -> None:
    torch_dtype = getattr(torch, dtype)
    hf_dir = staging / HF_SUBDIR
    model.to(torch_dtype).save_pretrained(str(hf_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = base_dir / name
        if source.is_file() and not (hf_dir / name).exists():
            shutil.copy2(source, hf_dir / name)
    (staging / OPENAI_SUBDIR).mkdir()
    checkpoint = openai_checkpoint(model)
    checkpoint["model_state_dict"] = {k: v.to(torch_dtype).contiguous() for k, v in checkpoint["model_state_dict"].items()}
    torch.save(checkpoint, staging / OPENAI_SUBDIR / OPENAI_FILE)
    model.to(torch.float32)


def _check_saved(staging: Path, mel, tokens, reference: torch.Tensor, atol: float) -> float:
    """Reload both saved formats and compare with the in-memory merged logits."""
    reloaded = _load_base(staging / HF_SUBDIR)
    hf_diff = float((hf_logits(reloaded, mel, tokens) - reference).abs().max())
    checkpoint = torch.load(staging / OPENAI_SUBDIR / OPENAI_FILE, map_location="cpu", weights_only=True)
    with torch.no_grad():
        openai_diff = float((load_openai_model(checkpoint)(mel, tokens).float() - reference).abs().max())
    diff = max(hf_diff, openai_diff)
    if not diff <= atol:
        raise ExportError(f"Saved checkpoints reload with logits {diff:.3g} away from the merged model (> {atol}).")
    return diff


def run_merge(config: MergeConfig) -> MergeReport:
    """Merge, verify, save atomically to `config.output_dir` (holding hf/ and openai/model.pt)."""
    if config.save_dtype not in ("float32", "float16", "bfloat16"):
        raise ExportError(f"save_dtype must be float32, float16 or bfloat16, got {config.save_dtype!r}.")
    model, report = merge_model(config)
    mel, tokens = fixed_inputs(model.config, config.seed)
    reference = hf_logits(model, mel, tokens)
    # half-precision saving rounds weights: allow what fp16/bf16 rounding does to logits
    saved_atol = config.openai_atol if config.save_dtype == "float32" else 0.5
    with atomic_output_dir(config.output_dir) as staging:
        _save(model, Path(config.base_dir), staging, config.save_dtype)
        report.saved_max_abs_diff = _check_saved(staging, mel, tokens, reference, saved_atol)
        (staging / "merge_report.json").write_text(json.dumps({"config": asdict(config), "report": asdict(report)}, indent=2) + "\n")
        mark_complete(staging, STEP, asdict(report))
    logger.info("Merged model written to %s: %s", config.output_dir, report)
    return report


def merge_outputs_ready(output_dir: str | Path) -> bool:
    return is_complete(output_dir, STEP)
