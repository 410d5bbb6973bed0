"""One contract for every engine behind `whisper_triton.engines.Engine`.

The same suite runs against
- the CTranslate2 engine, for real, on the embedded Whisper tiny.en and real speech made by espeak-ng;
- the TensorRT-LLM engine on the stand-in executor (tests/trtllm_standin.py), a CPU stand-in for
  TensorRT-LLM 0.17's `tensorrt_llm.bindings.executor` itself: the engine's ExecutorConfig, one Request per
  window, its batched rules processor and its response parsing run for real; the stand-in refuses what
  upstream refuses (keywords, limits, dtypes, unknown processors), steps all in-flight requests together
  with fp16 logits, and decodes over the real per-step logits of openai-whisper's model with the same
  tiny.en weights. So "both engines give the same tokens" compares CTranslate2's decoding with the
  engine's rules on another implementation of the model.
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
    PromptTokens,
    build_detect_request,
    build_window_request,
    engine_limits,
    fit_prompt,
    parse_window_output,
    sampling_settings,
    window_features,
)
from whisper_triton.engines.tensorrtllm.rules import AUTO_LANGUAGE
from whisper_triton.errors import WhisperTritonError
from whisper_triton.contract.engine_manifest import BuildConfig, EngineManifest
from whisper_triton.pipeline.features import N_FRAMES, batch_log_mel
from whisper_triton.contract.release import TENSORRT_LLM_VERSION
from whisper_triton.settings import load_settings
from whisper_triton.pipeline.tokenizer import PromptSpec, WhisperTokenizer

from trtllm_standin import (GPU_ARCH, Executor, StandInCuda, StandInRuntimeEngine, StepModel,
                            install_fake_tensorrt_llm, patch_torch_cuda, write_engine_dir)

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
    Executor.step_model = model
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


def test_beam_search_returns_the_sentence_or_is_refused_by_name(engine, features, prompts, tokenizer):
    """Beams are right (CTranslate2) or refused with a 400 naming beam_size and saying why (TensorRT-LLM: its
    processor sees beam slots' raw tokens, not beam paths)."""
    if engine.capabilities.max_beam_size < 2:
        with pytest.raises(WhisperTritonError) as refused:
            engine.generate(features[:1], prompts[:1], DecodeOptions(beam_size=2))
        assert refused.value.status == 400 and refused.value.param == "beam_size"
        assert "raw tokens, not the beam's path" in refused.value.message
        return
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


def test_every_window_is_its_own_executor_request(trt_engine, features, prompts):
    """Three windows, three requests; never more active than the executor's max_batch_size (2 here)."""
    executor = trt_engine.executor
    before = len(executor.requests)
    trt_engine.generate(features, prompts, DecodeOptions())
    assert len(executor.requests) - before == 3
    assert max(len(step["requests"]) for step in executor.step_log) <= 2


def test_beam_size_above_one_is_refused_with_the_reason(trt_engine, features, prompts):
    with pytest.raises(WhisperTritonError, match="beam_size must be 1 on this engine, got 5: .*parent ids"):
        trt_engine.generate(features[:1], prompts[:1], DecodeOptions(beam_size=5))
    assert trt_engine.capabilities.max_beam_size == 1 and "beam_size" in trt_engine.capabilities.notes


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
    assert engine.max_batch_size == 6 and engine.max_beam_width == 4 and engine.capabilities.max_beam_size == 1


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


def test_window_features_are_fp16_frames_by_mels():
    window = np.random.default_rng(0).uniform(-1.5, 1.5, (80, 3000)).astype(np.float32)
    tensor = window_features(window)
    assert tensor.dtype == np.float16 and tensor.shape == (3000, 80) and tensor.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(tensor.astype(np.float32), window.T, atol=2e-3)
    assert window_features(window, "bfloat16").dtype == np.float32  # cast on the way (numpy has no bf16)


def test_sampling_settings():
    assert sampling_settings(DecodeOptions()) == {"beam_width": 1, "top_k": 1, "repetition_penalty": 1.0}
    assert sampling_settings(DecodeOptions(beam_size=3, temperature=0.4, repetition_penalty=1.2)) == {
        "beam_width": 1, "temperature": 0.4, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.2}


def test_fit_prompt_drops_the_oldest_previous_text():
    prompt = [SOT_PREV, 1, 2, 3, 4, 5, 6, SOT, NO_TS]
    assert fit_prompt(prompt, 9, SOT, SOT_PREV) == prompt
    assert fit_prompt(prompt, 6, SOT, SOT_PREV) == [SOT_PREV, 4, 5, 6, SOT, NO_TS]
    assert fit_prompt(prompt, 3, SOT, SOT_PREV) == [SOT_PREV, SOT, NO_TS]
    with pytest.raises(ValueError, match="max_prompt_len"):
        fit_prompt([SOT, 1, 2, NO_TS], 3, SOT, SOT_PREV)


TRANSCRIBE, TRANSLATE, EN, DE = 50359, 50358, 50259, 50261
TOKENS = PromptTokens(SOT, SOT_PREV, EOT, NO_TS, TRANSCRIBE, TRANSLATE, frozenset({EN, DE}), True)


def test_build_window_request():
    window = np.zeros((80, 3000), dtype=np.float32)
    prompt = [SOT_PREV, 7, 8, 9, 10, 11, 12, 13, SOT, EN, TRANSCRIBE, NO_TS]
    request = build_window_request(window, prompt, DecodeOptions(max_new_tokens=448), tokens=TOKENS, limits=LIMITS)
    assert request.sent == [SOT_PREV, 8, 9, 10, 11, 12, 13, SOT]  # the oldest previous text dropped
    assert request.plan.forced == (EN, TRANSCRIBE, NO_TS) and not request.plan.timestamps
    assert request.max_new_tokens == 40 - 8 and request.output_max == 40 - 8 - 3  # forced tokens count
    assert request.encoder_output_length == 1500 and request.features.shape == (3000, 80)
    assert not request.auto_language
    auto = build_window_request(window, [SOT, TRANSCRIBE], DecodeOptions(max_new_tokens=5), tokens=TOKENS,
                                limits=LIMITS)
    assert auto.auto_language and auto.plan.forced == (AUTO_LANGUAGE, TRANSCRIBE) and auto.plan.timestamps
    assert auto.max_new_tokens == 7 and auto.sent == [SOT]
    with pytest.raises(ValueError, match="even number"):
        build_window_request(np.zeros((80, 3001), np.float32), [SOT], DecodeOptions(), tokens=TOKENS, limits=LIMITS)
    detect = build_detect_request(window, sot=SOT, limits=LIMITS)
    assert detect.sent == [SOT] and detect.max_new_tokens == 1 and detect.plan.detect_only


def test_parse_window_output():
    window = np.zeros((80, 3000), dtype=np.float32)
    request = build_window_request(window, [SOT, AUTO_LANGUAGE if False else DE, TRANSCRIBE, NO_TS],
                                   DecodeOptions(max_new_tokens=4), tokens=TOKENS, limits=LIMITS)
    assert parse_window_output([DE, TRANSCRIBE, NO_TS, 11, 12], request, TOKENS) == ([DE, TRANSCRIBE, NO_TS], [11, 12],
                                                                                    True)
    assert parse_window_output([SOT, DE, TRANSCRIBE, NO_TS, 11, EOT], request, TOKENS)[1:] == ([11], True)  # echo
    full = parse_window_output([DE, TRANSCRIBE, NO_TS, 1, 2, 3, 4], request, TOKENS)
    assert full[1:] == ([1, 2, 3, 4], False)  # stopped at its budget: not ended on eot
    with pytest.raises(RuntimeError, match="logits processor was not applied"):
        parse_window_output([11, 12, 13, 14], request, TOKENS)
    auto = build_window_request(window, [SOT, TRANSCRIBE, NO_TS], DecodeOptions(), tokens=TOKENS, limits=LIMITS)
    assert parse_window_output([EN, TRANSCRIBE, NO_TS, 5], auto, TOKENS) == ([EN, TRANSCRIBE, NO_TS], [5], True)
    with pytest.raises(RuntimeError):
        parse_window_output([11, TRANSCRIBE, NO_TS, 5], auto, TOKENS)  # not a language at the sot step


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


# ---- the runtime glue through a `tensorrt_llm` module whose executor bindings are the stand-in -------
def test_runtime_glue_against_the_call_signatures(tmp_path, model_dir, monkeypatch, features, prompts, step_model):
    """The engine's own imports and CUDA calls, with `tensorrt_llm.bindings.executor` the stand-in."""
    torch = pytest.importorskip("torch")
    install_fake_tensorrt_llm(monkeypatch, TENSORRT_LLM_VERSION + ".post1")  # what PyPI ships for 0.17.0
    calls = patch_torch_cuda(monkeypatch)
    root = write_engine_dir(tmp_path / "engines", model_dir, max_batch_size=4, max_prompt_len=226)
    engine = load_engine("tensorrtllm", str(root), device="cuda", compute_type="float32", cpu_threads=2,
                         max_batch_size=4, device_id=1)
    try:
        assert calls[:2] == ["is_available", "set_device"]  # the GPU is chosen before anything else touches CUDA
        config = engine.executor_config()
        assert config.parallel_config.device_ids == [1] and config.max_beam_width == 1
        assert config.max_batch_size == 4 and config.logits_post_processor_config.processor_batched is engine.processor
        assert config.kv_cache_config.cross_kv_cache_fraction == pytest.approx(1500 / (1500 + 448))
        result = engine.generate(features[:2], prompts[:2], DecodeOptions())
        request = engine._executor.requests[-1]
        assert request.logits_post_processor_name == "batched" and request.client_id is not None
        assert request.end_id == request.pad_id == 50256 and request.encoder_input_features.dtype == torch.float16
        assert request.input_token_ids == [50257] and request.max_new_tokens == 448 - 1
        assert request.output_config.exclude_input_from_output and not request.output_config.return_log_probs
        assert {"lazy", "dog"} <= set(engine.tokenizer.decode(result[0].tokens).lower().replace(".", " ").split())
        assert result[0].sum_logprob < 0 and 0.0 <= result[0].no_speech_prob < 0.5
    finally:
        engine.close()
    patch_torch_cuda(monkeypatch, capability=(8, 0))
    with pytest.raises(EngineCompatibilityError, match="sm_86.*this GPU is sm_80"):
        load_engine("tensorrtllm", str(root), device="cuda")
