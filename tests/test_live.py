"""Live transcription without a server: the realtime event contract against the openai SDK's own
types, G.711 against Python's audioop, streaming VAD against one pass, the local agreement, and the
utterance state machine driving the real tiny.en engine in-process on recorded speech (Asterisk
prompts), fed faster than real time."""

from __future__ import annotations

import asyncio
import base64
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from whisper_triton.contract import realtime as rt
from whisper_triton.live.agreement import LocalAgreement
from whisper_triton.live.audio_input import LiveAudioInput
from whisper_triton.pipeline.audio import encode_pcm16
from whisper_triton.live.decoding import UtteranceDecoder
from whisper_triton.live.session import LiveLimits, LiveSession
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.pipeline.longform import LongFormTranscriber
from whisper_triton.pipeline.vad import VadStream, speech_probabilities
from whisper_triton.pipeline.windows import EngineWindowDecoder

SR = 16_000


# ---- contract ---------------------------------------------------------------------------------
def test_server_events_parse_as_the_openai_sdks_own_types():
    from openai.types.realtime import realtime_server_event as sdk_events
    from pydantic import TypeAdapter

    adapter = TypeAdapter(sdk_events.RealtimeServerEvent)
    events = [rt.SessionCreated(session=rt.TranscriptionSession()), rt.SessionUpdated(session=rt.TranscriptionSession()),
              rt.SpeechStarted(audio_start_ms=10, item_id="item_1"), rt.SpeechStopped(audio_end_ms=900, item_id="item_1"),
              rt.Committed(item_id="item_1"), rt.Cleared(),
              rt.TranscriptionDelta(item_id="item_1", delta="Hello"),
              rt.TranscriptionCompleted(item_id="item_1", transcript="Hello there.", usage=rt.DurationUsage(seconds=1.5)),
              rt.TranscriptionFailed(item_id="item_1", error=rt.FailureDetail(message="x")),
              rt.server_error("busy", "server_busy")]
    for event in events:
        parsed = adapter.validate_python(json.loads(rt.as_json(event)))
        assert parsed.type == event.type
    created = adapter.validate_python(json.loads(rt.as_json(events[0])))
    assert created.session.type == "transcription"
    assert created.session.audio.input.format.type == "audio/pcm" and created.session.audio.input.format.rate == 24000
    assert created.session.audio.input.turn_detection.type == "server_vad"


def test_session_update_changes_only_what_it_names_and_null_turn_detection_means_manual():
    session = rt.TranscriptionSession()
    update = rt.parse_client_event(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
        "input": {"transcription": {"language": "en"}, "turn_detection": {"type": "server_vad", "threshold": 0.6}}}}}))
    first = session.updated(update)
    assert first.audio.input.transcription.language == "en"
    assert first.audio.input.turn_detection.threshold == 0.6
    assert first.audio.input.turn_detection.silence_duration_ms == 500  # untouched
    assert first.audio.input.format.type == "audio/pcm"
    manual = first.updated(rt.parse_client_event(json.dumps({"type": "session.update", "session": {
        "type": "transcription", "audio": {"input": {"turn_detection": None, "format": {"type": "audio/pcmu"}}}}})))
    assert manual.audio.input.turn_detection is None and manual.audio.input.format.type == "audio/pcmu"
    assert manual.audio.input.transcription.language == "en"


@pytest.mark.parametrize("message, code, param", [
    ("not json", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    ('{"type": "response.create"}', "invalid_value", "type"),
    ('{"type": "input_audio_buffer.append"}', "invalid_value", "audio"),
    ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"format": '
     '{"type": "audio/pcm", "rate": 16000}}}}}', "invalid_value", "session.audio.input.format.rate"),
    ('{"type": "session.update", "session": {"type": "realtime"}}', "invalid_value", "session.type"),
])
def test_bad_client_events_become_error_events_naming_what_is_wrong(message, code, param):
    with pytest.raises(rt.EventError) as caught:
        rt.parse_client_event(message)
    event = json.loads(rt.as_json(caught.value.event()))
    assert event["type"] == "error" and event["error"]["code"] == code
    assert event["error"]["type"] == "invalid_request_error" and event["error"]["message"]
    assert event["error"]["param"] == param


def test_a_bad_base64_append_names_audio_and_keeps_the_event_id():
    event = rt.parse_client_event('{"type": "input_audio_buffer.append", "audio": "@@@", "event_id": "e7"}')
    with pytest.raises(rt.EventError) as caught:
        event.audio_bytes()
    assert caught.value.param == "audio" and caught.value.event_id == "e7"


# ---- audio in ---------------------------------------------------------------------------------
def test_g711_expands_as_pythons_audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    codes = bytes(range(256))
    for fmt, reference in (("audio/pcmu", audioop.ulaw2lin(codes, 2)), ("audio/pcma", audioop.alaw2lin(codes, 2))):
        from whisper_triton.live.audio_input import _TABLES

        assert _TABLES[fmt].tolist() == np.frombuffer(reference, dtype="<i2").tolist()


def test_pcm_in_pieces_resamples_as_the_whole():
    t = np.arange(2 * SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = encode_pcm16(tone)
    assert len(pcm) == 2 * 24_000 * 2
    whole = LiveAudioInput("audio/pcm").convert(pcm)
    pieces, converter, rng, i = [], LiveAudioInput("audio/pcm"), np.random.default_rng(3), 0
    while i < len(pcm):  # odd sizes: a sample split across appends
        n = int(rng.integers(1, 3001))
        pieces.append(converter.convert(pcm[i:i + n]))
        i += n
    joined = np.concatenate(pieces)
    assert abs(joined.size - whole.size) <= 64
    n = min(joined.size, whole.size)
    assert np.abs(joined[:n] - whole[:n]).max() < 1e-3
    assert np.abs(whole[200:30_000] - tone[200:30_000]).max() < 1e-3  # 24 kHz PCM back to the 16 kHz tone


def test_streaming_vad_scores_as_one_pass(speech_clips):
    audio = np.concatenate([np.zeros(SR // 2, np.float32), speech_clips[0].samples, np.zeros(SR, np.float32)])
    stream, parts, rng, i = VadStream(), [], np.random.default_rng(0), 0
    while i < audio.size:
        n = int(rng.integers(1, 4000))
        parts.append(stream.push(audio[i:i + n]))
        i += n
    streamed = np.concatenate(parts)
    whole = speech_probabilities(audio, parallel=False)
    assert streamed.size == audio.size // 512
    assert np.array_equal(streamed, whole[:streamed.size])
    assert streamed.max() > 0.9 and streamed[:10].max() < 0.2


# ---- local agreement --------------------------------------------------------------------------
def test_local_agreement_sends_a_word_once_two_hypotheses_agree_and_never_takes_it_back():
    agreement = LocalAgreement()
    assert agreement.update("Please") == ""
    assert agreement.update("Please send me") == "Please"
    assert agreement.update("Please send me the rep") == " send me"
    assert agreement.update("Pleas sand") == ""  # disagrees with what was sent: nothing, nothing taken back
    assert agreement.committed == ["Please", "send", "me"]
    assert agreement.update("please send me the report, before") == ""
    assert agreement.update("Please send me the report before the") == " the report before"
    assert agreement.completion("Please send me the report before the meeting.") == " the meeting."
    assert LocalAgreement(committed=["Hello"]).completion("Goodbye now.") == ""  # the final replaces the partials


# ---- the session, on the real engine in-process ------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    from testkit.real_speech import sentences

    return sentences(4)


@pytest.fixture(scope="module")
def live_decoder(ct2_engine, tokenizer):
    return UtteranceDecoder(LongFormTranscriber(EngineWindowDecoder(ct2_engine, tokenizer, 64 << 20), tokenizer))


def append_events(samples: np.ndarray, step_s: float = 0.1) -> list[str]:
    pcm = encode_pcm16(samples)
    step = int(24_000 * 2 * step_s)
    return [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + step]).decode()})
            for i in range(0, len(pcm), step)]


def run_session(decoder, messages: list[str], limits: LiveLimits = LiveLimits(), pause_every: int = 0) -> list:
    """Feed `messages` (faster than real time), wait for the finals, return every server event."""
    events: list = []

    async def main():
        async def send(event):
            events.append(event)

        with ThreadPoolExecutor(4) as pool:
            session = LiveSession(decoder, send, pool, limits)
            await session.start()
            for index, message in enumerate(messages):
                try:
                    await session.handle(rt.parse_client_event(message))
                except rt.EventError as exc:
                    events.append(exc.event())
                if pause_every and index % pause_every == 0:
                    await asyncio.sleep(0.05)
            for _ in range(3):  # finals chain: each waits for the one before
                await session.drain(120)
            await session.close()

    asyncio.run(main())
    return events


def of_type(events, kind: str) -> list:
    return [e for e in events if e.type == kind]


def test_three_utterances_between_pauses_end_in_three_completed_transcripts(live_decoder, recorded):
    parts = [np.zeros(SR // 2, np.float32)]
    for samples, _ in recorded[:3]:
        parts += [samples, np.zeros(int(1.5 * SR), np.float32)]
    events = run_session(live_decoder, append_events(np.concatenate(parts)))
    started, stopped = of_type(events, "input_audio_buffer.speech_started"), of_type(events, "input_audio_buffer.speech_stopped")
    committed = of_type(events, "input_audio_buffer.committed")
    completed = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert events[0].type == "session.created"
    assert len(started) == len(stopped) == len(committed) == len(completed) == 3
    assert [c.item_id for c in committed] == [s.item_id for s in started] == [c.item_id for c in completed]
    assert committed[0].previous_item_id is None and committed[1].previous_item_id == committed[0].item_id
    for event, (_, text) in zip(completed, recorded[:3]):
        assert word_error_rate(text, event.transcript) <= 0.2, (text, event.transcript)
        deltas = [e for e in events if e.type.endswith(".delta") and e.item_id == event.item_id]
        assert deltas and events.index(deltas[-1]) < events.index(event)
    # speech starts before each prompt's first sample and stops after its last (at the 16 kHz timeline)
    position = SR // 2
    for (samples, _), start, stop in zip(recorded[:3], started, stopped):
        assert start.audio_start_ms <= position * 1000 // SR + 200
        assert stop.audio_end_ms >= (position + samples.size) * 1000 // SR
        position += samples.size + int(1.5 * SR)


def test_speech_over_30_s_is_cut_at_its_quietest_point(live_decoder, recorded):
    """Eleven prompts with 0.3 s gaps, and a turn that ends only after 2 s of silence: one stretch of
    ~32 s of speech, cut before 29.5 s at a quiet point (between words), not inside a word."""
    parts = []
    for samples, _ in (recorded * 3)[:11]:
        parts += [samples, np.zeros(int(0.3 * SR), np.float32)]
    speech = np.concatenate(parts + [np.zeros(3 * SR, np.float32)])
    assert speech.size / SR > 31
    slow_turns = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 2000}}}}})
    events = run_session(live_decoder, [slow_turns] + append_events(speech, 0.5))
    started = of_type(events, "input_audio_buffer.speech_started")
    completed = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert len(started) == 2 and len(completed) == 2
    assert len(of_type(events, "input_audio_buffer.speech_stopped")) == 1  # the cut is no end of speech
    cut = started[1].audio_start_ms * SR // 1000
    assert 9.5 <= cut / SR <= 29.5 + 0.1
    around = speech[cut - 800: cut + 800]
    assert np.sqrt(np.mean(around ** 2)) < 0.01, f"cut at {cut / SR:.2f} s is not quiet"
    assert completed[0].usage.seconds <= 29.6
    assert all(word_error_rate(" ".join(t for _, t in (recorded * 3)[:11]), " ".join(c.transcript for c in completed)) < 0.3
               for _ in [0])


def test_without_turn_detection_the_client_commits_and_clears(live_decoder, recorded):
    samples, text = recorded[3]
    manual = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": None, "format": {"type": "audio/pcm", "rate": 24000}}}}})
    commit = json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"})
    messages = [manual, commit]  # nothing to commit yet: an error, the session goes on
    messages += append_events(recorded[0][0])[:5] + [json.dumps({"type": "input_audio_buffer.clear"})]
    messages += append_events(np.concatenate([samples, np.zeros(SR // 2, np.float32)])) + [commit]
    events = run_session(live_decoder, messages)
    errors = of_type(events, "error")
    assert [e.error.code for e in errors] == ["input_audio_buffer_commit_empty"]
    assert errors[0].error.event_id == "c1"
    assert of_type(events, "session.updated")[0].session.audio.input.turn_detection is None
    assert len(of_type(events, "input_audio_buffer.cleared")) == 1
    assert not of_type(events, "input_audio_buffer.speech_started")
    completed = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert len(completed) == 1 and word_error_rate(text, completed[0].transcript) <= 0.2


def test_telephony_mulaw_at_8_khz_is_transcribed(live_decoder, recorded):
    import av

    samples, text = recorded[1]
    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.concatenate([samples, np.zeros(SR, np.float32)]).reshape(1, -1),
                                       format="flt", layout="mono")
    frame.sample_rate = SR
    pcm8k = np.concatenate([f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)])
    from whisper_triton.live.audio_input import _TABLES

    table = _TABLES["audio/pcmu"].astype(np.int32)
    codes = np.abs(table[None, :] - pcm8k[:, None].astype(np.int32)).argmin(axis=1).astype(np.uint8)  # nearest code
    update = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcmu"}}}}})
    appends = [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(codes[i:i + 800].tobytes()).decode()})
               for i in range(0, codes.size, 800)]
    events = run_session(live_decoder, [update] + appends)
    completed = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert len(completed) == 1 and word_error_rate(text, completed[0].transcript) <= 0.25, completed[0].transcript
