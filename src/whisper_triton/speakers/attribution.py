"""Segments and words -> speakers: every word gets the speaker who holds most of its time; a segment
whose words change speaker is split at the word where the speaker changes (each piece keeps its
words' times); a segment without words takes the speaker who holds most of its time. Speakers are
labelled as OpenAI labels them: "A", "B", ... in order of first appearance, or the name of the known
speaker whose reference is nearest (`naming`)."""

from __future__ import annotations

import string
from dataclasses import replace

from ..contract.results import Segment, SpeakerSummary, Turn, Word
from ..pipeline.decoding import compression_ratio
from .diarize import Diarization


def letters(count: int) -> list[str]:
    """A, B, ... Z, AA, AB, ...: OpenAI's labels for speakers without a name."""
    labels = []
    for index in range(count):
        label, value = "", index
        while True:
            label = string.ascii_uppercase[value % 26] + label
            value = value // 26 - 1
            if value < 0:
                break
        labels.append(label)
    return labels


def speaker_labels(diarization: Diarization, names: dict[int, str] | None = None) -> list[str]:
    """The label of each speaker index (indices are in order of first appearance): its known name, else
    the next letter not used by a name."""
    names = names or {}
    free = iter(label for label in letters(diarization.count + len(names)) if label not in names.values())
    return [names[index] if index in names else next(free) for index in range(diarization.count)]


def summaries(diarization: Diarization, labels: list[str]) -> list[SpeakerSummary]:
    times = diarization.speaking_time()
    return [SpeakerSummary(label, round(times[index], 3)) for index, label in enumerate(labels)]


def turns(diarization: Diarization, labels: list[str]) -> list[Turn]:
    return [Turn(turn.start, turn.end, labels[turn.speaker]) for turn in diarization.turns]


def _speaker(diarization: Diarization, labels: list[str], start: float, end: float) -> str | None:
    index = diarization.speaker_between(start, end)
    return None if index is None else labels[index]


def attribute(segments: list[Segment], diarization: Diarization, labels: list[str], first_id: int = 0) -> list[Segment]:
    """`segments` with speakers (split where the speaker changes within one), ids from `first_id` on."""
    out: list[Segment] = []
    for segment in segments:
        words = segment.words or []
        if not words:
            out.append(replace(segment, speaker=_speaker(diarization, labels, segment.start, segment.end)))
            continue
        spoken = [replace(word, speaker=_speaker(diarization, labels, word.start, word.end)) for word in words]
        runs: list[list[Word]] = []
        for word in spoken:
            if runs and (runs[-1][-1].speaker == word.speaker or word.speaker is None):
                runs[-1].append(word)
            else:
                runs.append([word])
        if len(runs) == 1:
            out.append(replace(segment, words=spoken, speaker=runs[0][0].speaker))
            continue
        for index, run in enumerate(runs):
            text = "".join(word.word for word in run)
            start = segment.start if index == 0 else run[0].start
            end = segment.end if index == len(runs) - 1 else run[-1].end
            # a piece's token ids are not known apart from its words' text: only the whole segment's are
            out.append(replace(segment, start=start, end=max(end, start), text=text, tokens=[], words=run,
                               speaker=run[0].speaker, compression_ratio=compression_ratio(text)))
    return [replace(segment, id=first_id + index) for index, segment in enumerate(out)]
