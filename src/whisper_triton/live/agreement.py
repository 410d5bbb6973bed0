"""Partial text that does not flicker: the local-agreement rule of whisper-streaming (Macháček et
al., 2023, "LocalAgreement-2"). Each partial decode of the open utterance gives a hypothesis; the
words on which the last two hypotheses agree, from the start, are committed and sent once, and a
committed word is never taken back by a later partial (only the final transcript, which replaces
the partials, may differ). Words are compared without case and punctuation, so "Monday," and
"Monday" agree; the text sent is the newest hypothesis' own spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NOT_WORD = re.compile(r"[^\w']+")


def norm(word: str) -> str:
    return _NOT_WORD.sub("", word.lower())


@dataclass
class LocalAgreement:
    committed: list[str] = field(default_factory=list)  # the words sent so far, as sent
    _previous: list[str] = field(default_factory=list)  # the last hypothesis, in words

    def update(self, text: str) -> str:
        """Take one partial hypothesis; return the delta to send (new committed words, "" if none)."""
        words = text.split()
        agreed = len(self.committed)
        if [norm(w) for w in words[:agreed]] != [norm(w) for w in self.committed]:
            self._previous = words  # this hypothesis disagrees with what was sent: wait for the next one
            return ""
        limit = min(len(words), len(self._previous))
        while agreed < limit and norm(words[agreed]) == norm(self._previous[agreed]) and norm(words[agreed]):
            agreed += 1
        self._previous = words
        new = words[len(self.committed):agreed]
        if not new:
            return ""
        delta = " ".join(new)
        delta = delta if not self.committed else " " + delta
        self.committed += new
        return delta

    def completion(self, final: str) -> str:
        """The delta that brings the sent words up to the final transcript, when they are its first
        words ("" when they are not: the final then replaces what was sent)."""
        words = final.split()
        sent = len(self.committed)
        if [norm(w) for w in words[:sent]] != [norm(w) for w in self.committed] or len(words) <= sent:
            return ""
        rest = " ".join(words[sent:])
        return rest if not self.committed else " " + rest
