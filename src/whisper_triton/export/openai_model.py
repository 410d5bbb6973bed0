"""The openai-whisper checkpoint layout: dimensions, a small torch model with its exact parameter
names (so `load_state_dict(strict=True)` checks a checkpoint), its forward pass, and the name
mapping to and from Hugging Face `WhisperForConditionalGeneration`.

Written for verification on CPU; it is the same computation as openai-whisper's `model.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import ExportError


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelDimensions":
        missing = [name for name in cls.__dataclass_fields__ if name not in data]
        if missing:
            raise ExportError(f"Model dimensions lack {', '.join(missing)}: the checkpoint is not an openai-whisper checkpoint.")
        return cls(**{name: int(data[name]) for name in cls.__dataclass_fields__})

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed encoder position table [length, channels] (sin half, then cos half)."""
    half = channels // 2
    increment = math.log(max_timescale) / (half - 1)
    inv = torch.exp(-increment * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class _Attention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        source = x if source is None else source
        q, k, v = self.query(x), self.key(source), self.value(source)
        batch, length, width = q.shape
        head = width // self.n_head

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.n_head, head).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head)
        if causal:
            mask = torch.full((length, source.shape[1]), float("-inf"), device=x.device).triu(1)
            scores = scores + mask
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.out((weights @ split(v)).transpose(1, 2).reshape(batch, length, width))


class _Block(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross: bool):
        super().__init__()
        self.attn = _Attention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        if cross:
            self.cross_attn = _Attention(n_state, n_head)
            self.cross_attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), causal=audio is not None)
        if audio is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), audio)
        return x + self.mlp(self.mlp_ln(x))


class _Encoder(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state))
        self.blocks = nn.ModuleList(_Block(dims.n_audio_state, dims.n_audio_head, cross=False) for _ in range(dims.n_audio_layer))
        self.ln_post = nn.LayerNorm(dims.n_audio_state)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class _Decoder(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.token_embedding = nn.Embedding(dims.n_vocab, dims.n_text_state)
        self.positional_embedding = nn.Parameter(torch.empty(dims.n_text_ctx, dims.n_text_state))
        self.blocks = nn.ModuleList(_Block(dims.n_text_state, dims.n_text_head, cross=True) for _ in range(dims.n_text_layer))
        self.ln = nn.LayerNorm(dims.n_text_state)

    def forward(self, tokens: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x, audio)
        return self.ln(x) @ self.token_embedding.weight.T


class OpenAIWhisper(nn.Module):
    """openai-whisper's `Whisper` module layout (parameter names, shapes and forward)."""

    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = _Encoder(dims)
        self.decoder = _Decoder(dims)

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, self.encoder(mel))


def load_openai_model(checkpoint: dict, dtype: torch.dtype = torch.float32) -> OpenAIWhisper:
    """Build the openai layout from `{"dims", "model_state_dict"}`, loading strictly (names and shapes)."""
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise ExportError("Not an openai-whisper checkpoint: expected a dict with 'dims' and 'model_state_dict'.")
    dims = ModelDimensions.from_dict(checkpoint["dims"])
    model = OpenAIWhisper(dims)
    state = {name: torch.as_tensor(np.asarray(t) if isinstance(t, np.ndarray) else t) for name, t in checkpoint["model_state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"The state dict does not fit the openai-whisper layout for {dims}: {exc}") from exc
    return model.to(dtype).eval()


# ---- Hugging Face <-> openai names ----------------------------------------------------------
_LAYER_NAMES = {  # openai block suffix -> HF layer suffix
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_TOP_NAMES = {
    "encoder.conv1": "model.encoder.conv1",
    "encoder.conv2": "model.encoder.conv2",
    "encoder.ln_post": "model.encoder.layer_norm",
    "decoder.token_embedding": "model.decoder.embed_tokens",
    "decoder.ln": "model.decoder.layer_norm",
}


def openai_to_hf_name(name: str) -> str:
    if name == "encoder.positional_embedding":
        return "model.encoder.embed_positions.weight"
    if name == "decoder.positional_embedding":
        return "model.decoder.embed_positions.weight"
    module, _, leaf = name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) >= 4 and parts[1] == "blocks":
        side, index, rest = parts[0], parts[2], ".".join(parts[3:])
        if rest in _LAYER_NAMES:
            return f"model.{side}.layers.{index}.{_LAYER_NAMES[rest]}.{leaf}"
    raise ExportError(f"No Hugging Face name for openai-whisper parameter {name!r}.")


def openai_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = {openai_to_hf_name(name): tensor for name, tensor in state.items()}
    hf["proj_out.weight"] = hf["model.decoder.embed_tokens.weight"]  # tied output projection
    return hf


def hf_to_openai_state_dict(hf_state: dict[str, torch.Tensor], dims: ModelDimensions) -> dict[str, torch.Tensor]:
    """Every openai parameter from an HF state dict (by exact name mapping; nothing is computed)."""
    with torch.device("meta"):  # names only: no memory for weights
        reference = OpenAIWhisper(dims)
    state: dict[str, torch.Tensor] = {}
    for name in reference.state_dict():
        hf_name = openai_to_hf_name(name)
        if hf_name not in hf_state:
            raise ExportError(f"The Hugging Face model lacks {hf_name} (needed for {name}): is it a Whisper model?")
        state[name] = hf_state[hf_name].detach().clone()
    return state


def dims_from_hf_config(config) -> ModelDimensions:
    return ModelDimensions(
        n_mels=config.num_mel_bins,
        n_audio_ctx=config.max_source_positions,
        n_audio_state=config.d_model,
        n_audio_head=config.encoder_attention_heads,
        n_audio_layer=config.encoder_layers,
        n_vocab=config.vocab_size,
        n_text_ctx=config.max_target_positions,
        n_text_state=config.d_model,
        n_text_head=config.decoder_attention_heads,
        n_text_layer=config.decoder_layers,
    )
