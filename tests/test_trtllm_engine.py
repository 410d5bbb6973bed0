"""The TensorRT-LLM engine on the stand-in executor (tests/trtllm_standin.py): in flight, window by window.

Each test pins one finding of the second reading (../shared/notes/trtllm-second-reading.md) and fails on
the engine before it (ModelRunnerCpp.generate under a lock, numpy rules on a host copy per step):
in-flight joining, zero host copies per decoder step, beams refused by name, one encoder request per
window with auto language, set_device first, a KV fraction that leaves room for the word-timestamp copy,
a cross-attention share sized for 1,500 encoder positions, and a stand-in that behaves as upstream.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
whisper_decoding = pytest.importorskip("whisper.decoding")

from multilingual import multilingual_tokenizer_json  # noqa: E402
from testkit.synthetic_speech import spoken_sentences  # noqa: E402
from trtllm_standin import (COUNTERS, STREAMS, Executor, OutputConfig, Request, SamplingConfig,  # noqa: E402
                            StandInCuda, StandInRuntimeEngine, StepModel, write_engine_dir)
from whisper_triton.contract.capabilities import EngineCapabilities  # noqa: E402
from whisper_triton.contract.engine_manifest import EngineManifest  # noqa: E402
from whisper_triton.contract.release import TENSORRT_LLM_VERSION  # noqa: E402
from whisper_triton.engines.base import DecodeOptions  # noqa: E402
from whisper_triton.engines.ctranslate2_engine import CTranslate2Engine  # noqa: E402
from whisper_triton.engines.tensorrtllm.compatibility import _release, check_compatibility  # noqa: E402
from whisper_triton.engines.tensorrtllm.memory import (ENCODER_POSITIONS, DecoderShape,  # noqa: E402
                                                       NotEnoughGpuMemoryError, cross_kv_fraction, kv_plan)
from whisper_triton.engines.tensorrtllm.requests import engine_limits  # noqa: E402
from whisper_triton.engines.tensorrtllm.rules import WhisperRulesProcessor  # noqa: E402
from whisper_triton.errors import WhisperTritonError  # noqa: E402
from whisper_triton.pipeline.features import batch_log_mel  # noqa: E402
from whisper_triton.pipeline.tokenizer import PromptSpec, WhisperTokenizer  # noqa: E402
from whisper_triton.pipeline.windows import ShortFormTranscriber, ShortRequest  # noqa: E402
from whisper_triton.settings import load_settings  # noqa: E402

LONG = "Seven hundred people waited in the rain for the morning train, and nobody said a word."
SHORT = "Hello."


@pytest.fixture(scope="module")
def model_dir():
    return load_settings().resolved_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> WhisperTokenizer:
    return WhisperTokenizer.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def step_model(model_dir) -> StepModel:
    model = StepModel.from_ct2_dir(model_dir)
    Executor.step_model = model
    return model


@pytest.fixture(scope="module")
def audios(tmp_path_factory) -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required: apt-get install espeak-ng")
    folder = tmp_path_factory.mktemp("trt-speech")
    return [*spoken_sentences(folder, ["The quick brown fox jumps over the lazy dog.", LONG, SHORT]),
            np.zeros(16000 * 3, dtype=np.float32)]


@pytest.fixture(scope="module")
def features(audios) -> np.ndarray:
    return batch_log_mel(audios, 80)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, model_dir, step_model):
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path_factory.mktemp("e") / "e", model_dir, max_batch_size=16))
    yield engine
    engine.close()


def _prompt(tokenizer, timestamps=False):
    return tokenizer.prompt_ids(PromptSpec(language="en", timestamps=timestamps))


def _wait(futures, seconds=300):
    deadline = time.monotonic() + seconds
    return [future.result(timeout=max(1.0, deadline - time.monotonic())) for future in futures]


# ---- the rules through the engine, against openai-whisper ----------------------------------------
@pytest.mark.parametrize("timestamps", [False, True], ids=["notimestamps", "timestamps"])
def test_scores_and_no_speech_match_openai(engine, tokenizer, step_model, features, timestamps):
    """Greedy windows through the executor: openai's tokens, avg log-probs and no-speech probability (the
    stand-in's logits are float16, so scores agree to fp16 rounding)."""
    chosen = features[[0, 3]]
    hypotheses = engine.generate(chosen, [_prompt(tokenizer, timestamps)] * 2, DecodeOptions())
    options = whisper_decoding.DecodingOptions(language="en", without_timestamps=not timestamps, fp16=False)
    for hypothesis, mel in zip(hypotheses, chosen):
        reference = whisper_decoding.decode(step_model.model, torch.from_numpy(np.ascontiguousarray(mel)), options)
        assert hypothesis.tokens == reference.tokens
        assert hypothesis.avg_logprob == pytest.approx(reference.avg_logprob, abs=2e-2)
        assert hypothesis.no_speech_prob == pytest.approx(reference.no_speech_prob, abs=5e-3)
    assert hypotheses[1].no_speech_prob > 3 * hypotheses[0].no_speech_prob  # the silent window


# ---- finding 1: in-flight batching ------------------------------------------------------------------
def test_a_short_window_joins_in_flight_and_finishes_within_its_own_steps_plus_one(engine, tokenizer, features):
    executor = engine.executor
    (alone,) = engine.submit(features[2:3], [_prompt(tokenizer)], DecodeOptions())
    _wait([alone])
    own_steps = executor.finished_at[len(executor.requests)] - executor.joined[len(executor.requests)] + 1
    long_futures = engine.submit(np.repeat(features[1:2], 8, axis=0), [_prompt(tokenizer)] * 8, DecodeOptions())
    first_long = len(executor.requests) - 7
    deadline = time.monotonic() + 120
    while executor.steps < executor.joined.get(first_long, 10**9) + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    enqueued_at = executor.steps
    (short,) = engine.submit(features[2:3], [_prompt(tokenizer)], DecodeOptions())
    short_id = len(executor.requests)
    hypothesis = _wait([short])[0]
    longs = _wait(long_futures)
    assert tokenizer.decode(hypothesis.tokens).strip().lower().startswith("hello")
    joined, finished = executor.joined[short_id], executor.finished_at[short_id]
    assert joined <= enqueued_at + 1  # it joined the running batch at the next step
    assert finished - joined + 1 <= own_steps + 1  # and took its own steps, not the long windows'
    assert finished < min(executor.finished_at[first_long + i] for i in range(8))
    assert all(len(h.tokens) > len(hypothesis.tokens) for h in longs)


def test_windows_per_step_grow_with_concurrency(engine, tokenizer, features):
    """Eight windows one after another vs. all in flight: rows per step and windows per step (cost model) grow."""
    executor = engine.executor
    options = DecodeOptions(max_new_tokens=6)

    def run(concurrent: bool):
        steps, clock = executor.steps, executor.clock_ms
        if concurrent:
            _wait(engine.submit(np.repeat(features[:1], 8, axis=0), [_prompt(tokenizer)] * 8, options))
        else:
            for _ in range(8):
                _wait(engine.submit(features[:1], [_prompt(tokenizer)], options))
        return executor.steps - steps, executor.clock_ms - clock

    serial_steps, serial_ms = run(False)
    concurrent_steps, concurrent_ms = run(True)
    assert 8 / concurrent_steps > 4 * (8 / serial_steps)
    assert concurrent_ms < serial_ms / 4


# ---- finding 2: no host round trip per step ------------------------------------------------------
def test_zero_host_copies_per_processor_step_and_one_read_per_window(engine, tokenizer, features):
    calls_before, reads_before = len(COUNTERS.processor_calls), COUNTERS.outside["d2h"]
    stream = STREAMS[engine.executor.stream.ptr]
    entered_before = stream.entered
    hypotheses = engine.generate(features, [_prompt(tokenizer, True), _prompt(tokenizer)] * 2, DecodeOptions())
    calls = COUNTERS.processor_calls[calls_before:]
    assert calls and all(call["d2h"] == 0 and call["syncs"] == 0 for call in calls)
    assert max(call["rows"] for call in calls) >= 2  # several windows in one processor call
    assert COUNTERS.outside["d2h"] - reads_before == len(hypotheses)  # each window read once, at its end
    assert stream.entered - entered_before >= len(calls)  # the work ran on the executor's stream


def test_the_standin_counts_a_host_round_trip(tmp_path, model_dir, step_model, features):
    """What the old processor did (a host copy of the logits per step) is what the stand-in counts."""
    config = _standin_config(processor_map={"host": lambda rid, logits, ids, stream, cid: logits.float().cpu()})
    executor = _standin_executor(tmp_path, model_dir, config)
    try:
        before = len(COUNTERS.processor_calls)
        executor.enqueue_request(_standin_request(features[0], name="host", budget=3))
        _responses(executor, 1)
        assert [call["d2h"] for call in COUNTERS.processor_calls[before:]] == [1, 1, 1]
    finally:
        executor.shutdown()


# ---- finding 3: beams right or refused -------------------------------------------------------------
def test_a_beam_request_is_refused_naming_beam_size(engine, tokenizer, features):
    with pytest.raises(WhisperTritonError) as refused:
        engine.generate(features[:1], [_prompt(tokenizer)], DecodeOptions(beam_size=4))
    assert refused.value.status == 400 and refused.value.param == "beam_size"
    assert "parent ids" in refused.value.message
    assert engine.capabilities.max_beam_size == 1 and engine.executor.config.max_beam_width == 1


def test_standin_beam_slots_hold_raw_tokens_and_context_logits_are_tiled(tmp_path, model_dir, step_model, features):
    """Why beams are refused: upstream hands the processor each SLOT's raw tokens; after a reorder they are not
    the beams' paths (what the final output gathers)."""
    seen = []
    config = _standin_config(processor_map={"spy": lambda rid, logits, ids, stream, cid: seen.append(
        (logits.as_subclass(torch.Tensor).clone(), [list(i) for i in ids]))}, beams=4)
    executor = _standin_executor(tmp_path, model_dir, config)
    try:
        executor.enqueue_request(_standin_request(features[0], name="spy", budget=12, beams=4))
        (response,) = _responses(executor, 1)
    finally:
        executor.shutdown()
    first_logits, first_ids = seen[0]
    assert first_logits.shape[:2] == (1, 4) and first_logits.dtype == torch.float16
    assert all(torch.equal(first_logits[0, 0], first_logits[0, b]) for b in range(4))  # tiled per beam
    assert first_ids == [[50257, 50362]] * 4
    paths = [tuple(beam[2:]) for beam in response.result.output_token_ids]
    histories = {tuple(slot[2:]) for slot in seen[-1][1]}
    last_paths = {tuple(p[: len(next(iter(histories)))]) for p in paths}
    assert histories != last_paths  # the slots' raw lists are not the gathered beam paths


# ---- finding 6: one encoder pass per window with auto language -------------------------------------
def test_one_encoder_request_per_window_with_auto_language(tmp_path, model_dir, step_model, audios):
    root = write_engine_dir(tmp_path / "ml", model_dir, max_batch_size=4)
    multilingual_tokenizer_json(model_dir / "tokenizer.json", root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["is_multilingual"] = True
    (root / "manifest.json").write_text(json.dumps(manifest))
    engine = StandInRuntimeEngine(root)
    try:
        assert engine.capabilities.language_in_decode
        tokenizer = WhisperTokenizer.from_model_dir(root, True)
        options = DecodeOptions(max_new_tokens=8)  # tiny.en's logits under a multilingual layout: any text
        results = ShortFormTranscriber(engine, tokenizer).transcribe(
            [ShortRequest(audio=a, options=options) for a in audios[:2]])
        executor = engine.executor
        assert len(executor.requests) == 2 == executor.encoder_runs  # no separate detection request
        for request, result in zip(executor.requests, results):
            assert request.input_token_ids == [tokenizer.sot] and request.max_new_tokens > 1
            assert result.language in tokenizer.language_ids and 0 < result.language_probability <= 1
        detected = engine.detect_language(batch_log_mel(audios[:2], 80))
        assert [max(d, key=d.get) for d in detected] == [r.language for r in results]
    finally:
        engine.close()


# ---- findings 4, 5, 8: memory and devices -----------------------------------------------------------
def test_set_device_comes_before_any_cuda_use(tmp_path, model_dir, step_model):
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir), device_id=3)
    try:
        calls = engine._cuda.calls
        assert calls[0] == "is_available" and calls[1] == "set_device"  # a device count, then the GPU
        assert calls.index("set_device") < calls.index("import tensorrt_llm") < calls.index("mem_get_info")
        assert engine.executor.config.parallel_config.device_ids == [3]
    finally:
        engine.close()


def test_kv_fraction_leaves_room_for_the_word_timestamp_copy(tmp_path, model_dir, step_model, monkeypatch):
    monkeypatch.setattr(StandInCuda, "memory", (int(2.5 * (1 << 30)), 24 << 30))
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir, ct2_copy=True))
    try:
        plan = engine.kv_plan
        copy = (tmp_path / "e" / "ctranslate2" / "model.bin").stat().st_size
        assert plan.reserve_bytes >= copy
        assert plan.free_fraction < 0.8  # less than asked for: the copy needs the room
        assert plan.free_after_engines * (1 - plan.free_fraction) >= plan.reserve_bytes
        kv = engine.executor.config.kv_cache_config
        assert kv.free_gpu_memory_fraction == plan.free_fraction
        assert kv.cross_kv_cache_fraction == pytest.approx(ENCODER_POSITIONS / (ENCODER_POSITIONS + 448))
    finally:
        engine.close()


def test_windows_in_flight_come_from_the_kv_budget(tmp_path, model_dir, step_model, features, tokenizer, monkeypatch):
    """A small KV budget declares fewer windows than the build's batch, and the executor holds that many."""
    per_window = DecoderShape(4, 384).kv_bytes_per_token * (ENCODER_POSITIONS + 448)
    monkeypatch.setattr(StandInCuda, "memory", ((1 << 30) + int(3.5 * per_window / 0.8), 24 << 30))
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir, max_batch_size=8))
    try:
        assert engine.capabilities.in_flight_windows == engine.in_flight_windows == 3 < engine.max_batch_size
        _wait(engine.submit(np.repeat(features[:1], 6, axis=0), [_prompt(tokenizer)] * 6,
                            DecodeOptions(max_new_tokens=4)))
        assert max(len(step["requests"]) for step in engine.executor.step_log) == 3
    finally:
        engine.close()


def test_memory_budget_arithmetic_of_large_v3_and_turbo_on_an_a10g():
    """docs/gpu.md's table: KV per window from the model shapes, windows that fit beside the copy."""
    large, turbo = DecoderShape(32, 1280), DecoderShape(4, 1280)
    assert large.kv_bytes_per_token * 448 == 73_400_320  # self-attention of one window (~73 MB)
    assert large.kv_bytes_per_token * ENCODER_POSITIONS == 245_760_000  # cross-attention (~246 MB)
    assert cross_kv_fraction(448) == pytest.approx(0.770, abs=1e-3)
    large_weights, turbo_weights = int(1.55e9 * 2), int(0.809e9 * 2)  # fp16 engines; the fp16 copy is as large
    for free in (22 << 30, 19 << 30):  # an A10G's 24 GB after CUDA's context, and with less to spare
        plan = kv_plan(free_bytes=free, engines=large_weights, reserve=large_weights + (512 << 20),
                       requested_fraction=0.8, shape=large, max_seq_len=448, max_batch_size=256)
        assert plan.free_after_engines * (1 - plan.free_fraction) >= plan.reserve_bytes - 1
        assert plan.windows == plan.kv_bytes // (large.kv_bytes_per_token * (1500 + 448))
    assert plan.free_fraction < 0.8 and plan.windows == 39  # 19 GiB: the copy binds, 39 windows of 319 MB
    turbo_plan = kv_plan(free_bytes=22 << 30, engines=turbo_weights, reserve=turbo_weights + (512 << 20),
                         requested_fraction=0.8, shape=turbo, max_seq_len=448, max_batch_size=64)
    assert turbo_plan.windows == 64  # the build's batch, not memory, limits turbo (40 MB a window)
    with pytest.raises(NotEnoughGpuMemoryError, match="word-timestamp copy"):
        kv_plan(free_bytes=5 << 30, engines=3 << 30, reserve=int(3.6e9), requested_fraction=0.8, shape=large,
                max_seq_len=448, max_batch_size=8)


# ---- the rest of the engine ---------------------------------------------------------------------------
def test_engine_declares_what_it_does(tmp_path, model_dir, step_model):
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "bare", model_dir, max_batch_size=4))
    try:
        caps = engine.capabilities
        assert isinstance(caps, EngineCapabilities) and caps.engine == "tensorrtllm"
        assert caps.scores and caps.no_speech_prob and caps.timestamp_rules and caps.suppress_blank
        assert caps.in_flight_windows == 4 and not caps.language_in_decode  # English-only: no language to choose
        assert not caps.word_timestamps and "ctranslate2/" in caps.missing_reason("word_timestamps")
        assert EngineCapabilities.from_json(caps.to_json()) == caps
    finally:
        engine.close()


def test_alignment_is_engine_independent(tmp_path, model_dir, tokenizer, step_model, features, audios):
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir, ct2_copy=True))
    try:
        (hypothesis,) = engine.generate(features[:1], [_prompt(tokenizer)], DecodeOptions())
        ct2 = CTranslate2Engine(model_dir, tokenizer.special_tokens(), cpu_threads=2)
        text = [t for t in hypothesis.tokens if t < tokenizer.eot]
        frames = [min(audios[0].size, 480000) // 160]
        start = [tokenizer.sot, tokenizer.no_timestamps]
        ours = engine.align(features[:1], start, [text], frames)[0]
        assert ours == ct2.align(features[:1], start, [text], frames)[0] and len(ours.starts) == len(text)
    finally:
        engine.close()


def test_a_failing_processor_is_reported_not_swallowed(tmp_path, model_dir, tokenizer, step_model, features,
                                                      monkeypatch):
    engine = StandInRuntimeEngine(write_engine_dir(tmp_path / "e", model_dir))

    def broken(self, histories, states):
        raise ValueError("boom")

    monkeypatch.setattr(WhisperRulesProcessor, "plan_step", broken)
    try:
        with pytest.raises(RuntimeError, match="logits processor failed: ValueError: boom"):
            engine.generate(features[:1], [_prompt(tokenizer)], DecodeOptions())
    finally:
        engine.close()


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


# ---- the stand-in refuses what upstream refuses ---------------------------------------------------
def _standin_config(processor_map=None, beams=1):
    from trtllm_standin import ExecutorConfig, KvCacheConfig, LogitsPostProcessorConfig

    processors = LogitsPostProcessorConfig()
    processors.processor_map = processor_map or {}
    config = ExecutorConfig(max_beam_width=beams, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.5,
                                                                                cross_kv_cache_fraction=0.75))
    config.logits_post_processor_config = processors
    return config


def _standin_executor(tmp_path, model_dir, config):
    from trtllm_standin import ModelType

    root = write_engine_dir(tmp_path / "raw", model_dir, max_batch_size=2)
    return Executor(str(root / "encoder"), str(root / "decoder"), ModelType.ENCODER_DECODER, config)


def _standin_request(window, name=None, budget=4, beams=1, dtype=torch.float16, **changes):
    values = dict(input_token_ids=[50257, 50362], max_new_tokens=budget, end_id=50256, pad_id=50256,
                  sampling_config=SamplingConfig(beam_width=beams, top_k=1), output_config=OutputConfig(),
                  encoder_input_features=torch.from_numpy(np.ascontiguousarray(window.T)).to(dtype),
                  encoder_output_length=window.shape[-1] // 2, logits_post_processor_name=name)
    values.update(changes)
    return Request(**values)


def _responses(executor, count, seconds=120):
    import datetime

    out, deadline = [], time.monotonic() + seconds
    while len(out) < count and time.monotonic() < deadline:
        out += executor.await_responses(timeout=datetime.timedelta(milliseconds=200))
    assert len(out) == count and not any(r.has_error() for r in out), [r.error_msg for r in out]
    return out


def test_standin_refuses_what_the_executor_refuses(tmp_path, model_dir, step_model, features):
    executor = _standin_executor(tmp_path, model_dir, _standin_config({"noop": lambda *a: None}, beams=2))
    try:
        with pytest.raises(TypeError):
            _standin_request(features[0], max_len=3)
        with pytest.raises(TypeError):
            SamplingConfig(num_beams=2)  # 0.17's name is beam_width
        with pytest.raises(RuntimeError, match="LogitsPostProcessor missing not found"):
            executor.enqueue_request(_standin_request(features[0], name="missing"))
        with pytest.raises(RuntimeError, match="batched logits post-processor"):
            executor.enqueue_request(_standin_request(features[0], name=Request.BATCHED_POST_PROCESSOR_NAME))
        with pytest.raises(RuntimeError, match="beam width 3"):
            executor.enqueue_request(_standin_request(features[0], beams=3))
        with pytest.raises(RuntimeError, match="encoder engine's dtype"):
            executor.enqueue_request(_standin_request(features[0], dtype=torch.float32))
        with pytest.raises(RuntimeError, match="max_seq_len"):
            executor.enqueue_request(_standin_request(features[0], budget=447))
    finally:
        executor.shutdown()
