"""Helpers shared by the Triton Python models."""

from __future__ import annotations

import numpy as np

from ..errors import WhisperTritonError


def input_array(pb_utils, request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def error_response(pb_utils, exc: WhisperTritonError):
    """A failed response whose message the proxy turns back into the same 4xx/5xx error."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if exc.status < 500 else None
    error = pb_utils.TritonError(exc.encode(), code) if code is not None else pb_utils.TritonError(exc.encode())
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def internal_error(exc: Exception, what: str) -> WhisperTritonError:
    return WhisperTritonError(
        message=f"{what} failed ({type(exc).__name__}: {exc}). Retry the request; if it persists, check the server log.",
        param=None, status=500, type="engine_error",
    )


def strings(values: list[str]) -> np.ndarray:
    return np.array([[value.encode("utf-8")] for value in values], dtype=object)


def ragged(rows: list[list], dtype, pad) -> np.ndarray:
    """[B, longest] with `pad` after each row's values (Triton outputs are rectangular)."""
    width = max([len(row) for row in rows] + [0])
    array = np.full((len(rows), width), pad, dtype=dtype)
    for index, row in enumerate(rows):
        array[index, : len(row)] = row
    return array
