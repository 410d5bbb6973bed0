"""Speaker diarization through a real `serve` (tiny.en on the CPU engine): conversations of recorded
speech with known turns (testkit/real_voices.py) on POST /invocations (JSON with speakers, SRT, VTT,
RTTM), OpenAI's diarized_json with the unmodified `openai` SDK (known speakers named from reference
clips; streamed `transcript.text.segment` events), and the 400s of bad speaker parameters."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from testkit.real_voices import clips, conversation, wav_bytes
from test_speakers import DER_2_SPEAKERS, DER_3_SPEAKERS, der

pytestmark = pytest.mark.triton

WORDS_RIGHT = 0.90  # bench/diarization.py, 2 speakers (issue 27's target)


class _Turn:
    def __init__(self, start, end, speaker):
        self.start, self.end, self.speaker = start, end, speaker


@pytest.fixture(scope="module")
def two():
    """Two English voices (tiny.en transcribes both): Allison (Asterisk) and the LibriVox reader."""
    return conversation(("en", "librivox"), seed=21, turns=6, max_turn_s=8.0, overlaps=1)


@pytest.fixture(scope="module")
def three():
    return conversation(("en", "it", "librivox"), seed=22, turns=7, max_turn_s=6.0, rate=8000)


def invoke(serve, audio: bytes, query: str = "", accept: str = "application/json", body_json: dict | None = None):
    data = json.dumps(body_json).encode() if body_json is not None else audio
    request = urllib.request.Request(f"{serve.url}/invocations?{query}", data=data, method="POST", headers={
        "Content-Type": "application/json" if body_json is not None else "audio/wav", "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def mapping(reference_turns, found_turns) -> dict:
    """Found label -> reference speaker (the optimal one, as DER maps them)."""
    from pyannote.core import Annotation, Segment

    reference, hypothesis = Annotation(), Annotation()
    for turn in reference_turns:
        reference[Segment(turn.start, turn.end)] = turn.speaker
    for turn in found_turns:
        hypothesis[Segment(turn.start, turn.end)] = turn.speaker
    from pyannote.metrics.diarization import DiarizationErrorRate

    return dict(DiarizationErrorRate().optimal_mapping(reference, hypothesis))


def words_right(conv, segments, labels: dict) -> tuple[int, int]:
    right = counted = 0
    for segment in segments:
        for word in segment["words"]:
            middle = (word["start"] + word["end"]) / 2
            speakers = {t.speaker for t in conv.turns if t.start <= middle < t.end}
            if len(speakers) == 1:
                counted += 1
                right += labels.get(word["speaker"]) in speakers
    return right, counted


def test_two_speakers_json_with_speakers_words_and_turns(serve, two):
    status, body = invoke(serve, wav_bytes(two.audio), "diarize=true&num_speakers=2&word_timestamps=true")
    assert status == 200, body
    result = json.loads(body)
    assert [s["speaker"] for s in result["speakers"]] == ["A", "B"]
    assert all(s["speaking_time"] > 5 for s in result["speakers"])
    assert result["segments"][0]["speaker"] == "A" and {s["speaker"] for s in result["segments"]} == {"A", "B"}
    assert [s["id"] for s in result["segments"]] == list(range(len(result["segments"])))
    turns = [_Turn(t["start"], t["end"], t["speaker"]) for t in result["turns"]]
    assert der(two.turns, turns) <= DER_2_SPEAKERS
    right, counted = words_right(two, result["segments"], mapping(two.turns, turns))
    assert counted > 40 and right / counted >= WORDS_RIGHT
    for segment in result["segments"]:  # a segment's words all have its speaker (split where it changes)
        assert {w["speaker"] for w in segment["words"]} == {segment["speaker"]}


def test_three_speakers_at_8_khz_counted_without_being_told(serve, three):
    status, body = invoke(serve, three.wav(), "diarize=true")
    assert status == 200, body
    result = json.loads(body)
    assert len(result["speakers"]) == 3
    assert "words" not in result["segments"][0]  # asked for speakers, not words
    assert der(three.turns, [_Turn(t["start"], t["end"], t["speaker"]) for t in result["turns"]]) <= DER_3_SPEAKERS


def test_subtitles_and_rttm_say_who_speaks(serve, two):
    audio = wav_bytes(two.audio)
    status, srt = invoke(serve, audio, "diarize=true&num_speakers=2", "application/x-subrip")
    assert status == 200 and srt.split("\n")[2].startswith("A: ") and "\nB: " in srt
    status, vtt = invoke(serve, audio, "diarize=true&num_speakers=2", "text/vtt")
    assert status == 200 and "<v A>" in vtt and "<v B>" in vtt
    status, rttm = invoke(serve, audio, "diarize=true&num_speakers=2", "text/x-rttm")
    assert status == 200
    lines = [line.split() for line in rttm.splitlines()]
    assert lines and all(line[0] == "SPEAKER" and line[7] in ("A", "B") for line in lines)
    turns = [_Turn(float(line[3]), float(line[3]) + float(line[4]), line[7]) for line in lines]
    assert der(two.turns, turns) <= DER_2_SPEAKERS
    status, body = invoke(serve, audio, "", "text/x-rttm")  # RTTM without diarize
    assert status == 406 and json.loads(body)["error"]["param"] == "Accept"


def data_url(samples: np.ndarray) -> str:
    return "data:audio/wav;base64," + base64.b64encode(wav_bytes(samples)).decode()


def reference_clip(voice: str, seconds: float = 4.0) -> np.ndarray:
    pool = clips(voice)[::-1]  # the voice's last clips: the conversation starts from a shuffled pool
    taken, total = [], 0
    for clip in pool:
        taken.append(clip)
        total += clip.size
        if total >= seconds * 16000:
            break
    return np.concatenate(taken)[: int(9.5 * 16000)]


@pytest.fixture(scope="module")
def client(serve):
    return openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_diarized_json_names_known_speakers(client, two, tmp_path):
    path = tmp_path / "two.wav"
    path.write_bytes(wav_bytes(two.audio))
    names = {"librivox": "reader", "en": "agent"}
    with path.open("rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="diarized_json", chunking_strategy="auto",
            known_speaker_names=list(names.values()),
            known_speaker_references=[data_url(reference_clip(v)) for v in names])
    assert type(result).__name__ == "TranscriptionDiarized" and result.task == "transcribe"
    assert result.segments and {s.speaker for s in result.segments} == set(names.values())
    assert all(s.type == "transcript.text.segment" and s.id.startswith("seg_") for s in result.segments)
    # a segment's name is the voice speaking at its middle (where one voice speaks), but for a short
    # segment at a change of speaker now and then: by speech time, WORDS_RIGHT of it is named right
    right = checked = 0.0
    for segment in result.segments:
        voices = {t.speaker for t in two.turns if t.start <= (segment.start + segment.end) / 2 < t.end}
        if len(voices) == 1:
            checked += segment.end - segment.start
            right += (segment.end - segment.start) * (segment.speaker == names[voices.pop()])
    assert checked > 20 and right / checked >= WORDS_RIGHT


def test_openai_stream_sends_segment_events_with_speakers(client, two, tmp_path):
    path = tmp_path / "two.wav"
    path.write_bytes(wav_bytes(two.audio))
    with path.open("rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, response_format="diarized_json",
                                                         stream=True, extra_body={"num_speakers": 2}))
    segments = [e for e in events if e.type == "transcript.text.segment"]
    assert segments and {e.speaker for e in segments} == {"A", "B"} and segments[0].speaker == "A"
    assert [e.id for e in segments] == [f"seg_{i}" for i in range(len(segments))]
    assert events[-1].type == "transcript.text.done"
    assert events[-1].text == "".join(e.text for e in segments).strip()


@pytest.mark.parametrize("fields, param", [
    ({"num_speakers": 0}, "num_speakers"),
    ({"num_speakers": 17}, "num_speakers"),
    ({"min_speakers": 3, "max_speakers": 2}, "min_speakers"),
    ({"known_speaker_names": ["agent"]}, "known_speaker_names"),
    ({"known_speaker_names": ["agent"], "known_speaker_references": ["data:audio/wav;base64,aGVsbG8="]},
     "known_speaker_references"),
    ({"known_speaker_names": ["agent"], "known_speaker_references": ["https://example.com/agent.wav"]},
     "known_speaker_references"),
])
def test_bad_speaker_parameters_are_400s_naming_them(client, two, tmp_path, fields, param):
    path = tmp_path / "short.wav"
    path.write_bytes(wav_bytes(two.audio[: 16000 * 3]))
    extra = {k: v for k, v in fields.items() if k not in ("known_speaker_names", "known_speaker_references")}
    with path.open("rb") as f, pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="diarized_json", extra_body=extra,
            known_speaker_names=fields.get("known_speaker_names", openai.omit),
            known_speaker_references=fields.get("known_speaker_references", openai.omit))
    assert caught.value.status_code == 400 and caught.value.body["param"] == param


def test_a_reference_too_long_or_too_short_is_refused(serve, two):
    for seconds in (1.0, 12.0):
        clip = np.concatenate(clips("en")[:8])[: int(seconds * 16000)]
        status, body = invoke(serve, b"", "", body_json={
            "audio": base64.b64encode(wav_bytes(two.audio[: 16000 * 3])).decode(), "diarize": True,
            "known_speaker_names": ["agent"], "known_speaker_references": [data_url(clip)]})
        assert status == 400, body
        error = json.loads(body)["error"]
        assert error["param"] == "known_speaker_references" and "2-10 s" in error["message"]
