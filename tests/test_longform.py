"""The long-form pipeline in-process on the CPU engine: VAD, windows, timestamps, fallback, options."""

import dataclasses

import numpy as np
import pytest

from whisper_triton.pipeline.decoding import QualityThresholds, compression_ratio, needs_fallback, split_on_timestamps
from whisper_triton.errors import WhisperTritonError
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.pipeline.longform import LongFormTranscriber, TranscribeOptions
from whisper_triton.pipeline.segmenter import fixed_windows, windows_from_speech
from whisper_triton.pipeline.windows import EngineWindowDecoder
from whisper_triton.pipeline.vad import Span, speech_spans


@pytest.fixture(scope="module")
def pipeline(ct2_engine, tokenizer):
    return LongFormTranscriber(EngineWindowDecoder(ct2_engine, tokenizer), tokenizer)


@pytest.fixture(scope="module")
def long_result(pipeline, long_speech):
    return pipeline.transcribe(long_speech.samples, TranscribeOptions())


def test_long_file_wer_and_timeline(long_result, long_speech):
    assert long_speech.duration >= 180
    assert word_error_rate(long_speech.text, long_result.text) <= 0.10
    segments = long_result.segments
    assert len(segments) >= 30
    for previous, segment in zip(segments, segments[1:]):
        assert segment.start >= previous.start and segment.start >= previous.end - 0.01
    assert all(0 <= s.start <= s.end <= long_speech.duration + 0.01 for s in segments)
    assert long_result.duration == pytest.approx(long_speech.duration, abs=0.01)


def test_every_pause_is_a_segment_boundary(long_result, long_speech):
    ends = np.array([s.end for s in long_result.segments])
    starts = np.array([s.start for s in long_result.segments])
    for pause_start, pause_end in long_speech.pauses:
        # the sentence before the pause ends near its start, the one after begins near its end
        assert np.abs(ends - pause_start).min() <= 0.5, (pause_start, pause_end)
        assert np.abs(starts - pause_end).min() <= 0.5, (pause_start, pause_end)


def test_vad_spans_follow_the_pauses(long_speech):
    spans = speech_spans(long_speech.samples)
    gaps = [(a.end / 16000, b.start / 16000) for a, b in zip(spans, spans[1:])]
    for pause_start, pause_end in long_speech.pauses:
        # spans are padded: 0.1 s after speech, 0.4 s before it
        assert any(g0 - 0.25 <= pause_start and pause_end <= g1 + 0.45 for g0, g1 in gaps), (pause_start, pause_end)


def test_without_vad_fixed_windows(pipeline, long_speech):
    result = pipeline.transcribe(long_speech.samples, TranscribeOptions(vad=False, chunk_length=30))
    assert word_error_rate(long_speech.text, result.text) <= 0.2
    assert result.segments[-1].end <= long_speech.duration + 0.01


def test_word_timestamps_lie_inside_their_segments(pipeline, speech_clips):
    audio = np.concatenate([speech_clips[0].samples, np.zeros(16000, np.float32), speech_clips[1].samples])
    result = pipeline.transcribe(audio, TranscribeOptions(word_timestamps=True))
    words = [w for s in result.segments for w in s.words]
    assert len(words) >= 15
    for segment in result.segments:
        for word in segment.words:
            assert segment.start - 0.01 <= word.start <= word.end <= segment.end + 0.01
            assert 0.0 <= word.probability <= 1.0
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert "".join(w.word for w in words).strip() == result.text


def test_silence_returns_nothing_without_decoding(pipeline, ct2_engine, monkeypatch):
    calls = []
    monkeypatch.setattr(ct2_engine, "generate", lambda *a, **k: calls.append(a) or [])
    result = pipeline.transcribe(np.zeros(16000 * 60, dtype=np.float32))
    assert result.text == "" and result.segments == [] and calls == []


def test_noise_gives_empty_or_near_empty_text(pipeline):
    noise = (np.random.default_rng(3).standard_normal(16000 * 40) * 0.05).astype(np.float32)
    for options in (TranscribeOptions(), TranscribeOptions(vad=False)):
        assert len(pipeline.transcribe(noise, options).text.split()) <= 3


def test_max_new_tokens_and_temperature_fallback_are_applied(pipeline, speech_clips):
    result = pipeline.transcribe(speech_clips[0].samples, TranscribeOptions(max_new_tokens=4, without_timestamps=True))
    assert 1 <= len(result.segments[0].tokens) <= 4
    strict = TranscribeOptions(log_prob_threshold=0.0, temperature=[0.0, 0.5])  # every decode "fails"
    result = pipeline.transcribe(speech_clips[0].samples, strict)
    assert all(s.temperature in (0.0, 0.5) for s in result.segments)


def test_english_only_model_refuses_other_languages_and_translate(pipeline):
    for options, param in ((TranscribeOptions(language="de"), "language"), (TranscribeOptions(task="translate"), "task")):
        with pytest.raises(WhisperTritonError) as info:
            pipeline.check(options)
        assert info.value.param == param


def test_engine_without_alignment_refuses_word_timestamps(tokenizer, ct2_engine):
    decoder = EngineWindowDecoder(ct2_engine, tokenizer)
    decoder.capabilities = dataclasses.replace(decoder.capabilities, word_timestamps=False)
    pipeline = LongFormTranscriber(decoder, tokenizer)
    with pytest.raises(WhisperTritonError) as info:
        pipeline.check(TranscribeOptions(word_timestamps=True))
    assert info.value.param == "word_timestamps" and info.value.status == 422


def test_timestamp_token_parsing(tokenizer):
    ts = tokenizer.timestamp_begin
    hello, world = tokenizer.encode(" Hello"), tokenizer.encode(" world")
    pieces = split_on_timestamps([ts + 0] + hello + [ts + 50, ts + 60] + world + [ts + 100, tokenizer.eot],
                                 ts, tokenizer.eot, 30.0)
    assert [(p.start, p.end) for p in pieces] == [(0.0, 1.0), (1.2, 2.0)]
    assert split_on_timestamps(hello, ts, tokenizer.eot, 7.5)[0].end == 7.5  # no timestamps: the whole window


def test_quality_measures():
    assert compression_ratio("the same words " * 40) > 2.4 > compression_ratio("A short varied sentence here.")
    thresholds = QualityThresholds()
    assert needs_fallback("fine text", -2.0, thresholds) and not needs_fallback("fine text", -0.2, thresholds)


def test_segmenter_packs_speech_and_maps_time_back():
    second = 16000
    spans = [Span(0, 10 * second), Span(12 * second, 25 * second), Span(26 * second, 40 * second),
             Span(41 * second, 120 * second)]
    windows = windows_from_speech(spans, 30)
    assert all(w.samples <= 30 * second for w in windows)
    assert windows[0].pieces == (Span(0, 10 * second), Span(12 * second, 25 * second))  # 23 s of speech
    assert sum(w.samples for w in windows) == sum(s.end - s.start for s in spans)
    assert windows[-1].end == 120 * second
    first = windows[0]
    assert first.file_time(5.0) == 5.0 and first.file_time(11.0) == 13.0
    assert first.file_time(10.0, "end") == 10.0 and first.file_time(10.0, "start") == 12.0
    # coarse timestamps near the junction snap to the speech, not into the left-out pause
    assert first.file_time(10.2, "end") == 10.0 and first.file_time(9.8, "start") == 12.0
    assert first.file_time(10.2, "start") == pytest.approx(12.2)
    audio = np.arange(40 * second, dtype=np.float32)
    assert np.array_equal(first.extract(audio), np.concatenate([audio[: 10 * second], audio[12 * second : 25 * second]]))
    assert len(fixed_windows(61 * second, 30)) == 3


class EarlyStoppingDecoder(EngineWindowDecoder):
    """The real decoder, except that a window's first decode keeps only its first segment, as Whisper
    sometimes closes a window early and drops the sentences after it."""

    def __init__(self, engine, tokenizer):
        super().__init__(engine, tokenizer)
        self.calls = 0

    def decode(self, audios, prompts, options, word_timestamps=False, features=None, scope=None):
        outputs = super().decode(audios, prompts, options, word_timestamps, features, scope)
        self.calls += 1
        if self.calls == 1:
            begin = self.tokenizer.timestamp_begin
            for output in outputs:
                tokens = output.hypothesis.tokens
                stamps = [i for i, t in enumerate(tokens) if t >= begin]
                if len(stamps) >= 2:  # keep <|t0|> text <|t1|>: the first segment only
                    output.hypothesis.tokens = tokens[: stamps[1] + 1]
        return outputs


def test_the_rest_of_a_window_is_decoded_when_whisper_stops_early(ct2_engine, tokenizer, speech_clips):
    pause = np.zeros(12000, np.float32)
    audio = np.concatenate([part for clip in speech_clips[:4] for part in (clip.samples, pause)])
    decoder = EarlyStoppingDecoder(ct2_engine, tokenizer)
    result = LongFormTranscriber(decoder, tokenizer).transcribe(audio, TranscribeOptions(temperature=[0.0]))
    assert decoder.calls >= 2
    assert word_error_rate(" ".join(c.text for c in speech_clips[:4]), result.text) <= 0.15
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and len(result.segments) >= 4


def test_window_after_a_point():
    second = 16000
    window = windows_from_speech([Span(0, 5 * second), Span(7 * second, 12 * second)], 30)[0]
    rest = window.after(6.0)
    assert rest.pieces == (Span(8 * second, 12 * second),)
    assert window.after(2.5).pieces == (Span(int(2.5 * second), 5 * second), Span(7 * second, 12 * second))
    assert window.after(10.0) is None
