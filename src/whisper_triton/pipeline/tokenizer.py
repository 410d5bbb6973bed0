"""Whisper tokenizer and prompt building for English-only and multilingual vocabularies.

The special-token layout differs between the two vocabularies (English-only models have one token
less before <|startoftranscript|> and were never trained with language or task tokens), so ids are
always looked up by name in the model's own `tokenizer.json`, never hard-coded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from ..contract.capabilities import SpecialTokens
from ..contract.options import MAX_PROMPT_TOKENS
from ..errors import invalid_parameter

_SPECIAL_RE = re.compile(r"<\|[^|<>]*\|>")
TASKS = ("transcribe", "translate")
_LANGUAGE_LIKE = re.compile(r"^[a-z]{2,3}$")  # an unknown code is reported as a bad language


@dataclass(frozen=True)
class PromptSpec:
    """What a Whisper decoder prompt asks for, independent of token ids."""

    language: str | None = None  # None: detect (multilingual) / English (English-only)
    task: str = "transcribe"
    timestamps: bool = False
    previous_text: str | None = None


@dataclass
class WhisperTokenizer:
    tokenizer: Tokenizer
    is_multilingual: bool
    _ids: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, is_multilingual: bool | None = None) -> "WhisperTokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"No tokenizer.json in {model_dir}: a Whisper model directory must hold the tokenizer "
                "(CTranslate2's converter copies it with --copy_files tokenizer.json)."
            )
        tokenizer = Tokenizer.from_file(str(path))
        if is_multilingual is None:
            # English-only vocabularies end <|endoftext|>=50256, multilingual ones add a token first
            is_multilingual = tokenizer.token_to_id("<|endoftext|>") != 50256
        return cls(tokenizer=tokenizer, is_multilingual=is_multilingual)

    # ---- special tokens -------------------------------------------------------------------
    def special(self, name: str) -> int:
        token_id = self.tokenizer.token_to_id(name)
        if token_id is None:
            raise KeyError(f"token {name} is not in this Whisper vocabulary")
        return token_id

    @cached_property
    def eot(self) -> int:
        return self.special("<|endoftext|>")

    @cached_property
    def sot(self) -> int:
        return self.special("<|startoftranscript|>")

    @cached_property
    def sot_prev(self) -> int:
        return self.special("<|startofprev|>")

    @cached_property
    def transcribe(self) -> int:
        return self.special("<|transcribe|>")

    @cached_property
    def translate(self) -> int:
        return self.special("<|translate|>")

    @cached_property
    def no_timestamps(self) -> int:
        return self.special("<|notimestamps|>")

    @cached_property
    def no_speech(self) -> int:
        for name in ("<|nospeech|>", "<|nocaptions|>"):
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        raise KeyError("this Whisper vocabulary has no <|nospeech|> token")

    @cached_property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @cached_property
    def language_ids(self) -> dict[str, int]:
        """Language code -> token id, read from the vocabulary (99 or 100 languages)."""
        languages = {}
        for token_id in range(self.sot + 1, self.translate):
            token = self.tokenizer.id_to_token(token_id)
            if token and token.startswith("<|") and token.endswith("|>"):
                languages[token[2:-2]] = token_id
        return languages

    @cached_property
    def language_by_id(self) -> dict[int, str]:
        return {token_id: code for code, token_id in self.language_ids.items()}

    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens(sot=self.sot, eot=self.eot, no_timestamps=self.no_timestamps, no_speech=self.no_speech,
                             transcribe=self.transcribe, translate=self.translate, sot_prev=self.sot_prev,
                             language_ids=dict(self.language_ids))

    # ---- text -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        """Text of the ordinary tokens; special and timestamp tokens are dropped."""
        return self.tokenizer.decode([t for t in token_ids if t < self.eot])

    # ---- prompts --------------------------------------------------------------------------
    def validate_language(self, language: str | None, param: str = "language") -> str | None:
        if language is None:
            return None
        code = language.strip().lower()
        if code not in self.language_ids:
            raise invalid_parameter(
                param, f"Unknown language code {language!r}. Use a Whisper language code such as 'en', 'de' or 'fr'."
            )
        if not self.is_multilingual and code != "en":
            raise invalid_parameter(
                param, f"This model is English-only and cannot transcribe language {code!r}. "
                "Use language 'en' or omit it, or serve a multilingual Whisper model."
            )
        return code

    def validate_task(self, task: str | None, param: str = "task") -> str:
        task = (task or "transcribe").strip().lower()
        if task not in TASKS:
            raise invalid_parameter(param, f"Unknown task {task!r}: use 'transcribe' or 'translate'.")
        if task == "translate" and not self.is_multilingual:
            raise invalid_parameter(
                param, "This model is English-only and cannot translate. Use task 'transcribe' or a "
                "multilingual Whisper model."
            )
        return task

    def prompt_ids(self, spec: PromptSpec, language: str | None = None) -> list[int]:
        """Decoder prompt for `spec`; `language` fills in a detected language when spec has none."""
        prompt: list[int] = []
        if spec.previous_text and spec.previous_text.strip():
            previous = self.encode(" " + spec.previous_text.strip())
            prompt += [self.sot_prev] + previous[-MAX_PROMPT_TOKENS:]
        prompt.append(self.sot)
        if self.is_multilingual:
            code = spec.language or language or "en"
            prompt += [self.language_ids[code], self.translate if spec.task == "translate" else self.transcribe]
        if not spec.timestamps:
            prompt.append(self.no_timestamps)
        return prompt

    def parse_text_prefix(self, text_prefix: str) -> PromptSpec:
        """`read_text_prefix`, with its language and task checked against this model: a multilingual
        prefix on an English-only model is accepted as long as it asks for English."""
        spec = read_text_prefix(text_prefix)
        return PromptSpec(language=self.validate_language(spec.language), task=self.validate_task(spec.task),
                          timestamps=spec.timestamps, previous_text=spec.previous_text)


def read_text_prefix(text_prefix: str) -> PromptSpec:
    """Read a NVIDIA-style TEXT_PREFIX such as `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`
    into a PromptSpec, without a vocabulary (the `whisper` front routes rows with it); the language
    is checked by the model that decodes (`WhisperTokenizer.parse_text_prefix`)."""
    text_prefix = (text_prefix or "").strip()
    if not text_prefix:
        return PromptSpec()
    previous_text = None
    if "<|startofprev|>" in text_prefix:
        before, _, after = text_prefix.partition("<|startofprev|>")
        previous_text, sep, rest = after.partition("<|startoftranscript|>")
        text_prefix = before + sep + rest
    language, task, timestamps = None, "transcribe", True
    seen_sot = False
    for token in _SPECIAL_RE.findall(text_prefix):
        name = token[2:-2]
        if name == "startoftranscript":
            seen_sot = True
        elif name == "notimestamps":
            timestamps = False
        elif name in TASKS:
            task = name
        elif _LANGUAGE_LIKE.match(name):
            language = name
        else:
            raise invalid_parameter(
                "TEXT_PREFIX", f"Unexpected token {token} in the text prefix. Expected "
                "<|startoftranscript|>, a language, a task and optionally <|notimestamps|>."
            )
    leftover = _SPECIAL_RE.sub("", text_prefix).strip()
    if leftover or not seen_sot:
        raise invalid_parameter(
            "TEXT_PREFIX", f"Malformed text prefix {text_prefix[:80]!r}: it must start with "
            "<|startoftranscript|> and hold only special tokens (previous text goes after <|startofprev|>)."
        )
    return PromptSpec(language=language, task=task, timestamps=timestamps,
                      previous_text=previous_text.strip() if previous_text else None)
