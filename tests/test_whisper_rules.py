"""Whisper's decoding rules (engines/whisper_rules.py) held against openai-whisper's own classes.

openai-whisper (20250625, in the design card as the reference oracle) runs here on CPU:
- crafted logits: its SuppressBlank / SuppressTokens / ApplyTimestampRules on the same arrays and
  histories, its detect_language on a stub model that returns the crafted logits;
- real logits: openai's `whisper.decoding.decode` with the tiny.en weights (converted exactly from the
  bundled CTranslate2 model) against a greedy loop over the same model's logits with our rules, on
  real speech: the same tokens, sum_logprob, avg_logprob and no_speech_prob.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
whisper_decoding = pytest.importorskip("whisper.decoding")
import whisper.tokenizer as openai_tokenizer  # noqa: E402

from multilingual import multilingual_tokenizer_json  # noqa: E402
from trtllm_standin import StepModel  # noqa: E402
from whisper_triton.pipeline.audio import decode_audio  # noqa: E402
from whisper_triton.engines.whisper_rules import (  # noqa: E402
    RequestPlan,
    RequestState,
    RuleTokens,
    apply_rules,
    language_probabilities,
    no_speech_probability,
    split_prompt,
)
from whisper_triton.pipeline.features import batch_log_mel  # noqa: E402
from whisper_triton.settings import load_settings  # noqa: E402
from whisper_triton.pipeline.tokenizer import WhisperTokenizer  # noqa: E402

VOCAB = 51864  # tiny.en


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return load_settings().resolved_model_dir()


@pytest.fixture(scope="module")
def ours(model_dir) -> RuleTokens:
    suppress = json.loads((model_dir / "config.json").read_text())["suppress_ids"]
    return RuleTokens.from_tokenizer(WhisperTokenizer.from_model_dir(model_dir), VOCAB, suppress)


@pytest.fixture(scope="module")
def theirs():
    return openai_tokenizer.get_tokenizer(multilingual=False)


def test_token_ids_and_suppress_list_match_openai(ours, theirs):
    assert (ours.eot, ours.sot, ours.no_timestamps, ours.timestamp_begin, ours.no_speech) == (
        theirs.eot, theirs.sot, theirs.no_timestamps, theirs.timestamp_begin, theirs.no_speech)
    assert list(ours.blank) == theirs.encode(" ") + [theirs.eot]
    # DecodingTask._get_suppress_tokens with the default suppress_tokens="-1"
    expected = set(theirs.non_speech_tokens) | {theirs.transcribe, theirs.translate, theirs.sot, theirs.sot_prev,
                                                theirs.sot_lm, theirs.no_speech}
    assert set(ours.suppress) == expected


def _histories(rng, n: int, rows: int, ts: int) -> list[list[int]]:
    """Token histories of length n mixing text and (mostly increasing) timestamps, as decoding makes them."""
    out = []
    for _ in range(rows):
        history, last_ts = [], ts + int(rng.integers(0, 30))
        for _ in range(n):
            if rng.random() < 0.4:
                last_ts = min(last_ts + int(rng.integers(-3, 40)), ts + 1500)
                history.append(max(last_ts, ts))
            else:
                history.append(int(rng.integers(0, 50256)))
        out.append(history)
    return out


def _crafted_logits(rng, rows: int, ts: int) -> np.ndarray:
    logits = rng.normal(0, 3, (rows, VOCAB)).astype(np.float32)
    boost = rng.uniform(-2, 9, rows).astype(np.float32)  # some rows make the timestamps' summed mass win
    logits[:, ts:] += boost[:, None]
    return logits


def _openai_filters(logits: np.ndarray, histories, prompt: list[int], tokenizer, *, timestamps: bool, blank: bool,
                    suppress) -> np.ndarray:
    tokens = torch.tensor([prompt + h for h in histories], dtype=torch.long)
    tensor = torch.from_numpy(logits.copy())
    filters = []
    if blank:
        filters.append(whisper_decoding.SuppressBlank(tokenizer, len(prompt)))
    filters.append(whisper_decoding.SuppressTokens(suppress))
    if timestamps:
        filters.append(whisper_decoding.ApplyTimestampRules(tokenizer, len(prompt), 50))
    for logit_filter in filters:
        logit_filter.apply(tensor, tokens)
    return tensor.numpy()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 9])
@pytest.mark.parametrize("timestamps, blank", [(True, True), (False, True), (True, False), (False, False)])
def test_filters_match_openai_on_crafted_logits(ours, theirs, n, timestamps, blank):
    rng = np.random.default_rng(1000 * n + 10 * timestamps + blank)
    rows = 24
    prompt = [theirs.sot] if timestamps else [theirs.sot, theirs.no_timestamps]
    histories = _histories(rng, n, rows, theirs.timestamp_begin) if timestamps else [
        [int(t) for t in rng.integers(0, 50256, n)] for _ in range(rows)]
    logits = _crafted_logits(rng, rows, theirs.timestamp_begin)
    expected = _openai_filters(logits, histories, prompt, theirs, timestamps=timestamps, blank=blank,
                               suppress=ours.suppress)
    mine = logits.copy()
    apply_rules(mine, histories, ours, timestamps=timestamps, blank=blank)
    np.testing.assert_array_equal(np.isneginf(mine), np.isneginf(expected))
    np.testing.assert_array_equal(mine, expected)
    if timestamps and n == 0:
        # the first step: a timestamp no later than 1.0 s, nothing else
        allowed = np.flatnonzero(np.isfinite(mine[0]))
        assert allowed.min() >= theirs.timestamp_begin and allowed.max() <= theirs.timestamp_begin + 50


def test_timestamp_mass_rule_fires_both_ways(ours, theirs):
    """Rows where the summed timestamp probability wins lose every text token; the others keep them."""
    rng = np.random.default_rng(7)
    histories = [[400, 500]] * 2  # text so far: timestamps are allowed
    logits = rng.normal(0, 1, (2, VOCAB)).astype(np.float32)
    logits[0, theirs.timestamp_begin:] += 6.0
    logits[1, theirs.timestamp_begin:] -= 6.0
    apply_rules(logits, histories, ours, timestamps=True, blank=True)
    assert np.isneginf(logits[0, : theirs.timestamp_begin]).all()
    assert np.isfinite(logits[1, : theirs.eot]).sum() > 40000


def test_language_probabilities_match_openai_detect_language(tmp_path, model_dir):
    path = multilingual_tokenizer_json(model_dir / "tokenizer.json", tmp_path / "ml")
    tokenizer = WhisperTokenizer.from_model_dir(path.parent, True)
    rules = RuleTokens.from_tokenizer(tokenizer, 51866)
    theirs = openai_tokenizer.get_tokenizer(True, num_languages=100, language="en")
    # the same tokens (this vocabulary spells Hebrew <|iw|> where openai's code is "he")
    assert sorted(rules.language_ids) == sorted(theirs.all_language_tokens)
    code_by_id = dict(zip(rules.language_ids, rules.language_codes))
    their_code = {code_by_id[i]: c for i, c in zip(theirs.all_language_tokens, theirs.all_language_codes)}
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (3, 51866)).astype(np.float32)
    logits[:, 11] = 40.0  # a text token far above every language: ignored, as openai masks non-language tokens

    class Stub:  # what detect_language uses of a Whisper model
        class dims:
            n_audio_ctx, n_audio_state = 1500, 8

        def logits(self, tokens, audio):
            assert tokens.tolist() == [[theirs.sot]] * 3
            return torch.from_numpy(logits.copy())[:, None, :]

    _, expected = whisper_decoding.detect_language(Stub(), torch.zeros(3, 1500, 8), theirs)
    for row, probabilities in zip(logits, expected):
        mine = language_probabilities(row, rules)
        assert {their_code[code] for code in mine} == set(probabilities)
        for code, value in mine.items():
            assert value == pytest.approx(probabilities[their_code[code]], rel=1e-5, abs=1e-9)
        assert list(mine.values()) == sorted(mine.values(), reverse=True)


def test_no_speech_probability_is_a_softmax_over_the_vocabulary(ours):
    logits = np.random.default_rng(5).normal(0, 2, VOCAB).astype(np.float32)
    expected = torch.softmax(torch.from_numpy(logits), dim=-1)[ours.no_speech].item()
    assert no_speech_probability(logits, ours) == pytest.approx(expected, rel=1e-5)


def test_split_prompt():
    assert split_prompt([50360, 7, 8, 50257, 50362], 50257) == ([50360, 7, 8, 50257], (50362,))
    assert split_prompt([50257], 50257) == ([50257], ())


def test_forced_steps_cost_nothing_and_rules_start_after_them(ours, theirs):
    state = RequestState(plan=RequestPlan(forced=(theirs.no_timestamps,), timestamps=False), tokens=ours)
    logits = np.random.default_rng(2).normal(0, 2, (1, VOCAB)).astype(np.float32)
    first = logits.copy()
    state.step(first, [[]])
    assert np.flatnonzero(np.isfinite(first[0])).tolist() == [theirs.no_timestamps]
    assert state.no_speech_prob == pytest.approx(no_speech_probability(logits[0], ours))
    second = logits.copy()
    state.step(second, [[theirs.no_timestamps]])
    assert np.isneginf(second[0, list(ours.blank)]).all()  # suppress_blank at the first sampled step
    assert state.steps == 2


# ---- real logits: openai-whisper's DecodingTask against the rules on the same model --------------
@pytest.fixture(scope="module")
def step_model(model_dir) -> StepModel:
    return StepModel.from_ct2_dir(model_dir)


@pytest.fixture(scope="module")
def mels(tmp_path_factory) -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required: apt-get install espeak-ng")
    folder = tmp_path_factory.mktemp("rules-speech")
    out = []
    for index, text in enumerate(["The quick brown fox jumps over the lazy dog.",
                                  "Seven hundred people waited in the rain for the morning train."]):
        path = folder / f"{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, timeout=60)
        out.append(batch_log_mel([decode_audio(path.read_bytes())], 80)[0])
    silence = np.zeros(16000 * 3, dtype=np.float32)
    out.append(batch_log_mel([silence], 80)[0])
    return out


def _greedy_with_rules(step_model: StepModel, mel: np.ndarray, prompt: list[int], rules: RuleTokens,
                       plan_timestamps: bool, sample_len: int = 224):
    sent, forced = split_prompt(prompt, rules.sot)
    state = RequestState(plan=RequestPlan(forced=forced, timestamps=plan_timestamps), tokens=rules)
    audio = step_model.encode(torch.from_numpy(mel.T.copy()))
    generated: list[int] = []
    ended = False
    decoder = step_model.incremental(audio)
    for _ in range(sample_len + len(forced)):
        logits = decoder.logits(sent + generated).numpy().astype(np.float32)
        state.step(logits, [generated])
        token = int(np.argmax(logits[0]))
        if token == rules.eot:
            ended = True
            break
        generated.append(token)
    decoder.close()
    assert tuple(generated[: len(forced)]) == forced
    tokens = generated[len(forced):][:sample_len]
    return tokens, state.sum_logprob(tokens, ended), state.no_speech_prob


@pytest.mark.parametrize("timestamps", [False, True], ids=["notimestamps", "timestamps"])
def test_greedy_decoding_matches_openai_on_real_logits(step_model, mels, ours, theirs, timestamps):
    options = whisper_decoding.DecodingOptions(language="en", without_timestamps=not timestamps, fp16=False,
                                               temperature=0.0)
    prompt = list(theirs.sot_sequence) + ([] if timestamps else [theirs.no_timestamps])
    no_speech = []
    for mel in mels:
        expected = whisper_decoding.decode(step_model.model, torch.from_numpy(mel), options)
        tokens, sum_logprob, no_speech_prob = _greedy_with_rules(step_model, mel, prompt, ours, timestamps)
        assert tokens == expected.tokens
        assert sum_logprob is not None and sum_logprob < 0
        assert sum_logprob / (len(tokens) + 1) == pytest.approx(expected.avg_logprob, abs=2e-4)
        assert no_speech_prob == pytest.approx(expected.no_speech_prob, abs=1e-5)
        no_speech.append(no_speech_prob)
        if timestamps and tokens:
            stamps = [t for t in tokens if t >= theirs.timestamp_begin]
            assert stamps and stamps == sorted(stamps) and tokens[0] >= theirs.timestamp_begin
    assert no_speech[-1] > max(no_speech[:-1])  # the silent window is the one most likely without speech
