"""Helpers shared by the Triton Python models: settings from the model configuration, tensors in
and out by their spec (`contract.tensors`), and errors in the one wire format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..contract.tensors import TensorSpec, encode_error
from ..errors import WhisperTritonError, invalid_parameter
from ..settings import Settings, resolve_model_dir_parameter, resolve_settings


def model_settings(args: dict) -> Settings:
    """The settings of a model from its own config.pbtxt parameters (`serve` renders them), then the
    environment; a relative `model_dir` is relative to the repository, as the export lays it out."""
    model_config = resolve_model_dir_parameter(json.loads(args["model_config"]), args["model_repository"])
    parameters = model_config.get("parameters", {}) or {}
    return resolve_settings(model_parameters={key: value.get("string_value", "") for key, value in parameters.items()})


def max_batch_size(args: dict) -> int:
    return int(json.loads(args["model_config"]).get("max_batch_size", 1)) or 1


def input_array(pb_utils, request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def first_value(pb_utils, request, name: str):
    """The first element of an optional [1] input, or None when it was not sent."""
    array = input_array(pb_utils, request, name)
    return array.reshape(-1)[0] if array is not None and array.size else None


def text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ("" if value is None else str(value))


def tensor(pb_utils, spec: TensorSpec, values) -> object:
    """An output tensor of `spec`'s type from a list of per-row values (rows of [-1] outputs padded)."""
    from ..contract.tensors import padded

    if spec.dims == (-1,):
        return pb_utils.Tensor(spec.name, padded(values, spec))
    if spec.data_type == "TYPE_STRING":
        return pb_utils.Tensor(spec.name, np.array([[str(v).encode("utf-8")] for v in values], dtype=object))
    return pb_utils.Tensor(spec.name, np.array([[v] for v in values], dtype=spec.numpy_dtype))


def requested_outputs(request, spec_outputs: tuple[str, ...]) -> set[str]:
    """The outputs a request asked for; Triton passes none when the client asked for all."""
    names = set(request.requested_output_names() or ())
    return names or set(spec_outputs)


def error_response(pb_utils, exc: WhisperTritonError):
    """A failed response whose message the other side turns back into the same 4xx/5xx error."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if exc.status < 500 else None
    message = encode_error(exc)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def internal_error(exc: Exception, what: str) -> WhisperTritonError:
    # the cause goes to the server log (logger.exception at the caller), not to the client
    return WhisperTritonError(
        message=f"{what} failed. Retry the request; if it persists, check the server log.",
        param=None, status=500, type="engine_error",
    )


def repository_root(args: dict) -> Path:
    return Path(args["model_repository"]).parent


def engine_model_dir(config_path: Path) -> str | None:
    """The absolute model_dir another engine model of this repository was rendered with (the
    registry renders whisper_window-<id>/config.pbtxt before loading it), None when it has none."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError):
        return None
    value = config.parameters["model_dir"].string_value if "model_dir" in config.parameters else ""
    if not value:
        return None
    path = Path(value) if Path(value).is_absolute() else config_path.parent.parent / value
    return str(path.resolve())


def rows_of(wav: np.ndarray | None, lens: np.ndarray | None) -> list[np.ndarray]:
    """WAV [B, N] (or [N]) and optional WAV_LENS [B, 1] -> B float32 rows of their true lengths."""
    if wav is None or wav.size == 0:
        raise invalid_parameter("WAV", "WAV is empty: send 16 kHz mono float32 samples.")
    wav = wav.reshape(wav.shape[0], -1) if wav.ndim > 1 else wav.reshape(1, -1)
    lengths = [wav.shape[1]] * wav.shape[0] if lens is None else [int(n) for n in lens.reshape(-1)]
    if len(lengths) != wav.shape[0]:
        raise invalid_parameter("WAV_LENS", f"WAV_LENS has {len(lengths)} values for {wav.shape[0]} WAV rows.")
    rows = []
    for row, length in zip(wav, lengths):
        if not 0 < length <= row.size:
            raise invalid_parameter("WAV_LENS", f"WAV_LENS {length} is outside 1..{row.size} (the WAV length).")
        audio = np.ascontiguousarray(row[:length], dtype=np.float32)
        if not np.isfinite(audio).all():
            raise invalid_parameter("WAV", "WAV holds NaN or infinite samples: send finite samples in [-1, 1].")
        rows.append(audio)
    return rows


def text_prefixes(array: np.ndarray | None, rows: int) -> list[str]:
    values = [""] * rows if array is None else [text(v) for v in array.reshape(-1)]
    return values * rows if len(values) == 1 and rows > 1 else values
