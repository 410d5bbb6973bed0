"""Diarized transcription: the long-form pipeline and the diarizer side by side on one file.

`SpeakerTranscriber` is what the `transcribe` and `transcribe_stream` Triton models call when a
request says diarize=true (on the CPU side of the serving stack, beside the engine; the same code
for every engine). VAD runs once: its frame probabilities give the transcription its windows and the
diarizer its speech regions. The diarizer runs on a thread of its own while the windows are decoded
(on a GPU instance it uses the vCPUs the engine leaves idle), with word timestamps asked of the
engine so that a segment can be split where its speaker changes; the words leave the answer again
unless the caller asked for them. Known speakers (`references`: name + 2-10 s clip) name the
clusters: each reference's embedding is matched to one cluster (Hungarian assignment on cosine
similarity), the clusters left over get letters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..contract.capabilities import EngineCapabilities
from ..contract.options import MAX_KNOWN_SPEAKERS, REFERENCE_SECONDS, TranscribeOptions
from ..contract.results import TranscriptionResult
from ..errors import WhisperTritonError, invalid_parameter
from ..pipeline.audio import SAMPLE_RATE, decode_audio
from ..pipeline.longform import LongFormTranscriber, StreamChunk
from ..pipeline.vad import speech_probabilities
from .attribution import attribute, speaker_labels, summaries, turns
from .diarize import Diarization, diarize
from .encoder import VoiceEncoder, level_gain

logger = logging.getLogger(__name__)

REFERENCE_PARAM = "known_speaker_references"


@dataclass(frozen=True)
class KnownSpeaker:
    name: str
    embedding: np.ndarray


def diarization_unavailable(reason: str) -> WhisperTritonError:
    return WhisperTritonError(f"Speaker diarization is not available on this server: {reason}", "diarize", 422,
                              "unsupported_option")


class SpeakerTranscriber:
    def __init__(self, pipeline: LongFormTranscriber, encoder: VoiceEncoder, pool: ThreadPoolExecutor | None = None):
        self.pipeline = pipeline
        self.encoder = encoder
        self._owned = pool is None
        self._pool = pool or ThreadPoolExecutor(max_workers=2, thread_name_prefix="diarize")

    # ---- known speakers ---------------------------------------------------------------------
    def known_speakers(self, options: TranscribeOptions, references: list[bytes]) -> list[KnownSpeaker]:
        return self.known_speakers_of(self.encoder, options, references)

    @staticmethod
    def known_speakers_of(encoder: VoiceEncoder, options: TranscribeOptions,
                          references: list[bytes]) -> list[KnownSpeaker]:
        """The reference clips, decoded, checked (audio, 2-10 s) and embedded; 400s name the parameter."""
        names = options.known_speaker_names
        if references and not options.diarize:
            raise invalid_parameter(REFERENCE_PARAM, "known_speaker_references are for speaker diarization: "
                                    "add diarize=true (response_format=diarized_json on /v1/audio/transcriptions).")
        if len(names) != len(references):
            raise invalid_parameter("known_speaker_names" if names else REFERENCE_PARAM,
                                    f"known_speaker_names has {len(names)} names and known_speaker_references "
                                    f"{len(references)} clips: give one reference clip per name.")
        if len(references) > MAX_KNOWN_SPEAKERS:
            raise invalid_parameter(REFERENCE_PARAM, f"At most {MAX_KNOWN_SPEAKERS} known speakers, got {len(references)}.")
        known = []
        low, high = REFERENCE_SECONDS
        for index, (name, data) in enumerate(zip(names, references)):
            try:
                audio = decode_audio(data, max_seconds=high + 5)
            except WhisperTritonError as exc:
                raise invalid_parameter(REFERENCE_PARAM, f"known_speaker_references[{index}] ({name}) is not audio "
                                        f"we can decode: {exc.message}") from None
            seconds = audio.size / SAMPLE_RATE
            if not low <= seconds <= high:
                raise invalid_parameter(REFERENCE_PARAM, f"known_speaker_references[{index}] ({name}) is "
                                        f"{seconds:.1f} s long; each reference must be {low:g}-{high:g} s of audio.")
            known.append(KnownSpeaker(name, encoder.embed_utterance(audio * level_gain(audio))))
        return known

    # ---- diarization ------------------------------------------------------------------------
    def diarize(self, audio: np.ndarray, speech: np.ndarray, options: TranscribeOptions) -> Diarization:
        return diarize(self.encoder, audio, speech, options.num_speakers, options.min_speakers, options.max_speakers)

    @staticmethod
    def names(diarization: Diarization, known: list[KnownSpeaker]) -> dict[int, str]:
        """Speaker index -> known name: each reference to one cluster, most similar pairs first (Hungarian)."""
        if not known or diarization.count == 0:
            return {}
        from scipy.optimize import linear_sum_assignment

        similarity = diarization.centroids @ np.stack([k.embedding for k in known]).T
        rows, columns = linear_sum_assignment(-similarity)
        return {int(row): known[column].name for row, column in zip(rows, columns)}

    def _start(self, audio: np.ndarray, options: TranscribeOptions) -> tuple[np.ndarray, Future]:
        speech = speech_probabilities(audio) if audio.size else np.zeros(0, np.float32)
        return speech, self._pool.submit(self.diarize, audio, speech, options)

    def _decode_options(self, options: TranscribeOptions) -> TranscribeOptions:
        """Word timestamps from the engine when it can align: they split segments where the speaker changes."""
        if self.pipeline.decoder.capabilities.word_timestamps and not options.word_timestamps:
            return options.model_copy(update={"word_timestamps": True})
        return options

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions,
                   known: list[KnownSpeaker] | None = None) -> TranscriptionResult:
        speech, pending = self._start(audio, options)
        result = self.pipeline.transcribe(audio, self._decode_options(options), speech)
        diarization = pending.result()
        labels = speaker_labels(diarization, self.names(diarization, known or []))
        result.segments = attribute(result.segments, diarization, labels)
        result.speakers = summaries(diarization, labels)
        result.turns = turns(diarization, labels)
        _note_words(result.info.not_applied, self.pipeline.decoder.capabilities)
        if not options.word_timestamps:
            result.segments = [replace(s, words=None) for s in result.segments]
        return result

    def transcribe_iter(self, audio: np.ndarray, options: TranscribeOptions, known: list[KnownSpeaker] | None = None,
                        cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[StreamChunk, list]]:
        """(chunk with speakers, the speakers' summaries) as `transcribe_iter` decodes: the first chunk
        waits for the diarization (it needs the whole file's voices), later ones are attributed at once."""
        speech, pending = self._start(audio, options)
        labels: list[str] | None = None
        diarization: Diarization | None = None
        next_id = 0
        for chunk in self.pipeline.transcribe_iter(audio, self._decode_options(options), cancelled, speech):
            if diarization is None:
                diarization = pending.result()
                labels = speaker_labels(diarization, self.names(diarization, known or []))
                _note_words(chunk.info.not_applied, self.pipeline.decoder.capabilities)
            segments = attribute(chunk.segments, diarization, labels, next_id)
            next_id += len(segments)
            if not options.word_timestamps:
                segments = [replace(s, words=None) for s in segments]
            yield replace(chunk, segments=segments), summaries(diarization, labels)

    def close(self) -> None:
        if self._owned:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _note_words(not_applied: dict[str, str], capabilities: EngineCapabilities) -> None:
    if not capabilities.word_timestamps:
        not_applied["speaker_change_within_segment"] = ("the engine gives no word timestamps "
                                                        f"({capabilities.missing_reason('word_timestamps')}): each "
                                                        "segment has one speaker, not split where the speaker changes")


__all__ = ["KnownSpeaker", "SpeakerTranscriber", "diarization_unavailable"]
