"""The tensor specs (contract/tensors.py) against every config.pbtxt of the shipped repository: a
name, type, shape, optional or ragged flag that differs on one side fails here, not in production."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from whisper_triton.contract.tensors import MODELS, SPECS, ModelSpec, TensorSpec, decode_error, encode_error
from whisper_triton.errors import WhisperTritonError

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repo_whisper_trtllm"
TYPES = model_config_pb2.DataType


def load(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def as_tuple(tensor) -> tuple:
    return (tensor.name, TYPES.Name(tensor.data_type), tuple(tensor.dims),
            bool(getattr(tensor, "optional", False)), bool(getattr(tensor, "allow_ragged_batch", False)))


def spec_tuple(tensor: TensorSpec, output: bool = False) -> tuple:
    return (tensor.name, tensor.data_type, tensor.dims, False if output else tensor.optional,
            False if output else tensor.ragged)


def mismatches(spec: ModelSpec, config: model_config_pb2.ModelConfig) -> list[str]:
    problems = []
    if config.name != spec.name:
        problems.append(f"name {config.name} != {spec.name}")
    if config.model_transaction_policy.decoupled != spec.decoupled:
        problems.append(f"decoupled {config.model_transaction_policy.decoupled} != {spec.decoupled}")
    if config.max_batch_size != spec.max_batch_size:
        problems.append(f"max_batch_size {config.max_batch_size} != {spec.max_batch_size}")
    if [as_tuple(t) for t in config.input] != [spec_tuple(t) for t in spec.inputs]:
        problems.append(f"inputs {[as_tuple(t) for t in config.input]} != {[spec_tuple(t) for t in spec.inputs]}")
    outputs = [(t.name, TYPES.Name(t.data_type), tuple(t.dims), False, False) for t in config.output]
    if outputs != [spec_tuple(t, output=True) for t in spec.outputs]:
        problems.append(f"outputs {outputs} != {[spec_tuple(t, output=True) for t in spec.outputs]}")
    return problems


def test_every_model_of_the_repository_has_a_spec():
    shipped = {p.name for p in REPOSITORY.iterdir() if (p / "config.pbtxt").is_file()}
    assert shipped == set(SPECS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_config_matches_the_spec(name):
    assert mismatches(SPECS[name], load(name)) == []


def test_a_disagreement_is_caught():
    """The check itself can fail: a config with one input renamed, one type changed, one flag dropped."""
    config = load("whisper_window")
    config.input[0].name = "AUDIO"
    assert any("inputs" in p for p in mismatches(SPECS["whisper_window"], config))
    config = load("whisper_window")
    config.output[1].data_type = TYPES.Value("TYPE_INT32")
    assert any("outputs" in p for p in mismatches(SPECS["whisper_window"], config))
    config = load("whisper")
    config.input[1].optional = False
    assert mismatches(SPECS["whisper"], config)


def test_errors_cross_a_boundary_whole():
    error = WhisperTritonError("beam_size must be at most 4", "beam_size", 400, "invalid_request_error")
    assert decode_error(encode_error(error)) == error
    assert decode_error("in ensemble 'x': " + encode_error(error)) == error  # Triton may put words before it
    assert decode_error("plain failure") is None and decode_error('{"error": 3}') is None
