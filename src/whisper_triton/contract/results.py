"""The transcription result, as every route renders it (JSON, text, WebVTT, SRT).

`info` says what was done, as faster-whisper's `TranscriptionInfo` does: the engine, and each rule
of the pipeline that could not be applied on it (`not_applied`: rule -> why) and the stretches whose text a guard left out
(`left_out`), so a degraded result is never silent."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float
    speaker: str | None = None  # with diarize: the speaker who holds most of the word's time


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    language: str | None = None
    words: list[Word] | None = None
    speaker: str | None = None  # with diarize: "A", "B", ... in order of first appearance, or a known name


@dataclass
class LeftOut:
    """A stretch of the file that had speech (by VAD) but whose decodes a guard refused, and why."""

    start: float
    end: float
    reason: str  # "loop": every decode was a loop; "unsure_language": every decode failed, language unsure
    language_probability: float | None = None  # the detected language's probability, where it was unsure


@dataclass
class Work:
    """What one request cost: windows and engine passes by kind, and wall seconds per stage.

    `seconds` keys: `audio_decode` (bytes -> samples), `vad`, `detection` and `decoding` (waiting
    for the engine, all passes of the kind), and the engine's own time shared out to this request's
    rows of each batch: `encoder`, `decoder` (generation), `alignment` (word timestamps)."""

    windows: int = 0  # windows the speech was cut into
    decodes: int = 0  # window decodes sent to the engine, every kind below included
    fallback_decodes: int = 0  # of them: again at a higher temperature (the first decode failed a check)
    follow_up_decodes: int = 0  # of them: the rest of a window whose decode stopped before its speech ended
    language_retries: int = 0  # of them: again in another candidate language (the language was unsure)
    detections: int = 0  # windows run through language detection
    seconds: dict[str, float] = field(default_factory=dict)

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 6)


@dataclass
class TranscriptionInfo:
    engine: str = ""
    not_applied: dict[str, str] = field(default_factory=dict)  # rule -> why it could not be applied
    left_out: list[LeftOut] = field(default_factory=list)  # windows whose text a guard left out
    work: Work = field(default_factory=Work)  # windows, engine passes and time per stage of this request


@dataclass
class SpeakerSummary:
    """One speaker of a diarized file: its label and how long it spoke (seconds of its turns)."""

    speaker: str
    speaking_time: float


@dataclass
class Turn:
    """A stretch of speech by one speaker (diarize): who spoke when, independent of the text."""

    start: float
    end: float
    speaker: str


@dataclass
class TranscriptionResult:
    text: str
    language: str
    language_probability: float
    duration: float
    segments: list[Segment]
    info: TranscriptionInfo = field(default_factory=TranscriptionInfo)
    speakers: list[SpeakerSummary] | None = None  # with diarize, in label order
    turns: list[Turn] | None = None  # with diarize, in time order

    def to_dict(self, words: bool = False, tokens: bool = False) -> dict:
        result = asdict(self)
        result["segments"] = [segment_dict(s, words, tokens) for s in result["segments"]]
        for name in ("speakers", "turns"):
            if result[name] is None:
                result.pop(name)
        return result


def segment_dict(segment: Segment | dict, words: bool = False, tokens: bool = False) -> dict:
    """A segment as every route sends it: token ids and words only when asked for."""
    values = asdict(segment) if isinstance(segment, Segment) else dict(segment)
    if not tokens:
        values.pop("tokens", None)
    if not words:
        values.pop("words", None)
    if values.get("language") is None:
        values.pop("language", None)
    if values.get("speaker") is None:
        values.pop("speaker", None)
    for word in values.get("words") or []:
        if isinstance(word, dict) and word.get("speaker") is None:
            word.pop("speaker", None)
    return values


def stream_chunk(segments: list[Segment], language: str, language_probability: float, duration: float,
                 info: TranscriptionInfo, done: bool, words: bool = False, tokens: bool = False,
                 speakers: list[SpeakerSummary] | None = None) -> dict:
    """One response of the streaming model: the next segments (timeline order) and what is known of the
    file; `done` on the last one. Joined, the chunks' segments are the `TranscriptionResult`'s."""
    chunk = {"segments": [segment_dict(s, words, tokens) for s in segments], "language": language,
             "language_probability": language_probability, "duration": duration, "info": asdict(info), "done": done}
    if speakers is not None:
        chunk["speakers"] = [asdict(s) for s in speakers]
    return chunk
