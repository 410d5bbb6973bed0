"""Fair text normalisation and word errors with their kinds (substitutions, deletions, insertions).

- English: openai-whisper's `EnglishTextNormalizer` (the normaliser Whisper's own figures use:
  spellings, contractions, numbers, filler words).
- Other languages: case folded, accents folded (NFKD without combining marks: both sides alike, so
  Russian "ё"/"е" and "й"/"и" meet too), punctuation and apostrophes to spaces, and numbers written
  as words in that language (`num2words`), so "2" and "dos" are the same word.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_NOT_WORD = re.compile(r"[^\w\s]|_")


@lru_cache(maxsize=1)
def _english():
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def _number_words(match: re.Match, language: str) -> str:
    from num2words import num2words

    token = match.group(0)
    try:
        value = float(token.replace(",", ".")) if ("," in token or "." in token) else int(token)
        return f" {num2words(value, lang=language)} "
    except (NotImplementedError, OverflowError, ValueError):
        return f" {token} "


def normalize(text: str, language: str) -> str:
    if language == "en":
        return " ".join(_english()(text).split())
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _NUMBER.sub(lambda m: _number_words(m, language), text)
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = _NOT_WORD.sub(" ", text.replace("-", " "))
    return " ".join(text.split())


@dataclass
class WordErrors:
    """Word counts of one or more (reference, hypothesis) pairs; add them up with `+`."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        if not self.reference_words:
            return 0.0 if not self.insertions else 1.0
        return self.errors / self.reference_words

    def __add__(self, other: "WordErrors") -> "WordErrors":
        return WordErrors(self.substitutions + other.substitutions, self.deletions + other.deletions,
                          self.insertions + other.insertions, self.reference_words + other.reference_words)

    def as_dict(self) -> dict:
        return {"wer": round(self.wer, 4), "S": self.substitutions, "D": self.deletions, "I": self.insertions,
                "N": self.reference_words}


def word_errors(reference: str, hypothesis: str, language: str) -> WordErrors:
    import jiwer

    ref, hyp = normalize(reference, language), normalize(hypothesis, language)
    if not ref:
        return WordErrors(insertions=len(hyp.split()))
    if not hyp:
        return WordErrors(deletions=len(ref.split()), reference_words=len(ref.split()))
    out = jiwer.process_words(ref, hyp)
    return WordErrors(out.substitutions, out.deletions, out.insertions, len(ref.split()))


def wer(reference: str, hypothesis: str, language: str) -> float:
    return word_errors(reference, hypothesis, language).wer
