"""`LongFormTranscriber.transcribe_iter` in-process on the CPU engine: chunks of windows decoded as
batches, segments in timeline order with ids continuing, chunk sizes growing to batch_size, the same
text as `transcribe`, and the `cancelled` hook stopping the decoding between chunks."""

import pytest

from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.pipeline.longform import MAX_FOLLOW_UPS, LongFormTranscriber, TranscribeOptions
from whisper_triton.pipeline.windows import EngineWindowDecoder


class CountingDecoder(EngineWindowDecoder):
    """The real decoder, remembering how many windows each call decoded."""

    def __init__(self, engine, tokenizer):
        super().__init__(engine, tokenizer)
        self.calls: list[int] = []

    def decode(self, audios, prompts, options, word_timestamps=False, **kwargs):
        self.calls.append(len(audios))
        return super().decode(audios, prompts, options, word_timestamps, **kwargs)


@pytest.fixture
def decoder(ct2_engine, tokenizer):
    return CountingDecoder(ct2_engine, tokenizer)


def test_chunks_in_order_match_transcribe(decoder, tokenizer, long_speech):
    pipeline = LongFormTranscriber(decoder, tokenizer)
    options = TranscribeOptions(batch_size=2, temperature=[0.0])
    chunks = list(pipeline.transcribe_iter(long_speech.samples, options))
    windows = len(pipeline.windows(long_speech.samples, options))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    segments = [s for c in chunks for s in c.segments]
    assert [s.id for s in segments] == list(range(len(segments)))
    assert [s.start for s in segments] == sorted(s.start for s in segments)
    # the first chunk is one window; chunks grow to batch_size (follow-up decodes add smaller calls)
    assert windows >= 4 and decoder.calls[0] == 1 and max(decoder.calls) == 2
    assert sum(decoder.calls) >= windows
    text = "".join(s.text for s in segments).strip()
    whole = pipeline.transcribe(long_speech.samples, options).text
    assert word_error_rate(whole, text) < 0.05 and word_error_rate(long_speech.text, text) < 0.25
    assert chunks[0].duration == pytest.approx(long_speech.duration, abs=0.01) and chunks[0].language == "en"


def test_cancelled_stops_between_chunks(decoder, tokenizer, long_speech):
    pipeline = LongFormTranscriber(decoder, tokenizer)
    given = []
    for chunk in pipeline.transcribe_iter(long_speech.samples, TranscribeOptions(temperature=[0.0]),
                                          cancelled=lambda: len(given) >= 1):
        given.append(chunk)
    # only the first chunk's window was decoded: once, plus the follow-ups of its own rest
    assert len(given) == 1 and not given[0].done
    assert decoder.calls and set(decoder.calls) == {1} and len(decoder.calls) <= 1 + MAX_FOLLOW_UPS


def test_silence_is_one_empty_final_chunk(decoder, tokenizer):
    import numpy as np

    chunks = list(LongFormTranscriber(decoder, tokenizer).transcribe_iter(np.zeros(16000 * 5, dtype=np.float32)))
    assert len(chunks) == 1 and chunks[0].done and chunks[0].segments == [] and decoder.calls == []
