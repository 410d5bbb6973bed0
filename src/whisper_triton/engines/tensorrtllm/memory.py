"""GPU memory of one engine instance: how much KV cache, how it splits between self- and cross-attention,
and how many windows that lets decode at once. Pure arithmetic over the model's shapes (tested here).

TensorRT-LLM sizes its paged KV cache at executor start as `KvCacheConfig.free_gpu_memory_fraction` of
the GPU memory still free after the engines are loaded, and gives `cross_kv_cache_fraction` of it to
cross-attention (tensorrtllm_backend v0.17.0 `docs/whisper.md` serves Whisper with 0.5 / 0.5). Whisper's
cross-attention holds all 1,500 encoder positions of every request, its self-attention at most the
decoder's `max_seq_len` (448) tokens: the split that balances them is 1500 / (1500 + 448) = 0.77, not 0.5.
The word-timestamp copy (CTranslate2, `ctranslate2/` beside the engines) loads later on the same GPU,
so the fraction leaves room for it, computed from its size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENCODER_POSITIONS = 1500  # Whisper's encoder output frames of a 30 s window: every request's cross-attention KV
# TensorRT activations and executor buffers allocated before the KV cache (decoder at max batch, encoder of
# one 30 s window, sampling buffers): an estimate, to be measured on the first GPU run (docs/gpu.md)
RUNTIME_MARGIN_BYTES = 1 << 30
# CTranslate2 alignment of one window beside its fp16 weights: encoder output, cross-attention weights
ALIGNER_ACTIVATION_BYTES = 512 << 20
MIN_KV_FRACTION = 0.05


class NotEnoughGpuMemoryError(RuntimeError):
    """The engines, the KV cache and the word-timestamp copy do not fit this GPU together."""


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    bytes_per_value: int = 2  # fp16/bf16 KV cache

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every decoder layer."""
        return 2 * self.layers * self.hidden * self.bytes_per_value

    @classmethod
    def from_config(cls, decoder_config: dict | None) -> "DecoderShape | None":
        pretrained = (decoder_config or {}).get("pretrained_config") or {}
        layers, hidden = pretrained.get("num_hidden_layers"), pretrained.get("hidden_size")
        return cls(int(layers), int(hidden)) if layers and hidden else None


@dataclass(frozen=True)
class KvPlan:
    free_fraction: float  # KvCacheConfig.free_gpu_memory_fraction
    cross_fraction: float  # KvCacheConfig.cross_kv_cache_fraction
    windows: int  # windows that fit in flight (and the engine's build allows)
    kv_bytes: int
    reserve_bytes: int  # kept free for the word-timestamp copy
    free_after_engines: int

    def describe(self) -> str:
        gib = 1 << 30
        return (f"KV cache {self.kv_bytes / gib:.2f} GiB = {self.free_fraction:.3f} of the "
                f"{self.free_after_engines / gib:.2f} GiB free after the engines, {self.cross_fraction:.2f} of it "
                f"cross-attention; {self.reserve_bytes / gib:.2f} GiB left for the word-timestamp copy; "
                f"{self.windows} windows in flight")


def cross_kv_fraction(max_seq_len: int, beams: int = 1) -> float:
    """The cross-attention share that holds as many requests as the self-attention share."""
    return ENCODER_POSITIONS / (ENCODER_POSITIONS + beams * max_seq_len)


def aligner_reserve_bytes(ct2_dir: Path | None) -> int:
    """GPU memory the CTranslate2 copy takes when words are asked for: its fp16 weights (the export stores
    float16, so model.bin's size) and one window's alignment activations. 0 without a copy."""
    if ct2_dir is None:
        return 0
    model = Path(ct2_dir) / "model.bin"
    return (model.stat().st_size if model.is_file() else 0) + ALIGNER_ACTIVATION_BYTES


def engine_bytes(model_dir: Path) -> int:
    """The engines' weights on the GPU: the size of their plan files."""
    return sum(path.stat().st_size for part in ("encoder", "decoder") for path in (Path(model_dir) / part).glob("*.engine"))


def kv_plan(*, free_bytes: int, engines: int, reserve: int, requested_fraction: float, shape: DecoderShape | None,
            max_seq_len: int, max_batch_size: int) -> KvPlan:
    """The KV fraction to ask for, leaving `reserve` free, and the windows it holds.

    Raises NotEnoughGpuMemoryError (cause and fix) when not even MIN_KV_FRACTION is left.
    """
    free_after = max(0, int(free_bytes) - int(engines) - RUNTIME_MARGIN_BYTES)
    if free_after <= 0:
        raise NotEnoughGpuMemoryError(
            f"The engines ({engines / (1 << 30):.2f} GiB) leave no GPU memory for the KV cache "
            f"({free_bytes / (1 << 30):.2f} GiB free). Use a larger GPU or a smaller model (e.g. large-v3-turbo).")
    allowed = (free_after - reserve) / free_after
    fraction = min(float(requested_fraction), allowed)
    if fraction < MIN_KV_FRACTION:
        raise NotEnoughGpuMemoryError(
            f"After the engines, {free_after / (1 << 30):.2f} GiB are free, and the word-timestamp copy needs "
            f"{reserve / (1 << 30):.2f} GiB of it: too little is left for the KV cache. Serve without the "
            "ctranslate2/ copy (no word timestamps), or on a larger GPU.")
    cross = cross_kv_fraction(max_seq_len)
    kv_bytes = int(free_after * fraction)
    windows = max_batch_size
    if shape is not None:
        per_window = shape.kv_bytes_per_token * (ENCODER_POSITIONS + max_seq_len)
        windows = max(1, min(max_batch_size, kv_bytes // per_window))
    return KvPlan(fraction, cross, int(windows), kv_bytes, int(reserve), free_after)
