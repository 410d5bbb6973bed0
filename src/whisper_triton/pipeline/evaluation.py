"""Word error rate after Whisper-style text normalisation (for tests and benchmarks)."""

from __future__ import annotations

import re
import unicodedata

_PUNCTUATION_RE = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: what WER comparisons in this field use."""
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ")
    text = _PUNCTUATION_RE.sub(" ", text)
    return " ".join(text.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    reference, hypothesis = normalize(reference), normalize(hypothesis)
    if not reference:
        return 0.0 if not hypothesis else 1.0
    return float(jiwer.wer(reference, hypothesis))
