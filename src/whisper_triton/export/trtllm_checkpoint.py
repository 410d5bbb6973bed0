"""openai-whisper checkpoint <-> TensorRT-LLM Whisper checkpoint for the pinned release.

Layout (TensorRT-LLM 0.17.0, `examples/whisper` + `tensorrt_llm/models/enc_dec/model.py`; written
from reading them, no code copied):

    <out>/encoder/config.json   architecture "WhisperEncoder"
    <out>/encoder/rank0.safetensors
    <out>/decoder/config.json   architecture "DecoderModel", model_type "whisper"
    <out>/decoder/rank0.safetensors

Encoder tensors: conv1/conv2 (weights with a trailing unit axis, [out, in, 3, 1]), the position
table, `encoder_layers.{i}.{attention_layernorm, attention.qkv, attention.dense, mlp_layernorm,
mlp.fc, mlp.proj}`, `ln_post`. Decoder: `embedding.vocab_embedding`, `embedding.position_embedding`,
`lm_head` (a copy of the token embedding), `decoder_layers.{i}.{self_attention(_layernorm),
cross_attention(_layernorm), mlp(_layernorm)}`, `final_layernorm`. Every attention (encoder self,
decoder self and cross) is one fused QKV matrix [3d, d] whose bias is (q bias, zeros, v bias):
Whisper's key projection has no bias.

The encoder position table is stored under both names that the 0.1x releases' WhisperEncoder used
(`positional_embedding`, a Parameter sized by `n_audio_ctx`; and `position_embedding.weight`, an
Embedding sized by `max_position_embeddings`). The model loader requires the one its definition
has and only warns about the other, so one checkpoint builds with either definition.

Weight-only int8/int4: the release's converter quantises per output channel (symmetric, scale =
max|w| / 127 or / 7) with a CUDA op that also interleaves the int8 matrix for the mixed-precision
GEMM kernel of the GPU it runs on, so pre-quantised files are tied to one GPU architecture. This
export writes the floating-point weights with `quantization.quant_algo` set to W8A16 / W4A16;
`trtllm-build` then quantises and lays them out for the GPU that builds the engine. The same
per-channel quantisation is implemented here (`quantize_per_channel`) to measure, before any GPU is
involved, how much int8/int4 moves the logits (`weight_only_logit_error`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..contract.release import TENSORRT_LLM_VERSION
from .common import ExportError, atomic_output_dir, is_complete, mark_complete
from .openai_model import ModelDimensions, load_openai_model

logger = logging.getLogger(__name__)

STEP = "trtllm-checkpoint"
WEIGHTS_FILE = "rank0.safetensors"
DTYPES = ("float16", "bfloat16", "float32")
QUANT_ALGOS = {None: None, "int8": "W8A16", "int4": "W4A16"}
QUANTIZED_SUFFIXES = ("qkv.weight", "dense.weight", "fc.weight", "proj.weight")  # GEMMs the release quantises
LAYER_NORM_TYPE_LAYERNORM = 0  # tensorrt_llm.functional.LayerNormType.LayerNorm (IntEnum)
LAYER_NORM_POSITION_PRE = 0  # tensorrt_llm.functional.LayerNormPositionType.pre_layernorm
ENCODER_POSITION_NAMES = ("positional_embedding", "position_embedding.weight")


@dataclass
class CheckpointConfig:
    dtype: str = "float16"
    weight_only_precision: str | None = None  # None, "int8" or "int4"
    logits_dtype: str = "float16"
    chunk_length_s: int = 30

    def validate(self) -> "CheckpointConfig":
        if self.dtype not in DTYPES:
            raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.weight_only_precision not in QUANT_ALGOS:
            raise ExportError(f"weight_only_precision must be int8, int4 or None, got {self.weight_only_precision!r}.")
        if self.logits_dtype not in ("float16", "float32"):
            raise ExportError(f"logits_dtype must be float16 or float32, got {self.logits_dtype!r}.")
        return self


# ---- configs -----------------------------------------------------------------------------------
def num_languages(n_vocab: int) -> int:
    multilingual = n_vocab >= 51865
    return n_vocab - 51765 - int(multilingual)


def encoder_config(dims: ModelDimensions, config: CheckpointConfig) -> dict:
    return {
        "architecture": "WhisperEncoder",
        "dtype": config.dtype,
        "num_hidden_layers": dims.n_audio_layer,
        "num_attention_heads": dims.n_audio_head,
        "hidden_size": dims.n_audio_state,
        "n_mels": dims.n_mels,
        "n_audio_ctx": dims.n_audio_ctx,
        "max_position_embeddings": dims.n_audio_ctx,
        "has_position_embedding": True,
        "chunk_length": config.chunk_length_s * 100,
        "vocab_size": dims.n_vocab,
        "hidden_act": "gelu",
        "num_languages": num_languages(dims.n_vocab),
        "quantization": {"quant_algo": QUANT_ALGOS[config.weight_only_precision]},
        "tensorrt_llm_version": TENSORRT_LLM_VERSION,
    }


def decoder_config(dims: ModelDimensions, config: CheckpointConfig) -> dict:
    return {
        "architecture": "DecoderModel",
        "dtype": config.dtype,
        "logits_dtype": config.logits_dtype,
        "num_hidden_layers": dims.n_text_layer,
        "num_attention_heads": dims.n_text_head,
        "hidden_size": dims.n_text_state,
        "norm_epsilon": 1e-5,
        "vocab_size": dims.n_vocab,
        "hidden_act": "gelu",
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "max_position_embeddings": dims.n_text_ctx,
        "use_prompt_tuning": False,
        "head_size": dims.n_text_state // dims.n_text_head,
        "has_position_embedding": True,
        "layernorm_type": LAYER_NORM_TYPE_LAYERNORM,
        "has_attention_qkvo_bias": True,
        "has_mlp_bias": True,
        "has_model_final_layernorm": True,
        "has_embedding_layernorm": False,
        "has_embedding_scale": False,
        "ffn_hidden_size": 4 * dims.n_text_state,
        "q_scaling": 1.0,
        "layernorm_position": LAYER_NORM_POSITION_PRE,
        "relative_attention": False,
        "max_distance": 0,
        "num_buckets": 0,
        "model_type": "whisper",
        "rescale_before_lm_head": False,
        "encoder_hidden_size": dims.n_audio_state,
        "encoder_num_heads": dims.n_audio_head,
        "encoder_head_size": None,
        "skip_cross_qkv": False,
        "skip_cross_kv": False,
        "quantization": {"quant_algo": QUANT_ALGOS[config.weight_only_precision]},
        "tensorrt_llm_version": TENSORRT_LLM_VERSION,
    }


# ---- weights -----------------------------------------------------------------------------------
def _fused_qkv(state: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    query_bias = state[f"{prefix}.query.bias"]
    weight = torch.cat([state[f"{prefix}.query.weight"], state[f"{prefix}.key.weight"], state[f"{prefix}.value.weight"]], 0)
    bias = torch.cat([query_bias, torch.zeros_like(query_bias), state[f"{prefix}.value.bias"]], 0)
    return weight, bias


def _put_attention(out: dict, state: dict, source: str, target: str) -> None:
    out[f"{target}.qkv.weight"], out[f"{target}.qkv.bias"] = _fused_qkv(state, source)
    out[f"{target}.dense.weight"] = state[f"{source}.out.weight"]
    out[f"{target}.dense.bias"] = state[f"{source}.out.bias"]


def _put_pair(out: dict, state: dict, source: str, target: str) -> None:
    out[f"{target}.weight"] = state[f"{source}.weight"]
    out[f"{target}.bias"] = state[f"{source}.bias"]


def _put_mlp(out: dict, state: dict, source: str, target: str) -> None:
    _put_pair(out, state, f"{source}.mlp_ln", f"{target}.mlp_layernorm")
    _put_pair(out, state, f"{source}.mlp.0", f"{target}.mlp.fc")
    _put_pair(out, state, f"{source}.mlp.2", f"{target}.mlp.proj")


def encoder_weights(dims: ModelDimensions, state: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        out[f"{conv}.weight"] = state[f"encoder.{conv}.weight"].unsqueeze(-1)
        out[f"{conv}.bias"] = state[f"encoder.{conv}.bias"]
    for name in ENCODER_POSITION_NAMES:
        out[name] = state["encoder.positional_embedding"].clone()
    for i in range(dims.n_audio_layer):
        source, target = f"encoder.blocks.{i}", f"encoder_layers.{i}"
        _put_pair(out, state, f"{source}.attn_ln", f"{target}.attention_layernorm")
        _put_attention(out, state, f"{source}.attn", f"{target}.attention")
        _put_mlp(out, state, source, target)
    _put_pair(out, state, "encoder.ln_post", "ln_post")
    return out


def decoder_weights(dims: ModelDimensions, state: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {
        "embedding.vocab_embedding.weight": state["decoder.token_embedding.weight"],
        "embedding.position_embedding.weight": state["decoder.positional_embedding"],
        "lm_head.weight": state["decoder.token_embedding.weight"].clone(),
    }
    for i in range(dims.n_text_layer):
        source, target = f"decoder.blocks.{i}", f"decoder_layers.{i}"
        _put_pair(out, state, f"{source}.attn_ln", f"{target}.self_attention_layernorm")
        _put_attention(out, state, f"{source}.attn", f"{target}.self_attention")
        _put_pair(out, state, f"{source}.cross_attn_ln", f"{target}.cross_attention_layernorm")
        _put_attention(out, state, f"{source}.cross_attn", f"{target}.cross_attention")
        _put_mlp(out, state, source, target)
    _put_pair(out, state, "decoder.ln", "final_layernorm")
    return out


def _cast(weights: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    torch_dtype = getattr(torch, dtype)
    return {name: tensor.detach().to(torch_dtype).contiguous() for name, tensor in weights.items()}


# ---- weight-only quantisation (per output channel, symmetric) -----------------------------------
def quantize_per_channel(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [in, out] (int4: two values a byte, [in, out/2]), scale [out])."""
    if bits not in (8, 4):
        raise ExportError(f"Weight-only quantisation supports 8 or 4 bits, got {bits}.")
    qmax = 127 if bits == 8 else 7
    transposed = weight.detach().float().t()
    scale = transposed.abs().amax(dim=0).clamp(min=1e-12) / qmax
    quantized = torch.round(transposed / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    if bits == 4:
        low, high = quantized[:, 0::2], quantized[:, 1::2]
        quantized = ((low & 0x0F) | (high << 4)).to(torch.int8)
    return quantized.contiguous(), scale


def dequantize_per_channel(quantized: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `quantize_per_channel`: back to a float [out, in] matrix."""
    values = quantized
    if bits == 4:
        low = (values << 4) >> 4  # sign-extend the low nibble
        high = values >> 4
        values = torch.stack([low, high], dim=-1).reshape(values.shape[0], -1)
    return (values.float() * scale.float()).t().contiguous()


def is_quantized_gemm(name: str) -> bool:
    return name.endswith(QUANTIZED_SUFFIXES)


# ---- write / read ---------------------------------------------------------------------------------
def convert_openai_to_trtllm(checkpoint: dict, config: CheckpointConfig) -> dict[str, tuple[dict, dict]]:
    """{"encoder": (config, weights), "decoder": (config, weights)} in memory."""
    config.validate()
    dims = ModelDimensions.from_dict(checkpoint["dims"])
    load_openai_model(checkpoint)  # strict check of names and shapes before converting
    state = {name: torch.as_tensor(t) for name, t in checkpoint["model_state_dict"].items()}
    return {
        "encoder": (encoder_config(dims, config), _cast(encoder_weights(dims, state), config.dtype)),
        "decoder": (decoder_config(dims, config), _cast(decoder_weights(dims, state), config.dtype)),
    }


def load_openai_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ExportError(f"No openai-whisper checkpoint at {path}: run the merge step first (it writes openai/model.pt).")
    return torch.load(path, map_location="cpu", weights_only=True)


def write_trtllm_checkpoint(openai_path: str | Path, output: str | Path, config: CheckpointConfig) -> Path:
    """Convert, write atomically, then verify by converting back and comparing every tensor."""
    from safetensors.torch import save_file

    checkpoint = load_openai_checkpoint(openai_path)
    parts = convert_openai_to_trtllm(checkpoint, config)
    with atomic_output_dir(output) as staging:
        for component, (component_config, weights) in parts.items():
            folder = staging / component
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(component_config, indent=2) + "\n")
            save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        max_diff = verify_round_trip(staging, checkpoint)
        mark_complete(staging, STEP, {"config": asdict(config), "round_trip_max_abs_diff": max_diff,
                                      "tensorrt_llm_version": TENSORRT_LLM_VERSION})
    logger.info("TensorRT-LLM %s checkpoint written to %s (%s)", TENSORRT_LLM_VERSION, output, config)
    return Path(output)


def read_trtllm_checkpoint(directory: str | Path) -> dict[str, tuple[dict, dict]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    parts = {}
    for component in ("encoder", "decoder"):
        folder = directory / component
        if not (folder / "config.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ExportError(f"{folder} lacks config.json or {WEIGHTS_FILE}: not a TensorRT-LLM Whisper checkpoint.")
        parts[component] = (json.loads((folder / "config.json").read_text()), load_file(str(folder / WEIGHTS_FILE)))
    return parts


def _split_qkv(weights: dict, prefix: str, target: str, out: dict) -> None:
    wq, wk, wv = torch.chunk(weights[f"{prefix}.qkv.weight"], 3, dim=0)
    bq, bk, bv = torch.chunk(weights[f"{prefix}.qkv.bias"], 3, dim=0)
    if torch.any(bk != 0):
        raise ExportError(f"{prefix}.qkv.bias has a non-zero key part; Whisper's key projection has no bias.")
    out.update({f"{target}.query.weight": wq, f"{target}.query.bias": bq, f"{target}.key.weight": wk,
                f"{target}.value.weight": wv, f"{target}.value.bias": bv,
                f"{target}.out.weight": weights[f"{prefix}.dense.weight"], f"{target}.out.bias": weights[f"{prefix}.dense.bias"]})


def _take_pair(weights: dict, source: str, target: str, out: dict) -> None:
    out[f"{target}.weight"] = weights[f"{source}.weight"]
    out[f"{target}.bias"] = weights[f"{source}.bias"]


def _take_mlp(weights: dict, source: str, target: str, out: dict) -> None:
    _take_pair(weights, f"{source}.mlp_layernorm", f"{target}.mlp_ln", out)
    _take_pair(weights, f"{source}.mlp.fc", f"{target}.mlp.0", out)
    _take_pair(weights, f"{source}.mlp.proj", f"{target}.mlp.2", out)


def openai_state_from_trtllm(dims: ModelDimensions, encoder: dict, decoder: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        out[f"encoder.{conv}.weight"] = encoder[f"{conv}.weight"].squeeze(-1)
        out[f"encoder.{conv}.bias"] = encoder[f"{conv}.bias"]
    out["encoder.positional_embedding"] = encoder[ENCODER_POSITION_NAMES[0]]
    for i in range(dims.n_audio_layer):
        source, target = f"encoder_layers.{i}", f"encoder.blocks.{i}"
        _take_pair(encoder, f"{source}.attention_layernorm", f"{target}.attn_ln", out)
        _split_qkv(encoder, f"{source}.attention", f"{target}.attn", out)
        _take_mlp(encoder, source, target, out)
    _take_pair(encoder, "ln_post", "encoder.ln_post", out)
    out["decoder.token_embedding.weight"] = decoder["embedding.vocab_embedding.weight"]
    out["decoder.positional_embedding"] = decoder["embedding.position_embedding.weight"]
    if not torch.equal(decoder["lm_head.weight"], decoder["embedding.vocab_embedding.weight"]):
        raise ExportError("lm_head differs from the token embedding; Whisper ties them, so this is not a Whisper checkpoint.")
    for i in range(dims.n_text_layer):
        source, target = f"decoder_layers.{i}", f"decoder.blocks.{i}"
        _take_pair(decoder, f"{source}.self_attention_layernorm", f"{target}.attn_ln", out)
        _split_qkv(decoder, f"{source}.self_attention", f"{target}.attn", out)
        _take_pair(decoder, f"{source}.cross_attention_layernorm", f"{target}.cross_attn_ln", out)
        _split_qkv(decoder, f"{source}.cross_attention", f"{target}.cross_attn", out)
        _take_mlp(decoder, source, target, out)
    _take_pair(decoder, "final_layernorm", "decoder.ln", out)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def dims_from_trtllm_configs(encoder: dict, decoder: dict) -> ModelDimensions:
    return ModelDimensions(
        n_mels=encoder["n_mels"], n_audio_ctx=encoder.get("n_audio_ctx", encoder.get("max_position_embeddings")),
        n_audio_state=encoder["hidden_size"], n_audio_head=encoder["num_attention_heads"],
        n_audio_layer=encoder["num_hidden_layers"], n_vocab=decoder["vocab_size"],
        n_text_ctx=decoder["max_position_embeddings"], n_text_state=decoder["hidden_size"],
        n_text_head=decoder["num_attention_heads"], n_text_layer=decoder["num_hidden_layers"],
    )


def trtllm_to_openai(directory: str | Path) -> dict:
    """The reverse conversion: TensorRT-LLM checkpoint -> `{"dims", "model_state_dict"}`."""
    parts = read_trtllm_checkpoint(directory)
    (encoder_cfg, encoder), (decoder_cfg, decoder) = parts["encoder"], parts["decoder"]
    if encoder_cfg.get("architecture") != "WhisperEncoder" or decoder_cfg.get("model_type") != "whisper":
        raise ExportError(f"{directory} is not a TensorRT-LLM Whisper checkpoint (encoder architecture / decoder model_type).")
    dims = dims_from_trtllm_configs(encoder_cfg, decoder_cfg)
    return {"dims": dims.to_dict(), "model_state_dict": openai_state_from_trtllm(dims, encoder, decoder)}


def verify_round_trip(directory: str | Path, checkpoint: dict) -> float:
    """Convert `directory` back and compare with the source weights; returns the max abs difference."""
    back = trtllm_to_openai(directory)
    load_openai_model(back)  # strict
    if back["dims"] != dict(checkpoint["dims"]):
        raise ExportError(f"Round trip changed the model dimensions: {back['dims']} != {checkpoint['dims']}.")
    worst = 0.0
    for name, source in checkpoint["model_state_dict"].items():
        restored = back["model_state_dict"][name]
        expected = torch.as_tensor(source).to(restored.dtype)
        worst = max(worst, float((restored.float() - expected.float()).abs().max()))
        if not torch.equal(restored, expected):
            raise ExportError(f"{name} does not survive the TensorRT-LLM checkpoint round trip.")
    return worst


@torch.no_grad()
def weight_only_logit_error(checkpoint: dict, bits: int, mel: torch.Tensor, tokens: torch.Tensor) -> float:
    """Max |logit| change that per-channel int8/int4 weight-only quantisation causes on this input."""
    state = {name: torch.as_tensor(t).float() for name, t in checkpoint["model_state_dict"].items()}
    reference = load_openai_model({"dims": checkpoint["dims"], "model_state_dict": state})(mel, tokens)
    dims = ModelDimensions.from_dict(checkpoint["dims"])
    fused_enc, fused_dec = encoder_weights(dims, state), decoder_weights(dims, state)

    def rounded(weights: dict) -> dict:
        return {n: dequantize_per_channel(*quantize_per_channel(t, bits), bits) if is_quantized_gemm(n) else t for n, t in weights.items()}

    quantized_state = openai_state_from_trtllm(dims, rounded(fused_enc), rounded(fused_dec))
    logits = load_openai_model({"dims": checkpoint["dims"], "model_state_dict": quantized_state})(mel, tokens)
    return float((logits - reference).abs().max())


def checkpoint_ready(directory: str | Path) -> bool:
    return is_complete(directory, STEP)
