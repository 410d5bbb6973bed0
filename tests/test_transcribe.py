import numpy as np
import pytest

from whisper_triton.engines import DecodeOptions
from whisper_triton.errors import PayloadTooLargeError
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.pipeline.tokenizer import PromptSpec
from whisper_triton.pipeline.windows import ShortFormTranscriber, ShortRequest


@pytest.fixture(scope="module")
def transcriber(ct2_engine, tokenizer):
    return ShortFormTranscriber(ct2_engine, tokenizer)


def test_real_speech_transcribes_within_wer_target(transcriber, speech_clips):
    results = transcriber.transcribe([ShortRequest(clip.samples) for clip in speech_clips])
    for clip, result in zip(speech_clips, results):
        assert word_error_rate(clip.text, result.text) <= 0.15, (clip.text, result.text)
        assert result.language == "en"
        assert result.duration == pytest.approx(clip.samples.size / 16000, abs=1e-3)


def test_batch_equals_one_by_one(transcriber, speech_clips):
    clips = [clip.samples for clip in speech_clips[:3]]
    batched = [r.text for r in transcriber.transcribe([ShortRequest(a) for a in clips])]
    alone = [transcriber.transcribe([ShortRequest(a)])[0].text for a in clips]
    assert batched == alone


def test_mixed_options_in_one_batch(transcriber, speech_clips):
    audio = speech_clips[0].samples
    greedy, beam, capped = transcriber.transcribe([
        ShortRequest(audio),
        ShortRequest(audio, options=DecodeOptions(beam_size=4)),
        ShortRequest(audio, options=DecodeOptions(max_new_tokens=3)),
    ])
    assert word_error_rate(speech_clips[0].text, beam.text) <= 0.15
    assert 1 <= len(capped.tokens) <= 3 and len(greedy.tokens) > 3


def test_silence_and_quiet_noise_give_no_words(transcriber):
    rng = np.random.default_rng(0)
    silence = np.zeros(16000 * 5, dtype=np.float32)
    hiss = (rng.standard_normal(16000 * 5) * 0.002).astype(np.float32)
    results = transcriber.transcribe([ShortRequest(silence), ShortRequest(hiss)])
    assert results[0].text == ""
    assert len(results[1].text.split()) <= 2, results[1].text


def test_previous_text_prompt_is_used(transcriber, speech_clips):
    audio = speech_clips[1].samples
    result = transcriber.transcribe([ShortRequest(audio, PromptSpec(previous_text="Colors and books."))])[0]
    assert word_error_rate(speech_clips[1].text, result.text) <= 0.15


def test_more_than_one_window_is_refused(transcriber):
    with pytest.raises(PayloadTooLargeError):
        transcriber.transcribe([ShortRequest(np.ones(16000 * 31, dtype=np.float32) * 0.1)])


def test_a_decode_that_ran_to_the_token_limit_is_aligned_as_far_as_it_fits(ct2_engine, tokenizer, speech_clips):
    """448 text tokens (a loop at a high temperature) plus the start sequence are more positions than the
    decoder has: the words that fit get times instead of the request failing (diarize asks for words)."""
    from whisper_triton.contract.engine import Hypothesis
    from whisper_triton.pipeline.windows import EngineWindowDecoder, WindowOutput

    decoder = EngineWindowDecoder(ct2_engine, tokenizer)
    audio = speech_clips[0].samples
    prompt = tokenizer.prompt_ids(PromptSpec(language="en", task="transcribe", timestamps=True))
    output = WindowOutput(Hypothesis(tokens=tokenizer.encode(" the") * 448))
    decoder._align(decoder.inputs([audio]), [audio], [prompt], [output])
    start = len(decoder.start_sequence(prompt))
    assert len(output.timings.starts) == 448 - start - 2
