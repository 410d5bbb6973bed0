"""The few pieces of Triton's `triton_python_backend_utils` the models use, for in-process tests of
their request handling (the real module exists only inside the Python backend stub; the tests that
start a real tritonserver exercise the real one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError(Exception):
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors: list, error: TritonError | None = None):
        self._tensors, self._error = output_tensors, error

    def output_tensors(self) -> list:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class ResponseSender:
    """Keeps what was sent; Triton wants exactly one final response per request of a non-decoupled model."""

    def __init__(self):
        import threading

        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.done = threading.Event()
        self.cancelled = threading.Event()  # set by a test (`cancel`): what Triton sets when the client leaves

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.done.is_set():
            raise RuntimeError("a response was sent after the final one")
        self.sent.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def cancel(self) -> None:
        self.cancelled.set()


class InferenceRequest:
    def __init__(self, inputs: list, requested_output_names: list[str] | None = None, model_name: str = ""):
        self.inputs, self._outputs, self.model_name = inputs, list(requested_output_names or []), model_name
        self.sender = ResponseSender()

    def requested_output_names(self) -> list[str]:
        return self._outputs

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        """Triton's request flag: the same as its sender's (`sender.cancel()` sets both)."""
        return self.sender.is_cancelled()


def get_input_tensor_by_name(request: InferenceRequest, name: str):
    return next((t for t in request.inputs if t.name() == name), None)


def model_args(repository: Path, model: str, **parameters: str) -> dict:
    """`initialize` arguments as Triton gives them, from the model's config.pbtxt."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    return {"model_config": json.dumps(as_dict), "model_repository": str(repository / model), "model_version": "1"}
