"""What an engine can do, declared by the engine and read once by the pipeline.

The pipeline never guesses a capability from an engine's name or from `getattr`: each engine
states these, the `whisper` Triton model reports them (output `CAPABILITIES`), and the pipeline
degrades explicitly where one is missing, saying so in the result's `info.not_applied`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class EngineCapabilities:
    # decoding outputs
    scores: bool = True  # avg_logprob per hypothesis: temperature fallback on log-prob, silence rule
    no_speech_prob: bool = True  # <|nospeech|> probability at the first step: the silence rule
    language_probabilities: bool = True  # a distribution over the language tokens (not a top-k guess)
    timestamp_rules: bool = True  # openai-whisper's timestamp rules while decoding with timestamps
    suppress_blank: bool = True  # no blank / suppressed tokens at the first step
    word_timestamps: bool = False  # cross-attention alignment of given tokens (`align`)
    encoder_reuse: bool = False  # `encode` once, then detect / generate / align on its output
    max_beam_size: int = 16
    max_batch_size: int = 1  # windows one request to the serving model may carry (its Triton max_batch_size)
    # windows the engine decodes in flight, each joining between decoder steps (TensorRT-LLM's executor);
    # 0: it decodes one batch at a time (CTranslate2), and callers batch windows themselves
    in_flight_windows: int = 0
    # a multilingual prompt without a language token gets its language chosen at the sot step of the
    # decoding request itself (one encoder pass per window); the hypothesis carries the language probabilities
    language_in_decode: bool = False
    decoding_options: tuple[str, ...] = ("beam_size", "max_new_tokens", "temperature", "repetition_penalty",
                                         "patience", "length_penalty")
    # the model behind the engine
    multilingual: bool = False
    translate: bool = False  # large-v3-turbo and English-only models were not trained to translate
    n_mels: int = 80
    engine: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # capability -> why it is missing, for users

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "EngineCapabilities":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "decoding_options" in values:
            values["decoding_options"] = tuple(values["decoding_options"])
        return cls(**values)

    def missing_reason(self, capability: str) -> str:
        return self.notes.get(capability, f"the {self.engine or 'serving'} engine does not provide {capability}")


@dataclass(frozen=True)
class SpecialTokens:
    """The special-token ids an engine needs, read once from the model's tokenizer and handed to
    the engine, so no engine builds a tokenizer of its own."""

    sot: int
    eot: int
    no_timestamps: int
    no_speech: int
    transcribe: int
    translate: int
    sot_prev: int
    language_ids: dict[str, int] = field(default_factory=dict)  # code -> token id, in vocabulary order

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1
