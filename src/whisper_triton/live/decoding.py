"""The decodes of a live session, through the pipeline's long-form transcriber over whatever window
decoder it is given (Triton's `whisper_window` over gRPC in `serve`, an engine in-process in tests):

- a **partial** decode of the open utterance: greedy (temperature 0, no fallback), no timestamps,
  the silence guard only; its words feed the local agreement;
- the **final** decode of an utterance: every guard of a file (silence, compression ratio and
  log-prob fallback over the temperatures, the loop cut, the unsure-language guard) with the
  previous utterances' text as the prompt (openai-whisper's condition_on_previous_text), as one
  window: turn detection has cut the utterance to at most 30 s of speech already. Audio committed
  by hand (no turn detection) may be longer: it goes through VAD and windows as a file does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from ..contract.options import TranscribeOptions
from ..pipeline.audio import SAMPLE_RATE
from ..pipeline.longform import LongFormTranscriber

logger = logging.getLogger(__name__)

HISTORY_CHARS = 600  # of previous text kept for the prompt; the tokenizer keeps its last 223 tokens


@dataclass
class FinalText:
    text: str
    language: str
    left_out: list[str] = field(default_factory=list)  # the guards that left text out


def prompt_text(session_prompt: str | None, history: list[str]) -> str | None:
    """The session's prompt, then the previous utterances, the newest last, cut to HISTORY_CHARS."""
    parts = [p.strip() for p in [session_prompt or "", *history] if p and p.strip()]
    text = " ".join(parts)[-HISTORY_CHARS:]
    return text or None


class UtteranceDecoder:
    """Partial and final decodes of live audio (16 kHz float32); synchronous, run on a thread.

    `urgency(kind)` ("final" / "partial"), when given, is entered around each decode: the window
    decoder behind it queues a final before file windows and a partial after them."""

    def __init__(self, transcriber: LongFormTranscriber,
                 urgency: Callable[[str], AbstractContextManager] | None = None):
        self.transcriber = transcriber
        self.urgency = urgency or (lambda kind: nullcontext())

    @property
    def multilingual(self) -> bool:
        return self.transcriber.decoder.capabilities.multilingual

    def check_language(self, language: str | None) -> str | None:
        """The session's language as this model takes it (a 400-style error names `language`)."""
        if language is None:
            return None
        options = self.transcriber.check(TranscribeOptions(language=language))
        return options.language

    def partial(self, audio: np.ndarray, language: str | None, prompt: str | None) -> str:
        options = TranscribeOptions(vad=False, without_timestamps=True, temperature=[0.0], language=language,
                                    initial_prompt=prompt)
        with self.urgency("partial"):
            return self.transcriber.transcribe(audio, options).text

    def final(self, audio: np.ndarray, language: str | None, prompt: str | None, vad: bool = False) -> FinalText:
        options = TranscribeOptions(vad=vad, language=language, initial_prompt=prompt)
        with self.urgency("final"):
            result = self.transcriber.transcribe(audio, options)
        if result.info.left_out:
            logger.info("live utterance of %.2f s: text left out by %s", audio.size / SAMPLE_RATE,
                        ", ".join(item.reason for item in result.info.left_out))
        return FinalText(result.text, result.language, [item.reason for item in result.info.left_out])
