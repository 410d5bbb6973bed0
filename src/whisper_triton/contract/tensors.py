"""The inputs and outputs of each Triton model, defined once for the model and for its clients.

Four models (model_repo_whisper_trtllm/):
- `whisper`: NVIDIA's Whisper I/O (WAV / WAV_LENS / TEXT_PREFIX -> TRANSCRIPTS) for gRPC clients
  in any language; a thin front that routes rows of at most 30 s to `whisper_window` and longer
  rows to `transcribe`, so no long file ever runs inside the instance that owns the engine.
- `whisper_window`: the window decoder, the only model that runs the engine; windows <= 30 s.
- `transcribe`: long-form (audio file bytes + JSON options -> JSON result), fanning windows out.
- `transcribe_stream`: `transcribe` as a decoupled model: same inputs, one CHUNK response per chunk of
  decoded windows (segments in timeline order), the last one flagged final; a cancelled request stops
  its decoding between chunks.

`tests/test_tensor_spec.py` holds these specs against every `config.pbtxt`. The Python models and
the BLS / gRPC clients use `ModelSpec.input` / `output` for names, types and padding; errors cross
a model boundary as `encode_error` JSON and come back with `decode_error`.

Import-light: numpy only where a tensor is built (inside functions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import WhisperTritonError

WHISPER = "whisper"
WHISPER_WINDOW = "whisper_window"
TRANSCRIBE = "transcribe"
TRANSCRIBE_STREAM = "transcribe_stream"
MODELS = (WHISPER_WINDOW, TRANSCRIBE, TRANSCRIBE_STREAM, WHISPER)  # load order: each model's dependencies first

_NUMPY = {"TYPE_FP32": "float32", "TYPE_INT32": "int32", "TYPE_BOOL": "bool", "TYPE_STRING": "object"}
_CLIENT = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_BOOL": "BOOL", "TYPE_STRING": "BYTES"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's config name: TYPE_FP32, TYPE_INT32, TYPE_BOOL, TYPE_STRING
    dims: tuple[int, ...]  # without the batch dimension
    optional: bool = False
    ragged: bool = False  # inputs: rows of different lengths may share a batch
    pad: float | int | None = None  # outputs with dims [-1]: the value after each row's items
    doc: str = ""

    @property
    def numpy_dtype(self) -> str:
        return _NUMPY[self.data_type]

    @property
    def client_dtype(self) -> str:
        """tritonclient's name for the type (InferInput)."""
        return _CLIENT[self.data_type]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_batch_size: int  # 0: no batch dimension
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    decoupled: bool = False  # model_transaction_policy: any number of responses per request

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.name, "output")

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _find(tensors: tuple[TensorSpec, ...], name: str, model: str, kind: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"model {model!r} has no {kind} {name!r}")


# ---- shared tensors -----------------------------------------------------------------------------
_WAV = TensorSpec("WAV", "TYPE_FP32", (-1,), ragged=True, doc="16 kHz mono float32 samples, zero-padded is fine")
_WAV_LENS = TensorSpec("WAV_LENS", "TYPE_INT32", (1,), optional=True, doc="true sample count of each row")
_TEXT_PREFIX = TensorSpec("TEXT_PREFIX", "TYPE_STRING", (1,), optional=True,
                          doc="e.g. <|startoftranscript|><|en|><|transcribe|><|notimestamps|>")
_PROMPT_IDS = TensorSpec("PROMPT_IDS", "TYPE_INT32", (-1,), optional=True, ragged=True,
                         doc="a ready decoder prompt; replaces TEXT_PREFIX")
_WORD_TIMESTAMPS = TensorSpec("WORD_TIMESTAMPS", "TYPE_BOOL", (1,), optional=True)
_DECODE_OPTIONS = TensorSpec("DECODE_OPTIONS", "TYPE_STRING", (1,), optional=True,
                             doc="JSON of contract.options.DecodeOptions fields; wins over the NVIDIA-style inputs")
_NVIDIA_OPTIONS = (
    TensorSpec("BEAM_SIZE", "TYPE_INT32", (1,), optional=True),
    TensorSpec("MAX_NEW_TOKENS", "TYPE_INT32", (1,), optional=True),
    TensorSpec("TEMPERATURE", "TYPE_FP32", (1,), optional=True),
    TensorSpec("REPETITION_PENALTY", "TYPE_FP32", (1,), optional=True),
)
# NVIDIA-style option input -> DecodeOptions field
NVIDIA_OPTION_FIELDS = {"BEAM_SIZE": "beam_size", "MAX_NEW_TOKENS": "max_new_tokens", "TEMPERATURE": "temperature",
                        "REPETITION_PENALTY": "repetition_penalty"}

_WINDOW_OUTPUTS = (
    TensorSpec("TRANSCRIPTS", "TYPE_STRING", (1,)),
    TensorSpec("LANGUAGE", "TYPE_STRING", (1,)),
    TensorSpec("LANGUAGE_PROB", "TYPE_FP32", (1,)),
    TensorSpec("TOKENS", "TYPE_INT32", (-1,), pad=-1, doc="generated token ids"),
    TensorSpec("AVG_LOGPROB", "TYPE_FP32", (1,), doc="NaN where the engine gives no scores"),
    TensorSpec("NO_SPEECH_PROB", "TYPE_FP32", (1,), doc="NaN where the engine gives none"),
    TensorSpec("TOKEN_TIMES", "TYPE_FP32", (-1,), pad=-1.0, doc="start, end (s) per text token with WORD_TIMESTAMPS"),
    TensorSpec("TOKEN_PROBS", "TYPE_FP32", (-1,), pad=-1.0),
)

WHISPER_WINDOW_SPEC = ModelSpec(
    name=WHISPER_WINDOW, max_batch_size=8,
    inputs=(_WAV, _WAV_LENS, _TEXT_PREFIX, _PROMPT_IDS, _WORD_TIMESTAMPS, _DECODE_OPTIONS,
            TensorSpec("CACHE_SCOPE", "TYPE_STRING", (1,), optional=True,
                       doc="the long-form request a row belongs to: its encoder pass is reused within that "
                           "request only (detection, fallback, alignment); rows without one keep nothing")),
    outputs=_WINDOW_OUTPUTS + (
        TensorSpec("ENGINE_SECONDS", "TYPE_STRING", (1,),
                   doc="JSON {encoder, decoder, alignment}: this row's share of its batch's engine time"),
        TensorSpec("LANGUAGE_PROBS", "TYPE_STRING", (1,),
                   doc="JSON {code: probability} over the language tokens; asked alone, only detection runs"),
        TensorSpec("CAPABILITIES", "TYPE_STRING", (1,),
                   doc="JSON contract.capabilities.EngineCapabilities; asked alone, the engine is not called"),
    ),
)

WHISPER_SPEC = ModelSpec(
    name=WHISPER, max_batch_size=8,
    inputs=(_WAV, _WAV_LENS, _TEXT_PREFIX) + _NVIDIA_OPTIONS + (_PROMPT_IDS, _WORD_TIMESTAMPS),
    outputs=_WINDOW_OUTPUTS,
)

_TRANSCRIBE_INPUTS = (
    TensorSpec("AUDIO", "TYPE_STRING", (1,), doc="the audio file's bytes, any format"),
    TensorSpec("OPTIONS", "TYPE_STRING", (1,), optional=True, doc="JSON of contract.options.TranscribeOptions"),
    TensorSpec("SPEAKER_REFERENCES", "TYPE_STRING", (-1,), optional=True,
               doc="with diarize: one 2-10 s audio clip (file bytes) per OPTIONS known_speaker_names entry"),
)

TRANSCRIBE_SPEC = ModelSpec(
    name=TRANSCRIBE, max_batch_size=0, inputs=_TRANSCRIBE_INPUTS,
    outputs=(TensorSpec("RESULT", "TYPE_STRING", (1,), doc="JSON of contract.results.TranscriptionResult"),),
)

TRANSCRIBE_STREAM_SPEC = ModelSpec(
    name=TRANSCRIBE_STREAM, max_batch_size=0, inputs=_TRANSCRIBE_INPUTS, decoupled=True,
    outputs=(TensorSpec("CHUNK", "TYPE_STRING", (1,), doc="JSON of contract.results.stream_chunk, one per response"),),
)

SPECS = {spec.name: spec for spec in (WHISPER_SPEC, WHISPER_WINDOW_SPEC, TRANSCRIBE_SPEC, TRANSCRIBE_STREAM_SPEC)}


# ---- values in and out ---------------------------------------------------------------------------
def strip_pad(row, pad) -> list:
    """The items of one row of a padded [-1] output."""
    return [item for item in row if item != pad]


def padded(rows: list[list], spec: TensorSpec):
    """[B, longest] with the spec's pad after each row's items (Triton outputs are rectangular)."""
    import numpy as np

    width = max([len(row) for row in rows] + [0])
    array = np.full((len(rows), width), spec.pad, dtype=spec.numpy_dtype)
    for index, row in enumerate(rows):
        array[index, : len(row)] = row
    return array


def optional_number(value: float) -> float | None:
    """NaN stands for "not available" in the FP32 outputs that an engine may not provide."""
    value = float(value)
    return None if value != value else value


def encode_error(exc: WhisperTritonError) -> str:
    """A Triton error message: the error as one JSON object, which `decode_error` reads back whole."""
    return json.dumps({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "status": exc.status}})


def decode_error(message: str) -> WhisperTritonError | None:
    """The error `encode_error` wrote, from a Triton error message (Triton may put words before it)."""
    text = message or ""
    start = text.find('{"error"')
    if start < 0:
        return None
    try:
        payload, _ = json.JSONDecoder().raw_decode(text[start:])
        error = payload["error"]
        return WhisperTritonError(message=str(error["message"]), param=error.get("param"),
                                  status=int(error.get("status", 400)), type=str(error.get("type", "invalid_request_error")))
    except (ValueError, KeyError, TypeError):
        return None
