"""The TensorRT-LLM engine's GPU path, exercised on the ModelRunnerCpp stand-in (tests/trtllm_standin.py).

The engine runs through a `tensorrt_llm` module whose `runtime.ModelRunnerCpp` is the stand-in, so
its own `_platform`, `_load_runner`, `_run`, logits processors and parsing run as on a GPU. The
scores test is the one the first-run note says the old stand-in could not fail: it fails when the
engine does not ask for `output_log_probs` or when greedy scores come from the runtime (0 there).
"""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
whisper_decoding = pytest.importorskip("whisper.decoding")

from trtllm_standin import StandInModelRunnerCpp, StandInRuntimeEngine, StepModel, write_engine_dir  # noqa: E402
from testkit.synthetic_speech import spoken_sentences  # noqa: E402
from whisper_triton.contract.capabilities import EngineCapabilities  # noqa: E402
from whisper_triton.engines import load_engine  # noqa: E402
from whisper_triton.engines.base import DecodeOptions  # noqa: E402
from whisper_triton.engines.ctranslate2_engine import CTranslate2Engine  # noqa: E402
from whisper_triton.engines.tensorrtllm.compatibility import _release, check_compatibility  # noqa: E402
from whisper_triton.engines.tensorrtllm.requests import (  # noqa: E402
    RuntimeOutput,
    engine_limits,
    fit_prompt,
    parse_generate_output,
)
from whisper_triton.contract.engine_manifest import EngineManifest  # noqa: E402
from whisper_triton.pipeline.features import batch_log_mel  # noqa: E402
from whisper_triton.contract.release import TENSORRT_LLM_VERSION  # noqa: E402
from whisper_triton.settings import load_settings  # noqa: E402
from whisper_triton.pipeline.tokenizer import PromptSpec, WhisperTokenizer  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Seven hundred people waited in the rain for the morning train."]


@pytest.fixture(scope="module")
def model_dir():
    return load_settings().resolved_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> WhisperTokenizer:
    return WhisperTokenizer.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def step_model(model_dir) -> StepModel:
    model = StepModel.from_ct2_dir(model_dir)
    StandInModelRunnerCpp.step_model = model
    return model


@pytest.fixture(scope="module")
def audios(tmp_path_factory) -> list[np.ndarray]:
    """The sentences spoken by espeak-ng (testkit, shared with the other tests and the benchmarks)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required: apt-get install espeak-ng")
    folder = tmp_path_factory.mktemp("trt-speech")
    return [*spoken_sentences(folder, SENTENCES), np.zeros(16000 * 3, dtype=np.float32)]  # + silence


@pytest.fixture(scope="module")
def features(audios) -> np.ndarray:
    return batch_log_mel(audios, 80)


@pytest.fixture
def fake_runtime(monkeypatch):
    """`import tensorrt_llm` gives 0.17.0.post1 with the stand-in ModelRunnerCpp; torch sees an sm_86 GPU."""
    fake = types.ModuleType("tensorrt_llm")
    fake.__version__ = TENSORRT_LLM_VERSION + ".post1"
    runtime = types.ModuleType("tensorrt_llm.runtime")
    runtime.ModelRunnerCpp = StandInModelRunnerCpp
    fake.runtime = runtime
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.runtime", runtime)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (8, 6))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # tensors stay on the CPU
    from whisper_triton.engines.tensorrtllm import engine as tensorrtllm_engine

    if hasattr(tensorrtllm_engine.TensorRTLLMEngine, "_torch_device"):
        monkeypatch.setattr(tensorrtllm_engine.TensorRTLLMEngine, "_torch_device", lambda self: torch.device("cpu"))
    return StandInModelRunnerCpp


def _openai(step_model, features, timestamps: bool):
    options = whisper_decoding.DecodingOptions(language="en", without_timestamps=not timestamps, fp16=False)
    return [whisper_decoding.decode(step_model.model, torch.from_numpy(np.ascontiguousarray(mel)), options)
            for mel in features]


# ---- scores, no-speech and rules: the engine against openai-whisper's DecodingTask ---------------
@pytest.mark.parametrize("timestamps", [False, True], ids=["notimestamps", "timestamps"])
def test_scores_and_no_speech_match_openai(tmp_path, model_dir, tokenizer, step_model, features, fake_runtime,
                                           timestamps):
    """Greedy decoding on the runtime gives openai's tokens, sum/avg log-probs and no-speech probability."""
    root = write_engine_dir(tmp_path / "e", model_dir, max_batch_size=4, dtype="float32")
    engine = load_engine("tensorrtllm", str(root), device="cuda")
    prompt = tokenizer.prompt_ids(PromptSpec(language="en", timestamps=timestamps))
    hypotheses = engine.generate(features, [prompt] * len(features), DecodeOptions())
    expected = _openai(step_model, features, timestamps)
    for hypothesis, reference in zip(hypotheses, expected):
        assert hypothesis.tokens == reference.tokens
        assert hypothesis.sum_logprob is not None and hypothesis.sum_logprob < 0
        assert hypothesis.avg_logprob == pytest.approx(reference.avg_logprob, abs=2e-4)
        assert hypothesis.no_speech_prob == pytest.approx(reference.no_speech_prob, abs=1e-4)
    # the silence guard can work: the silent window is far more likely "no speech" than the spoken ones
    assert hypotheses[-1].no_speech_prob > 3 * max(h.no_speech_prob for h in hypotheses[:-1])


def test_engine_declares_the_rules_and_word_timestamps_with_the_copy(tmp_path, model_dir, step_model):
    bare = StandInRuntimeEngine(write_engine_dir(tmp_path / "bare", model_dir))
    caps = bare.capabilities
    assert isinstance(caps, EngineCapabilities) and caps.engine == "tensorrtllm"
    assert caps.scores and caps.no_speech_prob and caps.timestamp_rules and caps.suppress_blank
    assert caps.language_probabilities and caps.max_beam_size == 4 and "patience" not in caps.decoding_options
    assert not caps.word_timestamps and "ctranslate2/" in caps.missing_reason("word_timestamps")
    assert EngineCapabilities.from_json(caps.to_json()) == caps
    with_copy = StandInRuntimeEngine(write_engine_dir(tmp_path / "copy", model_dir, ct2_copy=True))
    assert with_copy.capabilities.word_timestamps
    assert with_copy._aligner is None  # loaded only when words are asked for


def test_alignment_is_engine_independent(tmp_path, model_dir, tokenizer, step_model, features, audios):
    """Tokens decoded on the runtime, aligned on the CTranslate2 copy, time like CTranslate2's own alignment."""
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir, ct2_copy=True))
    prompt = tokenizer.prompt_ids(PromptSpec(language="en"))
    hypotheses = engine.generate(features[:2], [prompt] * 2, DecodeOptions())
    ct2 = CTranslate2Engine(model_dir, tokenizer.special_tokens(), cpu_threads=2)
    start_sequence = [tokenizer.sot, tokenizer.no_timestamps]
    for index, hypothesis in enumerate(hypotheses):
        text = [t for t in hypothesis.tokens if t < tokenizer.eot]
        frames = [min(audios[index].size, 480000) // 160]
        ours = engine.align(features[index:index + 1], start_sequence, [text], frames)[0]
        theirs = ct2.align(features[index:index + 1], start_sequence, [text], frames)[0]
        assert ours == theirs and len(ours.starts) == len(text)
        assert ours.ends[-1] > ours.starts[0] and ours.ends == sorted(ours.ends)
    assert engine._aligner is not None


# ---- first-run defects -------------------------------------------------------------------------
def test_each_instance_binds_its_gpu(tmp_path, model_dir, step_model, fake_runtime):
    root = write_engine_dir(tmp_path / "e", model_dir)
    assert load_engine("tensorrtllm", str(root), device="cuda", device_id=3)._runner.device_ids == [3]
    assert load_engine("tensorrtllm", str(root), device="cuda")._runner.device_ids is None
    with pytest.raises(ValueError, match="device_id"):
        load_engine("tensorrtllm", str(root), device="cuda", device_id=-1)


def test_bf16_engines_get_bf16_features(tmp_path, model_dir, tokenizer, step_model, features):
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "bf16", model_dir, dtype="bfloat16"))
    prompt = tokenizer.prompt_ids(PromptSpec(language="en"))
    (hypothesis,) = engine.generate(features[:1], [prompt], DecodeOptions())
    assert engine.calls[-1]["feature_dtype"] == torch.bfloat16
    assert {"lazy", "dog"} <= set(tokenizer.decode(hypothesis.tokens).lower().replace(".", " ").split())


def test_decoder_positions_stay_within_448(tmp_path, model_dir, tokenizer, step_model, features):
    """An engine built with prompt 32 + 448 = 480 positions still gets requests within Whisper's 448."""
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir, max_seq_len=480, max_prompt_len=226))
    assert engine.limits.max_seq_len == 448
    previous = " ".join(["word"] * 300)
    prompt = tokenizer.prompt_ids(PromptSpec(language="en", previous_text=previous))
    # this test is about the request: the runtime answers with the forced token and stops
    engine._runner._decode = lambda *args, **kwargs: [([tokenizer.no_timestamps], -0.1)]
    engine.generate(features[:1], [prompt], DecodeOptions(max_new_tokens=448))
    call = engine.calls[-1]
    assert len(call["prompts"][0]) == 225  # <|startofprev|> + openai's 223 previous-text tokens + sot
    assert len(call["prompts"][0]) + call["max_new_tokens"] <= 448


def test_previous_text_budget_is_openais():
    sot_prev, sot, no_ts = 50360, 50257, 50362
    prompt = [sot_prev] + list(range(300)) + [sot, no_ts]
    fitted = fit_prompt(prompt, 1000, sot, sot_prev)
    assert fitted == [sot_prev] + list(range(77, 300)) + [sot, no_ts]  # the newest 223 kept
    assert fit_prompt(prompt, 6, sot, sot_prev) == [sot_prev, 297, 298, 299, sot, no_ts]


@pytest.mark.parametrize("built, running, ok", [
    ("0.17.0", "0.17.0.post1", True), ("0.17.0.post1", "0.17.0", True), ("0.17.0", "0.17.0+cu128", True),
    ("0.17.0", "0.18.2", False), ("0.17.0", "0.17.1", False),
])
def test_version_check_compares_releases(built, running, ok):
    manifest = EngineManifest(tensorrt_llm_version=built, gpu_arch="sm_86")
    check = lambda: check_compatibility(manifest, runtime_version=running, gpu_arch="sm_86",  # noqa: E731
                                        max_batch_size=None, limits=engine_limits(manifest))
    if ok:
        check()
    else:
        with pytest.raises(Exception, match="TensorRT engines only load in the version that built them"):
            check()
    assert _release("0.17.0.post1") == _release("0.17.0") != _release("0.18.2")


def test_a_failing_processor_is_reported_not_swallowed(tmp_path, model_dir, tokenizer, step_model, features,
                                                      monkeypatch):
    from whisper_triton.engines import whisper_rules

    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir))

    def broken(self, logits, histories):
        raise ValueError("boom")

    monkeypatch.setattr(whisper_rules.RequestState, "step", broken)
    with pytest.raises(RuntimeError, match="logits processor failed: ValueError: boom"):
        engine.generate(features[:1], [tokenizer.prompt_ids(PromptSpec(language="en"))], DecodeOptions())


def test_output_without_the_forced_sequence_is_refused():
    output = RuntimeOutput(output_ids=[[[50257, 11, 12, 50256]]], sequence_lengths=[[4]])
    with pytest.raises(RuntimeError, match="logits processors were not applied"):
        parse_generate_output(output, [[50257]], 50256, 10, forced=[(50362,)])


# ---- the stand-in refuses what upstream refuses ------------------------------------------------
@pytest.fixture(scope="module")
def runner(tmp_path_factory, model_dir, step_model) -> StandInModelRunnerCpp:
    root = write_engine_dir(tmp_path_factory.mktemp("runner") / "e", model_dir, max_batch_size=2)
    return StandInModelRunnerCpp.from_dir(str(root), is_enc_dec=True, logits_processor_map={"noop": lambda *a: None})


def _request(features, n: int = 1, dtype=torch.float16):
    return dict(batch_input_ids=[torch.tensor([50257, 50362], dtype=torch.int32)] * n,
                encoder_input_features=[torch.from_numpy(np.ascontiguousarray(features[i].T)).to(dtype)
                                        for i in range(n)],
                encoder_output_lengths=[1500] * n, max_new_tokens=6, end_id=50256, pad_id=50256, return_dict=True,
                output_sequence_lengths=True)


def test_standin_signatures_refuse_unknown_keywords(tmp_path, model_dir, runner, features):
    with pytest.raises(TypeError):
        StandInModelRunnerCpp.from_dir(str(tmp_path), is_enc_dec=True, max_output_length=10)
    with pytest.raises(TypeError, match="num_beam"):
        runner.generate(**_request(features), num_beam=2)


def test_standin_scores_only_with_output_log_probs(runner, features):
    plain = runner.generate(**_request(features), output_cum_log_probs=True, num_beams=2)
    assert plain["cum_log_probs"].abs().sum() == 0 and "log_probs" not in plain
    asked = runner.generate(**_request(features), output_cum_log_probs=True, output_log_probs=True, num_beams=2)
    assert (asked["cum_log_probs"] < 0).all()
    greedy = runner.generate(**_request(features), output_cum_log_probs=True, output_log_probs=True, top_k=1)
    assert greedy["cum_log_probs"].abs().sum() == 0  # normalised over the one greedy candidate
    assert "cum_log_probs" not in runner.generate(**_request(features), output_log_probs=True)


def test_standin_echoes_the_prompt_and_pads_with_end_id(runner, features):
    out = runner.generate(**_request(features), top_k=1)
    ids, length = out["output_ids"][0, 0].tolist(), int(out["sequence_lengths"][0, 0])
    assert len(ids) == runner.max_seq_len and ids[:2] == [50257, 50362]
    assert 2 < length <= 8 and set(ids[length:]) == {50256}


def test_standin_refuses_what_the_runtime_refuses(runner, features):
    with pytest.raises(RuntimeError, match="LogitsPostProcessor missing not found"):
        runner.generate(**_request(features), logits_processor_names=["missing"])
    with pytest.raises(RuntimeError, match="exceeds the engine or specified limit"):
        runner.generate(**_request(features, n=3))
    with pytest.raises(RuntimeError, match="Num beams"):
        runner.generate(**_request(features), num_beams=5)
    with pytest.raises(RuntimeError, match="the encoder engine takes"):
        runner.generate(**_request(features, dtype=torch.float32))
    request = _request(features)
    request["max_new_tokens"] = 447
    with pytest.raises(RuntimeError, match="maximum new tokens"):
        runner.generate(**request)


def test_standin_calls_processors_at_every_step(runner, features):
    seen = []
    runner.processors["spy"] = lambda rid, logits, ids, stream, client: seen.append((rid, tuple(logits.shape),
                                                                                     [len(b) for b in ids], client))
    out = runner.generate(**_request(features), top_k=1, logits_processor_names=["spy"])
    generated = int(out["sequence_lengths"][0, 0]) - 2
    assert [s[2] for s in seen] == [[2 + k] for k in range(len(seen))]
    assert len(seen) in (generated, generated + 1) and all(s[1] == (1, 1, 51864) and s[3] is None for s in seen)


def test_language_detection_runs_through_the_hook(tmp_path, model_dir, step_model, features):
    """A multilingual-layout engine asks one greedy step per window and reads openai's softmax over languages.

    The vocabulary layout is the multilingual one (tests/multilingual.py) over tiny.en's logits: the
    probabilities mean nothing, but they must be exactly the rule applied to the runtime's step logits.
    """
    import json

    from multilingual import multilingual_tokenizer_json
    from whisper_triton.engines.whisper_rules import language_probabilities

    root = write_engine_dir(tmp_path / "ml", model_dir)
    multilingual_tokenizer_json(model_dir / "tokenizer.json", root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["is_multilingual"] = True
    (root / "manifest.json").write_text(json.dumps(manifest))
    engine = StandInRuntimeEngine(root)
    assert engine.is_multilingual
    detected = engine.detect_language(features[:2])
    call = engine.calls[-1]
    assert call["prompts"] == [[engine.tokenizer.sot]] * 2 and call["max_new_tokens"] == 1
    assert call["sampling"]["num_beams"] == 1 and call["names"] == ["whisper_rules_0", "whisper_rules_1"]
    for window, probabilities in zip(features[:2], detected):
        audio = step_model.encode(torch.from_numpy(np.ascontiguousarray(window.T)).to(torch.float16))
        logits = step_model.logits([[engine.tokenizer.sot]], audio)[0].numpy()
        expected = language_probabilities(logits, engine.rule_tokens)
        assert list(probabilities) == list(expected)
        assert list(probabilities.values()) == pytest.approx(list(expected.values()), rel=1e-5, abs=1e-12)
        assert sum(probabilities.values()) == pytest.approx(1.0)


def test_a_batch_mixing_timestamp_modes_keeps_limits_and_scores(tmp_path, model_dir, tokenizer, step_model,
                                                                features):
    """Forced start sequences of different lengths in one batch: each hypothesis keeps max_new_tokens and a score."""
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir))
    prompts = [tokenizer.prompt_ids(PromptSpec(language="en", timestamps=True)),
               tokenizer.prompt_ids(PromptSpec(language="en"))]
    with_ts, without = engine.generate(features[:2], prompts, DecodeOptions(max_new_tokens=5))
    assert engine.calls[-1]["max_new_tokens"] == 6  # 5 + the one forced <|notimestamps|>
    assert len(with_ts.tokens) == len(without.tokens) == 5
    assert with_ts.tokens[0] >= tokenizer.timestamp_begin and without.tokens[0] < tokenizer.eot
    assert with_ts.sum_logprob < 0 and without.sum_logprob < 0
    full = engine.generate(features[1:2], prompts[1:], DecodeOptions())[0]
    assert full.tokens[:5] == without.tokens and full.sum_logprob < without.sum_logprob


def test_processor_accepts_one_row_for_several_beams(tmp_path, model_dir, step_model):
    """At the context step the runtime may hand one logits row for beams that share the prompt."""
    from whisper_triton.engines.whisper_rules import RequestPlan, RequestState

    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir))
    processor = engine._slots.processor_map()["whisper_rules_0"]
    state = RequestState(plan=RequestPlan(forced=(engine.tokenizer.no_timestamps,)), tokens=engine.rule_tokens)
    with engine._slots.bound([state], [[engine.tokenizer.sot]]):
        logits = torch.randn(1, 1, 51864)
        processor(7, logits, [[engine.tokenizer.sot]] * 3, None, None)
    assert torch.isfinite(logits[0, 0]).nonzero().flatten().tolist() == [engine.tokenizer.no_timestamps]
    assert state.no_speech_prob is not None


def test_translate_is_declared_from_the_model_card(tmp_path, model_dir, step_model):
    """turbo-like cards say translate=false; the engine declares it, and English-only models never translate."""
    import json

    from multilingual import multilingual_tokenizer_json

    root = write_engine_dir(tmp_path / "ml", model_dir)
    multilingual_tokenizer_json(model_dir / "tokenizer.json", root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["is_multilingual"] = True
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert StandInRuntimeEngine(root).capabilities.translate
    (root / "whisper_model.json").write_text(json.dumps({"n_mels": 80, "n_audio_layer": 4, "n_text_layer": 4,
                                                         "n_vocab": 51866, "multilingual": True, "translate": False}))
    assert not StandInRuntimeEngine(root).capabilities.translate
    assert not StandInRuntimeEngine(write_engine_dir(tmp_path / "en", model_dir)).capabilities.translate
