"""One contract for every engine behind `whisper_triton.engines.Engine`.

The same suite runs against
- the CTranslate2 engine, for real, on the embedded Whisper tiny.en and real speech made by espeak-ng;
- the TensorRT-LLM engine on `StandInModelRunnerCpp` (tests/trtllm_standin.py), a CPU stand-in for
  TensorRT-LLM 0.17's `ModelRunnerCpp` itself: the engine's `from_dir` / `generate` calls, its logits
  processors (Whisper's rules) and its output parsing run for real; the stand-in refuses what upstream
  refuses (keywords, limits, dtypes, unknown processors), gives scores only when `output_log_probs` is
  set (and 0 for greedy, as the executor's normalised log-probs are), echoes the prompt and pads with
  end_id, and decodes over the real per-step logits of openai-whisper's model with the same tiny.en
  weights, calling the processors at every step. So "both engines give the same tokens" compares
  CTranslate2's decoding with the engine's rules on another implementation of the model.
  What it proves is everything around the runtime, not TensorRT-LLM's kernels.

Below the contract: unit tests of the TensorRT-LLM engine's pure functions and refusals.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testkit.synthetic_speech import spoken_sentences
from whisper_triton.engines import load_engine
from whisper_triton.engines.base import DecodeOptions, Hypothesis
from whisper_triton.engines.ctranslate2_engine import CTranslate2Engine
from whisper_triton.engines.tensorrtllm.compatibility import (
    EngineCompatibilityError,
    TensorRTLLMUnavailableError,
    check_compatibility,
)
from whisper_triton.engines.tensorrtllm.engine import TensorRTLLMEngine
from whisper_triton.engines.tensorrtllm.requests import (
    EngineLimits,
    RuntimeOutput,
    build_generate_request,
    build_language_request,
    encoder_output_lengths,
    engine_limits,
    feature_tensors,
    fit_prompt,
    parse_generate_output,
    parse_language_output,
    sampling_settings,
)
from whisper_triton.errors import WhisperTritonError
from whisper_triton.contract.engine_manifest import BuildConfig, EngineManifest
from whisper_triton.pipeline.features import N_FRAMES, batch_log_mel
from whisper_triton.contract.release import TENSORRT_LLM_VERSION
from whisper_triton.settings import load_settings
from whisper_triton.pipeline.tokenizer import PromptSpec, WhisperTokenizer

from trtllm_standin import (GPU_ARCH, StandInModelRunnerCpp, StandInRuntimeEngine, StepModel,
                            write_engine_dir)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things from the store.",
    "Seven hundred people waited in the rain for the morning train.",
]
KEYWORDS = [{"quick", "lazy", "dog"}, {"stella", "store"}, {"700", "people", "waited", "rain", "train"}]


# ---- shared inputs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir() -> Path:
    return load_settings().resolved_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> WhisperTokenizer:
    return WhisperTokenizer.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def audios(tmp_path_factory) -> list[np.ndarray]:
    """The sentences spoken by espeak-ng (testkit, shared with the other tests and the benchmarks)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required: apt-get install espeak-ng")
    folder = tmp_path_factory.mktemp("speech")
    return spoken_sentences(folder, SENTENCES)


@pytest.fixture(scope="module")
def features(audios) -> np.ndarray:
    return batch_log_mel(audios, 80)


@pytest.fixture(scope="module")
def prompts(tokenizer, features) -> list[list[int]]:
    return [tokenizer.prompt_ids(PromptSpec(language="en")) for _ in range(features.shape[0])]


@pytest.fixture(scope="module")
def ct2_engine(model_dir) -> CTranslate2Engine:
    return CTranslate2Engine(model_dir, WhisperTokenizer.from_model_dir(model_dir).special_tokens(), cpu_threads=2)


# ---- the TensorRT-LLM engine on the stand-in runtime ------------------------------------------
@pytest.fixture(scope="module")
def step_model(model_dir) -> StepModel:
    model = StepModel.from_ct2_dir(model_dir)
    StandInModelRunnerCpp.step_model = model
    return model


@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory, model_dir, step_model) -> StandInRuntimeEngine:
    root = write_engine_dir(tmp_path_factory.mktemp("engines") / "tiny.en", model_dir)
    return StandInRuntimeEngine(root)


@pytest.fixture(scope="module", params=["ctranslate2", "tensorrtllm-standin"])
def engine(request):
    name = "ct2_engine" if request.param == "ctranslate2" else "trt_engine"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def full_decode(engine, features, prompts) -> list[Hypothesis]:
    return engine.generate(features, prompts, DecodeOptions())


# ---- the contract ------------------------------------------------------------------------------
def test_one_hypothesis_per_input_with_int_tokens(engine, full_decode, features):
    assert len(full_decode) == features.shape[0]
    for hypothesis in full_decode:
        assert isinstance(hypothesis, Hypothesis)
        assert hypothesis.tokens and all(isinstance(token, int) for token in hypothesis.tokens)


def test_text_is_the_spoken_sentence(engine, full_decode, tokenizer):
    for hypothesis, keywords in zip(full_decode, KEYWORDS):
        words = set(tokenizer.decode(hypothesis.tokens).lower().replace(".", " ").replace(",", " ").split())
        assert len(keywords & words) >= len(keywords) - 1, (keywords, words)


def test_prompt_and_special_tokens_are_not_in_the_output(engine, full_decode, prompts, tokenizer):
    for hypothesis, prompt in zip(full_decode, prompts):
        assert hypothesis.tokens[: len(prompt)] != prompt
        assert tokenizer.sot not in hypothesis.tokens and tokenizer.no_timestamps not in hypothesis.tokens


def test_eot_is_stripped(engine, full_decode, tokenizer):
    for hypothesis in full_decode:
        assert tokenizer.eot not in hypothesis.tokens
        assert all(token < tokenizer.eot for token in hypothesis.tokens)


def test_scores_are_log_probabilities_when_given(engine, full_decode):
    for hypothesis in full_decode:
        if hypothesis.sum_logprob is not None:
            assert hypothesis.sum_logprob <= 0.0
            assert hypothesis.avg_logprob == pytest.approx(hypothesis.sum_logprob / (len(hypothesis.tokens) + 1))


@pytest.mark.parametrize("limit", [1, 4])
def test_max_new_tokens_is_honoured(engine, full_decode, features, prompts, limit):
    limited = engine.generate(features[:1], prompts[:1], DecodeOptions(max_new_tokens=limit))
    assert 1 <= len(limited[0].tokens) <= limit
    # greedy decoding under a length limit is a prefix of the unlimited decode
    assert limited[0].tokens == full_decode[0].tokens[: len(limited[0].tokens)]


def test_beam_search_returns_the_sentence(engine, features, prompts, tokenizer):
    result = engine.generate(features[:1], prompts[:1], DecodeOptions(beam_size=2))
    assert {"lazy", "dog"} <= set(tokenizer.decode(result[0].tokens).lower().replace(".", " ").split())


def test_per_request_prompts(engine, features, tokenizer, full_decode):
    """A previous-text prompt for one item leaves the others' decodes unchanged."""
    mixed = [tokenizer.prompt_ids(PromptSpec(language="en", previous_text="Foxes and dogs.")),
             tokenizer.prompt_ids(PromptSpec(language="en"))]
    result = engine.generate(features[:2], mixed, DecodeOptions())
    assert len(result) == 2 and result[1].tokens == full_decode[1].tokens
    assert result[0].tokens and tokenizer.sot_prev not in result[0].tokens


@pytest.mark.parametrize("bad", [{"beam_size": 0}, {"beam_size": 1000}, {"max_new_tokens": 0}, {"max_new_tokens": 449}],
                         ids=lambda values: ",".join(f"{k}={v}" for k, v in values.items()))
def test_bad_options_never_reach_an_engine(bad):
    """The one options model refuses them when they are built (a pydantic ValidationError is a ValueError)."""
    with pytest.raises(ValueError):
        DecodeOptions(**bad)


def test_malformed_batches_are_refused(engine, features, prompts):
    with pytest.raises(ValueError):
        engine.generate(features[:2], prompts[:1], DecodeOptions())
    with pytest.raises(ValueError):
        engine.generate(features[:1, :40], prompts[:1], DecodeOptions())


def test_empty_batch(engine):
    empty = np.zeros((0, engine.n_mels, N_FRAMES), dtype=np.float32)
    assert engine.generate(empty, [], DecodeOptions()) == []
    assert engine.detect_language(empty) == []


def test_detect_language_gives_normalised_probabilities_by_code(engine, features, tokenizer):
    results = engine.detect_language(features)
    assert len(results) == features.shape[0]
    for probabilities in results:
        assert set(probabilities) <= set(tokenizer.language_ids)
        assert sum(probabilities.values()) == pytest.approx(1.0)
        values = list(probabilities.values())
        assert values == sorted(values, reverse=True)
        assert next(iter(probabilities)) == "en"


def test_interface_attributes(engine):
    assert engine.n_mels == 80 and engine.is_multilingual is False
    assert engine.max_batch_size >= 1 and isinstance(engine.name, str)


# ---- the TensorRT-LLM engine around its stand-in ----------------------------------------------
def test_both_engines_give_the_same_tokens(ct2_engine, trt_engine, features, prompts):
    """fp16 [frames, n_mels] features, prompts and parsing round-trip to CTranslate2's own result."""
    direct = ct2_engine.generate(features, prompts, DecodeOptions())
    through_requests = trt_engine.generate(features, prompts, DecodeOptions())
    assert [h.tokens for h in through_requests] == [h.tokens for h in direct]


def test_batches_above_the_engine_limit_are_split(trt_engine, features, prompts):
    trt_engine.calls.clear()
    trt_engine.generate(features, prompts, DecodeOptions())
    assert [call["batch"] for call in trt_engine.calls] == [2, 1]


def test_beam_size_above_the_engine_build_is_refused(trt_engine, features, prompts):
    with pytest.raises(WhisperTritonError, match="beam_size must be between 1 and 4"):
        trt_engine.generate(features[:1], prompts[:1], DecodeOptions(beam_size=5))


# ---- refusals and the import without tensorrt_llm ---------------------------------------------
def test_module_imports_without_tensorrt_llm_or_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt_llm', 'torch'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import whisper_triton.engines.tensorrtllm.engine\n"
        "import whisper_triton.engines.tensorrtllm.compatibility as m\n"
        "assert 'torch' not in sys.modules and 'tensorrt_llm' not in sys.modules\n"
        "try:\n"
        "    m._import_runtime()\n"
        "except m.TensorRTLLMUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "blocked: tensorrt_llm" in message  # the cause
    assert f"tensorrt_llm {TENSORRT_LLM_VERSION}" in message and "Dockerfile.server" in message  # the fix
    assert "WHISPER_TRITON_ENGINE=ctranslate2" in message


def test_using_it_without_tensorrt_llm_fails_clearly(tmp_path, model_dir):
    pytest.importorskip("ctranslate2")
    if _has_module("tensorrt_llm"):
        pytest.skip("tensorrt_llm is installed here")
    root = write_engine_dir(tmp_path / "engines", model_dir)
    with pytest.raises(TensorRTLLMUnavailableError, match="WHISPER_TRITON_ENGINE=ctranslate2"):
        load_engine("tensorrtllm", str(root), device="cuda")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_cpu_device_is_refused(tmp_path, model_dir):
    root = write_engine_dir(tmp_path / "engines", model_dir)
    with pytest.raises(TensorRTLLMUnavailableError, match="only on an NVIDIA GPU"):
        TensorRTLLMEngine(root, device="cpu")


def test_engines_without_manifest_are_refused(tmp_path, model_dir):
    root = write_engine_dir(tmp_path / "engines", model_dir)
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        StandInRuntimeEngine(root)


@pytest.mark.parametrize("version, arch, batch, message", [
    ("0.16.0", GPU_ARCH, None, "built with TensorRT-LLM 0.16.0, but this server runs TensorRT-LLM " + TENSORRT_LLM_VERSION),
    (TENSORRT_LLM_VERSION, "sm_80", None, "built for GPU architecture sm_80 .* this GPU is sm_86"),
    (TENSORRT_LLM_VERSION, GPU_ARCH, 16, "max_batch_size 16 is above the engine's build limit of 2"),
])
def test_incompatible_engines_are_refused(tmp_path, model_dir, version, arch, batch, message):
    root = write_engine_dir(tmp_path / "engines", model_dir, version=version, arch=arch)
    with pytest.raises(EngineCompatibilityError, match=message):
        StandInRuntimeEngine(root, max_batch_size=batch)


def test_post_release_of_the_same_version_is_accepted():
    manifest = EngineManifest(tensorrt_llm_version=TENSORRT_LLM_VERSION + ".post1", gpu_arch="sm_86")
    limits = engine_limits(manifest)
    check_compatibility(manifest, runtime_version=TENSORRT_LLM_VERSION, gpu_arch="sm_86", max_batch_size=8,
                        limits=limits)


def test_engines_without_paged_kv_cache_are_refused():
    manifest = EngineManifest(tensorrt_llm_version=TENSORRT_LLM_VERSION, gpu_arch="sm_86",
                              build=BuildConfig(paged_kv_cache=False))
    with pytest.raises(EngineCompatibilityError, match="paged KV cache"):
        check_compatibility(manifest, runtime_version=TENSORRT_LLM_VERSION, gpu_arch="sm_86", max_batch_size=None,
                            limits=engine_limits(manifest))


def test_engine_max_batch_size_defaults_to_the_build(tmp_path, model_dir):
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "engines", model_dir, max_batch_size=6))
    assert engine.max_batch_size == 6 and engine.max_beam_width == 4


# ---- pure functions ----------------------------------------------------------------------------
LIMITS = EngineLimits(max_batch_size=4, max_beam_width=4, max_input_frames=3000, max_prompt_len=8, max_seq_len=40,
                      n_mels=80)
EOT, SOT, SOT_PREV, NO_TS = 50256, 50257, 50360, 50362


def test_engine_limits_prefer_the_engine_configs_and_cap_at_whisper_positions():
    manifest = EngineManifest(tensorrt_llm_version="0.17.0", gpu_arch="sm_86",
                              build=BuildConfig(max_batch_size=8, max_prompt_len=32, max_output_len=448))
    assert engine_limits(manifest).max_seq_len == 448  # 32 + 448 capped at 448 positions
    limits = engine_limits(manifest, {"build_config": {"max_batch_size": 4, "max_seq_len": 114, "max_input_len": 14}})
    assert (limits.max_batch_size, limits.max_seq_len, limits.max_prompt_len) == (4, 114, 14)


def test_feature_tensors_are_fp16_frames_by_mels():
    features = np.random.default_rng(0).uniform(-1.5, 1.5, (2, 80, 3000)).astype(np.float32)
    tensors = feature_tensors(features)
    assert len(tensors) == 2
    for window, tensor in zip(features, tensors):
        assert tensor.dtype == np.float16 and tensor.shape == (3000, 80) and tensor.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(tensor.astype(np.float32), window.T, atol=2e-3)
    assert encoder_output_lengths(features) == [1500, 1500]


def test_sampling_settings():
    assert sampling_settings(DecodeOptions()) == {"num_beams": 1, "top_k": 1, "repetition_penalty": 1.0}
    assert sampling_settings(DecodeOptions(beam_size=3, length_penalty=0.5)) == {
        "num_beams": 3, "length_penalty": 0.5, "repetition_penalty": 1.0}
    assert sampling_settings(DecodeOptions(beam_size=3, temperature=0.4, repetition_penalty=1.2)) == {
        "num_beams": 1, "temperature": 0.4, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.2}


def test_fit_prompt_drops_the_oldest_previous_text():
    prompt = [SOT_PREV, 1, 2, 3, 4, 5, 6, SOT, NO_TS]
    assert fit_prompt(prompt, 9, SOT, SOT_PREV) == prompt
    assert fit_prompt(prompt, 6, SOT, SOT_PREV) == [SOT_PREV, 4, 5, 6, SOT, NO_TS]
    assert fit_prompt(prompt, 3, SOT, SOT_PREV) == [SOT_PREV, SOT, NO_TS]
    with pytest.raises(ValueError, match="max_prompt_len"):
        fit_prompt([SOT, 1, 2, NO_TS], 3, SOT, SOT_PREV)


def test_build_generate_request():
    features = np.zeros((2, 80, 3000), dtype=np.float32)
    prompts = [[SOT, NO_TS], [SOT_PREV, 7, 8, 9, 10, 11, 12, 13, SOT, NO_TS]]
    request = build_generate_request(features, prompts, DecodeOptions(max_new_tokens=448), eot=EOT, sot=SOT,
                                     sot_prev=SOT_PREV, limits=LIMITS, suppress_tokens=[1, 2])
    assert request.prompts == [[SOT, NO_TS], [SOT_PREV, 9, 10, 11, 12, 13, SOT, NO_TS]]
    assert request.max_new_tokens == 40 - 8  # the longest prompt plus new tokens fit max_seq_len
    assert request.end_id == request.pad_id == EOT
    assert request.encoder_output_lengths == [1500, 1500]
    assert request.bad_words == [[[1], [2]], [[1], [2]]]
    assert request.sampling == {"num_beams": 1, "top_k": 1, "repetition_penalty": 1.0}
    small = build_generate_request(features, prompts[:1] * 2, DecodeOptions(max_new_tokens=5), eot=EOT, sot=SOT,
                                   sot_prev=SOT_PREV, limits=LIMITS)
    assert small.max_new_tokens == 5 and small.bad_words is None
    with pytest.raises(ValueError, match="even number"):
        build_generate_request(np.zeros((1, 80, 3001), np.float32), prompts[:1], DecodeOptions(), eot=EOT,
                               sot=SOT, sot_prev=SOT_PREV, limits=LIMITS)


def test_build_language_request():
    request = build_language_request(np.zeros((3, 80, 3000), np.float32), sot=SOT, eot=EOT, limits=LIMITS)
    assert request.prompts == [[SOT]] * 3 and request.max_new_tokens == 1
    assert request.sampling["num_beams"] == 4
    one_beam = dataclasses.replace(LIMITS, max_beam_width=1)
    request = build_language_request(np.zeros((1, 80, 3000), np.float32), sot=SOT, eot=EOT, limits=one_beam)
    assert request.sampling == {"num_beams": 1, "repetition_penalty": 1.0, "top_k": 1}


@pytest.mark.parametrize("echo", [True, False], ids=["prompt-echoed", "new-tokens-only"])
def test_parse_generate_output(echo):
    prompts = [[SOT, NO_TS], [SOT, NO_TS]]
    rows = [[11, 12, 13, EOT], [21, 22]]
    output_ids, lengths = [], []
    for prompt, row in zip(prompts, rows):
        tokens = (prompt if echo else []) + row
        lengths.append([len(tokens), len(tokens) - 1])
        output_ids.append([tokens + [EOT] * 5, [99, 98, EOT]])
    output = RuntimeOutput(output_ids=output_ids, sequence_lengths=[[l[0]] for l in lengths],
                           cum_log_probs=[[-1.5], [-0.9]])
    hypotheses = parse_generate_output(output, prompts, EOT, max_new_tokens=448)
    assert [h.tokens for h in hypotheses] == [[11, 12, 13], [21, 22]]
    assert hypotheses[0].sum_logprob == -1.5 and hypotheses[0].avg_logprob == pytest.approx(-1.5 / 4)
    assert hypotheses[1].no_speech_prob is None
    bare = parse_generate_output(RuntimeOutput(output_ids=[[[SOT, NO_TS, 5, 6, 7]]]), prompts[:1], EOT, 2)
    assert bare[0].tokens == [5, 6] and bare[0].sum_logprob is None
    with pytest.raises(RuntimeError, match="1 results for 2 requests"):
        parse_generate_output(RuntimeOutput(output_ids=[[[1]]]), prompts, EOT, 10)


LANGS = {50259: "en", 50260: "zh", 50261: "de"}


def test_parse_language_output_from_beams():
    output = RuntimeOutput(
        output_ids=[[[SOT, 50261], [SOT, 50259], [SOT, 11], [SOT, 50261]], [[SOT, 11], [SOT, EOT]]],
        sequence_lengths=[[2, 2, 2, 2], [2, 2]],
        cum_log_probs=[[-0.1, -2.5, -3.0, -4.0], [-0.1, -0.2]],
    )
    first, second = parse_language_output(output, [[SOT], [SOT]], EOT, LANGS)
    assert list(first) == ["de", "en"] and sum(first.values()) == pytest.approx(1.0)
    assert first["de"] == pytest.approx(1 / (1 + np.exp(-2.4)))
    assert second == {"en": 1.0}  # no language token among the beams: the default


def test_parse_language_output_from_logits():
    logits = np.full((1, 1, 1, 50300), -1e4, dtype=np.float32)
    logits[0, 0, 0, 11] = 50.0  # not a language: ignored, as openai-whisper masks non-language tokens
    logits[0, 0, 0, 50260] = 2.0
    logits[0, 0, 0, 50259] = 1.0
    output = RuntimeOutput(output_ids=[[[SOT, 11]]], generation_logits=logits)
    (probabilities,) = parse_language_output(output, [[SOT]], EOT, LANGS)
    assert list(probabilities)[:2] == ["zh", "en"]
    assert probabilities["zh"] == pytest.approx(np.exp(2) / (np.exp(2) + np.exp(1)), rel=1e-6)
    assert sum(probabilities.values()) == pytest.approx(1.0)


# ---- timestamps and the shared pipeline above the interface ----------------------------------
def test_timestamp_prompts_give_timestamp_tokens(engine, features, tokenizer):
    """Timestamp tokens (above <|endoftext|>) survive parsing: only eot and what follows is cut."""
    prompt = tokenizer.prompt_ids(PromptSpec(language="en", timestamps=True))
    (hypothesis,) = engine.generate(features[:1], [prompt], DecodeOptions())
    stamps = [token for token in hypothesis.tokens if token >= tokenizer.timestamp_begin]
    assert len(stamps) >= 2 and stamps == sorted(stamps)
    assert tokenizer.eot not in hypothesis.tokens


def test_short_form_pipeline_runs_on_the_engine(engine, tokenizer, audios):
    from whisper_triton.pipeline.windows import ShortFormTranscriber, ShortRequest

    results = ShortFormTranscriber(engine, tokenizer).transcribe([ShortRequest(audio=audios[0])])
    assert {"lazy", "dog"} <= set(results[0].text.lower().replace(".", " ").split())
    assert results[0].language == "en"


# ---- the runtime glue through a `tensorrt_llm` module whose ModelRunnerCpp is the stand-in -------
def test_runtime_glue_against_the_call_signatures(tmp_path, model_dir, monkeypatch, features, prompts, step_model):
    """The engine's own _platform / _load_runner / _run, with `tensorrt_llm.runtime.ModelRunnerCpp` the stand-in."""
    import types

    torch = pytest.importorskip("torch")
    fake = types.ModuleType("tensorrt_llm")
    fake.__version__ = TENSORRT_LLM_VERSION + ".post1"  # what PyPI ships for the pinned 0.17.0
    runtime = types.ModuleType("tensorrt_llm.runtime")
    runtime.ModelRunnerCpp = StandInModelRunnerCpp
    fake.runtime = runtime
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.runtime", runtime)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (8, 6))
    monkeypatch.setattr(TensorRTLLMEngine, "_torch_device", lambda self: torch.device("cpu"))

    root = write_engine_dir(tmp_path / "engines", model_dir, max_batch_size=4, max_prompt_len=226)
    engine = load_engine("tensorrtllm", str(root), device="cuda", compute_type="float32", cpu_threads=2,
                         max_batch_size=4, device_id=1)
    loaded = engine._runner.from_dir_kwargs
    assert loaded["device_ids"] == [1]  # bound to its Triton instance's GPU, not GPU 0
    assert loaded["is_enc_dec"] and loaded["max_batch_size"] == 4 and loaded["max_beam_width"] == 4
    assert loaded["processor_names"] == [f"whisper_rules_{i}" for i in range(4)]
    result = engine.generate(features[:2], prompts[:2], DecodeOptions(beam_size=2))
    call = engine._runner.calls[-1]
    assert call["output_log_probs"] and call["output_cum_log_probs"]
    assert call["names"] == ["whisper_rules_0", "whisper_rules_1"]
    assert call["end_id"] == call["pad_id"] == 50256 and call["feature_dtype"] == torch.float16
    assert call["sampling"] == {"num_beams": 2, "length_penalty": 1.0, "repetition_penalty": 1.0}
    assert call["prompts"] == [[50257], [50257]]  # sent up to <|startoftranscript|>, the rest forced
    assert {"lazy", "dog"} <= set(engine.tokenizer.decode(result[0].tokens).lower().replace(".", " ").split())
    assert result[0].sum_logprob < 0 and 0.0 <= result[0].no_speech_prob < 0.5

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (8, 0))
    with pytest.raises(EngineCompatibilityError, match="sm_86.*this GPU is sm_80"):
        load_engine("tensorrtllm", str(root), device="cuda")
