"""The batched torch rules processor (engines/tensorrtllm/rules.py) held against openai-whisper's own classes
and against the numpy rules (engines/whisper_rules.py), on CPU torch.

- crafted logits, float32 and float16: openai's SuppressBlank / SuppressTokens / ApplyTimestampRules on
  the same tensors and histories, all rows of a step in ONE processor call, as the executor makes it;
- real logits: openai's `whisper.decoding.decode` against a greedy loop that feeds the processor as the
  executor does (sent prompt up to <|startoftranscript|>, the rest forced): tiny.en on real speech, and
  multilingual base with auto language (the language chosen at the sot step inside the processor,
  against openai's `detect_language` + decode with language=None).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
whisper_decoding = pytest.importorskip("whisper.decoding")
import whisper.tokenizer as openai_tokenizer  # noqa: E402

from testkit.multilingual_speech import sentence  # noqa: E402
from testkit.real_models import whisper_base_dir  # noqa: E402
from testkit.synthetic_speech import spoken_sentences  # noqa: E402
from trtllm_standin import StepModel  # noqa: E402
from whisper_triton.engines.tensorrtllm.rules import AUTO_LANGUAGE, RuleState, WhisperRulesProcessor  # noqa: E402
from whisper_triton.engines.whisper_rules import RequestPlan, RuleTokens, apply_rules  # noqa: E402
from whisper_triton.pipeline.features import batch_log_mel  # noqa: E402
from whisper_triton.pipeline.tokenizer import WhisperTokenizer  # noqa: E402
from whisper_triton.settings import load_settings  # noqa: E402

VOCAB = 51864  # tiny.en
PADDED = 51872  # TensorRT-LLM pads the vocabulary to a multiple of 8 (vocab_size_padded)


@pytest.fixture(scope="module")
def model_dir():
    return load_settings().resolved_model_dir()


@pytest.fixture(scope="module")
def ours(model_dir) -> RuleTokens:
    suppress = json.loads((model_dir / "config.json").read_text())["suppress_ids"]
    return RuleTokens.from_tokenizer(WhisperTokenizer.from_model_dir(model_dir), VOCAB, suppress)


@pytest.fixture(scope="module")
def theirs():
    return openai_tokenizer.get_tokenizer(multilingual=False)


def _histories(rng, n: int, rows: int, ts: int) -> list[list[int]]:
    out = []
    for _ in range(rows):
        history, last = [], ts + int(rng.integers(0, 30))
        for _ in range(n):
            if rng.random() < 0.4:
                last = min(last + int(rng.integers(-3, 40)), ts + 1500)
                history.append(max(last, ts))
            else:
                history.append(int(rng.integers(0, 50256)))
        out.append(history)
    return out


def _openai(logits: torch.Tensor, histories, prompt, tokenizer, *, timestamps, blank, suppress) -> torch.Tensor:
    tokens = torch.tensor([prompt + h for h in histories], dtype=torch.long)
    out = logits.clone()
    filters = [whisper_decoding.SuppressBlank(tokenizer, len(prompt))] if blank else []
    filters.append(whisper_decoding.SuppressTokens(suppress))
    if timestamps:
        filters.append(whisper_decoding.ApplyTimestampRules(tokenizer, len(prompt), 50))
    for logit_filter in filters:
        logit_filter.apply(out, tokens)
    return out


def _call(processor, logits_rows: torch.Tensor, prompt: list[int], histories, plans) -> torch.Tensor:
    """One executor step over all rows: each row its own request, [1, 1, padded] logits, one call."""
    tensors, client_ids = [], []
    for row, plan in enumerate(plans):
        client = 1000 + row
        processor.register(client, RuleState(plan=plan, prompt_length=len(prompt)))
        padded = torch.full((1, 1, PADDED), 3.0, dtype=logits_rows.dtype)  # padding columns hold junk
        padded[0, 0, :VOCAB] = logits_rows[row]
        tensors.append(padded)
        client_ids.append(client)
    processor(list(range(len(plans))), tensors, [[prompt + h] for h in histories], None, client_ids)
    for client in client_ids:
        processor.forget(client)
    assert all(torch.isneginf(t[0, 0, VOCAB:]).all() for t in tensors)  # padded columns are never tokens
    return torch.stack([t[0, 0, :VOCAB] for t in tensors])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 9])
@pytest.mark.parametrize("timestamps, blank", [(True, True), (False, True), (True, False), (False, False)])
def test_one_batched_call_equals_openai_and_the_numpy_rules(ours, theirs, n, timestamps, blank, dtype):
    rng = np.random.default_rng(1000 * n + 10 * timestamps + blank)
    rows = 12
    prompt = [theirs.sot] if timestamps else [theirs.sot, theirs.no_timestamps]
    histories = _histories(rng, n, rows, theirs.timestamp_begin) if timestamps else [
        [int(t) for t in rng.integers(0, 50256, n)] for _ in range(rows)]
    base = rng.normal(0, 3, (rows, VOCAB)).astype(np.float32)
    base[:, theirs.timestamp_begin:] += rng.uniform(-2, 9, rows).astype(np.float32)[:, None]
    logits = torch.from_numpy(base).to(dtype)
    expected = _openai(logits, histories, prompt, theirs, timestamps=timestamps, blank=blank, suppress=ours.suppress)
    plans = [RequestPlan(timestamps=timestamps, suppress_blank=blank)] * rows
    mine = _call(WhisperRulesProcessor(ours, torch), logits, prompt, histories, plans)
    assert mine.dtype == dtype
    torch.testing.assert_close(mine, expected, rtol=0, atol=0)
    numpy_rules = logits.float().numpy().copy()
    apply_rules(numpy_rules, histories, ours, timestamps=timestamps, blank=blank)
    np.testing.assert_array_equal(np.isneginf(mine.float().numpy()), np.isneginf(numpy_rules))


def test_forced_and_auto_language_rows_in_one_call(ours, theirs):
    """A step mixing a forced row, an auto-language row and a free row: each gets its own rule."""
    rng = np.random.default_rng(4)
    logits = torch.from_numpy(rng.normal(0, 2, (3, VOCAB)).astype(np.float32))
    logits[1, ours.language_ids[5]] = 30.0  # the likeliest language
    logits[1, 11] = 60.0  # a text token above every language: not a language, never chosen
    plans = [RequestPlan(forced=(theirs.no_timestamps,)), RequestPlan(forced=(AUTO_LANGUAGE, theirs.transcribe)),
             RequestPlan()]
    out = _call(WhisperRulesProcessor(ours, torch), logits, [theirs.sot], [[], [], []], plans)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [theirs.no_timestamps]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [ours.language_ids[5]]
    assert torch.isneginf(out[2, list(ours.blank)]).all() and torch.isfinite(out[2]).sum() > 40000


# ---- real logits ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(model_dir) -> StepModel:
    return StepModel.from_ct2_dir(model_dir)


@pytest.fixture(scope="module")
def english_mels(tmp_path_factory) -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required: apt-get install espeak-ng")
    folder = tmp_path_factory.mktemp("gpu-rules-speech")
    audios = spoken_sentences(folder, ["The quick brown fox jumps over the lazy dog.",
                                       "Seven hundred people waited in the rain for the morning train."])
    return [*batch_log_mel(audios, 80), batch_log_mel([np.zeros(16000 * 3, np.float32)], 80)[0]]


def greedy(processor: WhisperRulesProcessor, step_model: StepModel, mel: np.ndarray, sent: list[int],
           plan: RequestPlan, dtype=torch.float32, sample_len: int = 224):
    """The executor's loop for one request: logits, the processor, argmax; then the one read at its end."""
    processor.register(7, RuleState(plan=plan, prompt_length=len(sent)))
    audio = step_model.encode(torch.from_numpy(mel.T.copy()))
    decoder = step_model.incremental(audio)
    generated, ended = [], False
    try:
        for _ in range(sample_len + len(plan.forced)):
            logits = decoder.logits(sent + generated).to(dtype)[None]  # [1, beams=1, vocab]
            processor([1], [logits], [[sent + generated]], None, [7])
            token = int(torch.argmax(logits[0, 0]))
            if token == processor.tokens.eot:
                ended = True
                break
            generated.append(token)
    finally:
        decoder.close()
    forced = generated[: len(plan.forced)]
    tokens = generated[len(plan.forced):]
    return forced, tokens, processor.finish(7, tokens, ended)


@pytest.mark.parametrize("timestamps", [False, True], ids=["notimestamps", "timestamps"])
def test_greedy_decoding_matches_openai_on_real_tiny_en_logits(tiny, english_mels, ours, theirs, timestamps):
    options = whisper_decoding.DecodingOptions(language="en", without_timestamps=not timestamps, fp16=False,
                                               temperature=0.0)
    plan = RequestPlan(forced=() if timestamps else (theirs.no_timestamps,), timestamps=timestamps)
    processor = WhisperRulesProcessor(ours, torch)
    no_speech = []
    for mel in english_mels:
        expected = whisper_decoding.decode(tiny.model, torch.from_numpy(mel), options)
        _, tokens, measured = greedy(processor, tiny, mel, [theirs.sot], plan)
        assert tokens == expected.tokens
        assert measured.sum_logprob is not None and measured.sum_logprob < 0
        assert measured.sum_logprob / (len(tokens) + 1) == pytest.approx(expected.avg_logprob, abs=2e-4)
        assert measured.no_speech_prob == pytest.approx(expected.no_speech_prob, abs=1e-5)
        no_speech.append(measured.no_speech_prob)
    assert no_speech[-1] > max(no_speech[:-1])
    assert processor._free_slots == [0] and not processor._states  # the slot came back each time


@pytest.fixture(scope="module")
def base() -> StepModel:
    return StepModel.from_ct2_dir(whisper_base_dir())


@pytest.fixture(scope="module")
def base_rules() -> RuleTokens:
    directory = whisper_base_dir()
    tokenizer = WhisperTokenizer.from_model_dir(directory, True)
    suppress = json.loads((directory / "config.json").read_text()).get("suppress_ids", [])
    return RuleTokens.from_tokenizer(tokenizer, 51865, suppress)


def test_auto_language_in_one_request_matches_openai_on_real_base_logits(base, base_rules, tmp_path):
    """The language is read at the sot step of the decoding request itself: openai's detect_language
    probabilities, its chosen language, then the same tokens and scores as openai's decode(language=None)."""
    theirs = openai_tokenizer.get_tokenizer(True, num_languages=99, task="transcribe")
    code_of = dict(zip(base_rules.language_ids, base_rules.language_codes))
    their_code = {code_of[t]: c for t, c in zip(theirs.all_language_tokens, theirs.all_language_codes)}
    processor = WhisperRulesProcessor(base_rules, torch)
    plan = RequestPlan(forced=(AUTO_LANGUAGE, theirs.transcribe, theirs.no_timestamps))
    for language in ("de", "es"):
        mel = batch_log_mel([sentence(language, 1, tmp_path)], 80)[0]
        mel_t = torch.from_numpy(mel)
        _, probs = whisper_decoding.detect_language(base.model, mel_t[None], theirs)
        expected = whisper_decoding.decode(base.model, mel_t, whisper_decoding.DecodingOptions(
            task="transcribe", language=None, without_timestamps=True, fp16=False))
        forced, tokens, measured = greedy(processor, base, mel, [theirs.sot], plan)
        chosen = code_of[forced[0]]
        assert their_code[chosen] == expected.language == max(probs[0], key=probs[0].get) == language
        for code, value in measured.language_probs.items():
            assert value == pytest.approx(probs[0][their_code[code]], rel=1e-4, abs=1e-7)
        assert forced[1:] == [theirs.transcribe, theirs.no_timestamps]
        assert tokens == expected.tokens
        assert measured.sum_logprob / (len(tokens) + 1) == pytest.approx(expected.avg_logprob, abs=2e-4)
        assert measured.no_speech_prob == pytest.approx(expected.no_speech_prob, abs=1e-5)
