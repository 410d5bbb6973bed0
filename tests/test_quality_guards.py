"""Output guards on the real decoder (tiny.en, CTranslate2, in-process): which decode of a window the
temperature fallback keeps when every temperature fails, the loop cut, and the prompt limit."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from whisper_triton.pipeline.decoding import DecodeAttempt, QualityThresholds, compression_ratio, select_attempt
from whisper_triton.engines.base import MAX_NEW_TOKENS
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.pipeline.longform import LongFormTranscriber, TranscribeOptions
from whisper_triton.pipeline.tokenizer import MAX_PROMPT_TOKENS, PromptSpec
from whisper_triton.pipeline.windows import EngineWindowDecoder

LOOP_TEXT = " la la" * 60  # two syllables over and over: what Whisper produces when it loops
LOOP_LOGPROB = -0.05  # loops are decoded with high confidence: the trap of "most confident wins"


class LoopingDecoder(EngineWindowDecoder):
    """The real in-process decoder with a fault injected: at the temperatures in `loop_at` each
    window's decode is replaced by a real loop of tokens (timestamped as the model writes them),
    scored more confident than any real decode. Every other decode is the engine's own."""

    def __init__(self, engine, tokenizer, loop_at: set[float]):
        super().__init__(engine, tokenizer)
        self.loop_at = loop_at
        self.temperatures: list[float] = []

    def loop_tokens(self) -> list[int]:
        begin = self.tokenizer.timestamp_begin
        return [begin] + self.tokenizer.encode(LOOP_TEXT) + [begin + 150, self.tokenizer.eot]

    def decode(self, audios, prompts, options, word_timestamps=False, features=None, scope=None):
        self.temperatures.append(options.temperature)
        outputs = super().decode(audios, prompts, options, word_timestamps, features, scope)
        if options.temperature in self.loop_at:
            for output in outputs:
                output.hypothesis = replace(output.hypothesis, tokens=self.loop_tokens(), avg_logprob=LOOP_LOGPROB)
        return outputs


# every real decode "fails" (avg_logprob is always below 0): no temperature passes
EVERY_TEMPERATURE_FAILS = dict(log_prob_threshold=0.0, temperature=[0.0, 0.4, 0.8])


def test_loop_is_a_real_loop(tokenizer):
    assert compression_ratio(LOOP_TEXT.strip()) > 2.4 * 3
    assert tokenizer.decode(tokenizer.encode(LOOP_TEXT)) == LOOP_TEXT


def test_every_temperature_fails_the_loop_is_not_kept(ct2_engine, tokenizer, speech_clips):
    """A loop at t=0 (most confident of all), real decodes at 0.4 and 0.8, all failing: the kept
    decode is the most confident one within the compression-ratio threshold (faster-whisper's rule),
    not the loop. The previous rule (most confident of all failures) returned the loop."""
    clip = speech_clips[0]
    decoder = LoopingDecoder(ct2_engine, tokenizer, loop_at={0.0})
    result = LongFormTranscriber(decoder, tokenizer).transcribe(clip.samples, TranscribeOptions(**EVERY_TEMPERATURE_FAILS))
    assert decoder.temperatures == [0.0, 0.4, 0.8]  # every temperature was tried
    assert "la la" not in result.text
    assert word_error_rate(clip.text, result.text) <= 0.3, result.text
    assert result.segments and all(s.temperature in (0.4, 0.8) for s in result.segments)
    assert all(s.compression_ratio <= 2.4 for s in result.segments)


def test_window_whose_every_decode_is_a_loop_keeps_no_text(ct2_engine, tokenizer, speech_clips, caplog):
    decoder = LoopingDecoder(ct2_engine, tokenizer, loop_at={0.0, 0.4, 0.8})
    with caplog.at_level(logging.WARNING, logger="whisper_triton.pipeline.longform"):
        result = LongFormTranscriber(decoder, tokenizer).transcribe(
            speech_clips[1].samples, TranscribeOptions(**EVERY_TEMPERATURE_FAILS))
    assert decoder.temperatures == [0.0, 0.4, 0.8]
    assert result.text == "" and result.segments == []
    assert [x.reason for x in result.info.left_out] == ["loop"]
    assert any("every decode was a loop" in record.getMessage() for record in caplog.records)


def test_a_passing_decode_is_kept_even_after_a_loop(ct2_engine, tokenizer, speech_clips):
    """Default thresholds: the loop at t=0 fails on compression ratio, the real decode at 0.4 passes."""
    clip = speech_clips[2]
    decoder = LoopingDecoder(ct2_engine, tokenizer, loop_at={0.0})
    result = LongFormTranscriber(decoder, tokenizer).transcribe(clip.samples, TranscribeOptions(temperature=[0.0, 0.4]))
    assert word_error_rate(clip.text, result.text) <= 0.3, result.text
    assert {s.temperature for s in result.segments} == {0.4}


@pytest.mark.parametrize("attempts, expected", [
    # the first passing decode wins
    ([("fine words here", -0.3, 0.0), ("other words", -0.1, 0.0)], 0),
    # all fail on log-prob: most confident
    ([("some words", -1.5, 0.0), ("other words", -1.2, 0.0)], 1),
    # a confident loop among failures loses to a non-loop
    ([(LOOP_TEXT, -0.05, 0.0), ("other words", -1.4, 0.0), ("more words", -1.3, 0.0)], 2),
    # silence (no-speech prob over 0.6 and log-prob under -1) never fails: it is kept (and left out later)
    ([("thank you", -1.5, 0.9), ("other words", -0.2, 0.0)], 0),
    # every decode a loop: nothing is kept
    ([(LOOP_TEXT, -0.05, 0.0), (" yes" * 80, -0.5, 0.0)], None),
    # no scores from the engine: a loop still loses to text
    ([(LOOP_TEXT, None, None), ("words", None, None)], 1),
])
def test_selection_rule(attempts, expected):
    decoded = [DecodeAttempt(text, logprob, no_speech, t) for t, (text, logprob, no_speech) in enumerate(attempts)]
    assert select_attempt(decoded, QualityThresholds()) == expected


def test_without_a_compression_threshold_the_most_confident_failure_is_kept():
    decoded = [DecodeAttempt(LOOP_TEXT, -0.05, 0.0), DecodeAttempt("words", -1.5, 0.0)]
    assert select_attempt(decoded, QualityThresholds(compression_ratio=None, log_prob=-1.0)) == 0


# ---- prompt limit ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multilingual_layout_tokenizer(tmp_path_factory, model_dir):
    from multilingual import multilingual_tokenizer_json
    from whisper_triton.pipeline.tokenizer import WhisperTokenizer

    folder = tmp_path_factory.mktemp("ml-tokenizer")
    multilingual_tokenizer_json(model_dir / "tokenizer.json", folder)
    return WhisperTokenizer.from_model_dir(folder)


@pytest.mark.parametrize("vocabulary", ["english", "multilingual"])
def test_long_prompt_keeps_its_last_223_tokens(vocabulary, tokenizer, multilingual_layout_tokenizer):
    tok = tokenizer if vocabulary == "english" else multilingual_layout_tokenizer
    words = " ".join(f"word{i}" for i in range(2000))  # thousands of tokens
    for timestamps in (True, False):
        spec = PromptSpec(language="en", timestamps=timestamps, previous_text=words)
        prompt = tok.prompt_ids(spec)
        sot_at = prompt.index(tok.sot)
        previous = prompt[1:sot_at]
        assert prompt[0] == tok.sot_prev and len(previous) == MAX_PROMPT_TOKENS == 223
        assert previous == tok.encode(" " + words)[-MAX_PROMPT_TOKENS:]  # the END of the prompt is kept
        assert tok.decode(previous).endswith("word1999")
        # the longest prompt (sot_prev + 223 + at most 4 task tokens) leaves 220 of the 448 positions
        # for new tokens (a 30 s window of fast speech is ~150); the engines cap max_new_tokens there
        assert len(prompt) <= 1 + MAX_PROMPT_TOKENS + 4 and MAX_NEW_TOKENS - len(prompt) >= 220
    short = tok.prompt_ids(PromptSpec(previous_text="a short prompt"))
    assert short[1:short.index(tok.sot)] == tok.encode(" a short prompt")


def test_huge_initial_prompt_transcribes_the_speech(ct2_engine, tokenizer, speech_clips):
    """A prompt of thousands of tokens is cut to its last 223: the engine decodes the speech, and the
    new tokens fit next to the prompt in the decoder's 448 positions."""
    clip = speech_clips[3]
    decoder = LoopingDecoder(ct2_engine, tokenizer, loop_at=set())
    prompts = []
    original = decoder.decode

    def recording(audios, prompt_ids, options, word_timestamps=False, features=None, scope=None):
        prompts.extend(prompt_ids)
        return original(audios, prompt_ids, options, word_timestamps, features, scope)

    decoder.decode = recording
    huge = "The meeting notes say many things about the weather. " * 150  # under the request model's 8,192 characters
    result = LongFormTranscriber(decoder, tokenizer).transcribe(clip.samples, TranscribeOptions(initial_prompt=huge))
    assert word_error_rate(clip.text, result.text) <= 0.3, result.text
    assert prompts and all(p.index(tokenizer.sot) - 1 == MAX_PROMPT_TOKENS for p in prompts)
    assert all(len(s.tokens) >= 3 for s in result.segments)
    assert np.isfinite([s.avg_logprob for s in result.segments]).all()


def test_tensorrtllm_request_keeps_the_newest_prompt_tokens_and_caps_new_tokens(multilingual_layout_tokenizer):
    """The TensorRT-LLM engine fits the same prompt into its build's max_prompt_len (oldest previous
    tokens dropped first) and asks for no more new tokens than the 448 positions leave."""
    from whisper_triton.engines.base import DecodeOptions
    from whisper_triton.engines.tensorrtllm.requests import EngineLimits, PromptTokens, build_window_request

    tok = multilingual_layout_tokenizer
    prompt = tok.prompt_ids(PromptSpec(language="de", previous_text=" ".join(f"w{i}" for i in range(1000))))
    tokens = PromptTokens(tok.sot, tok.sot_prev, tok.eot, tok.no_timestamps, tok.transcribe, tok.translate,
                          frozenset(tok.language_ids.values()), True)
    window = np.zeros((80, 3000), np.float32)
    for max_prompt_len in (len(prompt) - 3, 32):  # the start sequence after <|startoftranscript|> is forced
        limits = EngineLimits(max_batch_size=1, max_beam_width=1, max_input_frames=3000,
                              max_prompt_len=max_prompt_len, max_seq_len=448, n_mels=80)
        request = build_window_request(window, prompt, DecodeOptions(max_new_tokens=MAX_NEW_TOKENS), tokens=tokens,
                                       limits=limits)
        sent = request.sent
        assert len(sent) == max_prompt_len and sent[0] == tok.sot_prev and sent[-1] == tok.sot
        assert request.plan.forced == tuple(prompt[-3:]) and sent[1:-1] == prompt[1:-4][-(max_prompt_len - 2):]
        assert request.max_new_tokens == 448 - max_prompt_len


def test_repetitive_speech_at_a_speaking_rate_is_not_a_loop():
    """Telephony prompts repeat themselves ("... seguido por la tecla de numero" in every sentence) and
    compress past 2.4; at the rate a voice speaks they are speech, not a loop (a loop writes far more
    text than its window holds). Flagged as a loop, such a window was decoded again at higher
    temperatures and sampled garbage replaced right text (bench/real_speech.py, Spanish prompts)."""
    from whisper_triton.pipeline.decoding import DecodeAttempt, attempt_failed, compression_ratio, is_loop

    prompts = ("Por favor ingrese su numero de agente seguido por la tecla de numero. Contrasena incorrecta. "
               "Por favor ingrese su contrasena seguido por la tecla de numero. Opcion invalida. ") * 3
    assert compression_ratio(prompts.strip()) > 2.4
    thresholds = TranscribeOptions().thresholds
    spoken = DecodeAttempt(prompts, avg_logprob=-0.3, no_speech_prob=0.0, duration=28.0)  # ~14 characters a second
    looped = DecodeAttempt(prompts, avg_logprob=-0.3, no_speech_prob=0.0, duration=6.0)  # ~70 a second
    assert not is_loop(spoken, thresholds) and not attempt_failed(spoken, thresholds)
    assert is_loop(looped, thresholds) and attempt_failed(looped, thresholds)
    assert is_loop(DecodeAttempt(prompts, -0.3, 0.0), thresholds)  # no duration known: the ratio alone
