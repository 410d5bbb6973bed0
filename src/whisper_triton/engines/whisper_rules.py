"""Whisper's decoding rules as pure functions over one step's logits and the tokens sampled so far.

TensorRT-LLM knows nothing of Whisper: its runtime samples from whatever logits the decoder gives.
openai-whisper's `DecodingTask` (whisper/decoding.py, openai-whisper 20250625) adds, at every step:
`SuppressBlank`, `SuppressTokens` and `ApplyTimestampRules` (in that order), reads the
`<|nospeech|>` probability at the `<|startoftranscript|>` position of the first forward pass, and
detects the language as a softmax over the language tokens only. These functions do the same on
numpy arrays, so the TensorRT-LLM engine can apply them through the runtime's per-step logits hook
(`ModelRunnerCpp.from_dir(logits_processor_map=...)`) and tests can hold them against openai's
own classes. Nothing here imports torch.

Arrays are `[rows, vocab]` float logits (one row per beam), changed in place. A history is the list
of tokens a row has sampled after the prompt (openai's `tokens[k, sample_begin:]`).

How one request runs on the runtime (`RequestState.step`): the decoder prompt is sent only up to
`<|startoftranscript|>`, and the rest of the start sequence (language, task, `<|notimestamps|>`) is
forced over the first steps. The first step then sees the logits at the sot position, which gives
the no-speech probability and the language distribution exactly where openai reads them; forced
steps cost one decoder step each and add nothing to the scores (their log-probability is 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEG_INF = -np.inf
MAX_INITIAL_TIMESTAMP_INDEX = 50  # openai's max_initial_timestamp=1.0 s at 0.02 s per timestamp token
_TOP_KEPT = 8  # per step and beam: log-probabilities kept for the likeliest next tokens


@dataclass(frozen=True)
class RuleTokens:
    """The token ids the rules need, read once from the model's tokenizer."""

    eot: int
    sot: int
    no_timestamps: int
    timestamp_begin: int
    no_speech: int | None
    blank: tuple[int, ...]  # tokenizer.encode(" ") + [eot]: what SuppressBlank forbids at the first step
    suppress: tuple[int, ...]  # always forbidden: the model's non-speech tokens and the task/start specials
    language_ids: tuple[int, ...]  # in the order of `language_codes`
    language_codes: tuple[str, ...]
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int,
                       model_suppress: list[int] | tuple[int, ...] = ()) -> "RuleTokens":
        """`vocab_size`: the model's (its logits' width; tokenizer.json lacks the timestamp tokens).
        `model_suppress`: the model's own suppress list (config.json `suppress_ids`), openai's "-1"."""
        specials = [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev]
        sot_lm = tokenizer.tokenizer.token_to_id("<|startoflm|>")
        if sot_lm is not None:
            specials.append(sot_lm)
        try:
            no_speech = tokenizer.no_speech
        except KeyError:
            no_speech = None
        if no_speech is not None:
            specials.append(no_speech)  # its probability is collected separately, never sampled
        codes = tuple(tokenizer.language_ids)
        return cls(
            eot=tokenizer.eot,
            sot=tokenizer.sot,
            no_timestamps=tokenizer.no_timestamps,
            timestamp_begin=tokenizer.timestamp_begin,
            no_speech=no_speech,
            blank=tuple(tokenizer.encode(" ")) + (tokenizer.eot,),
            suppress=tuple(sorted({int(t) for t in model_suppress if int(t) >= 0} | set(specials))),
            language_ids=tuple(tokenizer.language_ids[code] for code in codes),
            language_codes=codes,
            vocab_size=int(vocab_size),
        )


# ---- the rules (pure, in place) -----------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, as openai computes it (`F.log_softmax(logits.float())`).

    Rows of -inf except one finite value stay finite there (0).
    """
    values = np.asarray(logits, dtype=np.float32)
    top = np.max(values, axis=-1, keepdims=True)
    shifted = values - top
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def suppress_blank(logits: np.ndarray, histories: list[list[int]], tokens: RuleTokens) -> None:
    """openai SuppressBlank: no blank and no <|endoftext|> as the first sampled token."""
    for row, history in enumerate(histories):
        if not history:
            logits[row, list(tokens.blank)] = NEG_INF


def suppress_tokens(logits: np.ndarray, ids: tuple[int, ...] | list[int]) -> None:
    """openai SuppressTokens: these ids are never sampled."""
    if len(ids):
        logits[:, list(ids)] = NEG_INF


def apply_timestamp_rules(logits: np.ndarray, histories: list[list[int]], tokens: RuleTokens,
                          max_initial_timestamp_index: int | None = MAX_INITIAL_TIMESTAMP_INDEX) -> None:
    """openai ApplyTimestampRules, row by row.

    <|notimestamps|> is never sampled; timestamps come in pairs (except right before <|endoftext|>);
    they never decrease and every segment has a nonzero length; the first token is a timestamp no
    later than `max_initial_timestamp_index`; and when the timestamps' summed probability beats every
    text token, a timestamp is sampled.
    """
    ts = tokens.timestamp_begin
    logits[:, tokens.no_timestamps] = NEG_INF
    for row, history in enumerate(histories):
        last_was_timestamp = len(history) >= 1 and history[-1] >= ts
        penultimate_was_timestamp = len(history) < 2 or history[-2] >= ts
        if last_was_timestamp:
            if penultimate_was_timestamp:
                logits[row, ts:] = NEG_INF  # a pair is closed: text next
            else:
                logits[row, : tokens.eot] = NEG_INF  # a segment is open: its end timestamp or eot
        stamps = [token for token in history if token >= ts]
        if stamps:
            last = stamps[-1] if (last_was_timestamp and not penultimate_was_timestamp) else stamps[-1] + 1
            logits[row, ts:last] = NEG_INF
        if not history:
            logits[row, :ts] = NEG_INF
            if max_initial_timestamp_index is not None:
                logits[row, ts + max_initial_timestamp_index + 1:] = NEG_INF
    logprobs = log_softmax(logits)
    for row in range(logits.shape[0]):
        timestamp_logprob = _logsumexp(logprobs[row, ts:])
        if timestamp_logprob > np.max(logprobs[row, :ts]):
            logits[row, :ts] = NEG_INF


def _logsumexp(values: np.ndarray) -> float:
    top = np.max(values)
    if not np.isfinite(top):
        return float(top)
    return float(top + np.log(np.sum(np.exp(values - top))))


def no_speech_probability(sot_logits: np.ndarray, tokens: RuleTokens) -> float | None:
    """P(<|nospeech|>) from the logits at the <|startoftranscript|> position (softmax over the vocabulary)."""
    if tokens.no_speech is None:
        return None
    return float(np.exp(log_softmax(np.asarray(sot_logits)[None, : tokens.vocab_size])[0, tokens.no_speech]))


def language_probabilities(sot_logits: np.ndarray, tokens: RuleTokens) -> dict[str, float]:
    """openai's detect_language: softmax over the language tokens only, most likely first."""
    values = np.asarray(sot_logits, dtype=np.float64)[list(tokens.language_ids)]
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    return {tokens.language_codes[i]: float(probs[i]) for i in order}


def apply_rules(logits: np.ndarray, histories: list[list[int]], tokens: RuleTokens, *, timestamps: bool,
                blank: bool, max_initial_timestamp_index: int | None = MAX_INITIAL_TIMESTAMP_INDEX) -> None:
    """All of openai's logit filters, in DecodingTask's order."""
    if blank:
        suppress_blank(logits, histories, tokens)
    suppress_tokens(logits, tokens.suppress)
    if timestamps:
        apply_timestamp_rules(logits, histories, tokens, max_initial_timestamp_index)


# ---- one request on the runtime --------------------------------------------------------------
@dataclass(frozen=True)
class RequestPlan:
    """How one request is decoded: what is forced after the sent prompt and which rules apply."""

    forced: tuple[int, ...] = ()  # the start-sequence tokens after <|startoftranscript|>
    timestamps: bool = False  # no <|notimestamps|> in the prompt: the timestamp rules apply
    suppress_blank: bool = True
    max_initial_timestamp_index: int | None = MAX_INITIAL_TIMESTAMP_INDEX
    detect_only: bool = False  # a language-detection request: read the sot step, apply nothing


def split_prompt(prompt: list[int], sot: int) -> tuple[list[int], tuple[int, ...]]:
    """A Whisper prompt -> (the part up to and including <|startoftranscript|>, the rest to force)."""
    if sot not in prompt:
        return list(prompt), ()
    cut = prompt.index(sot) + 1
    return list(prompt[:cut]), tuple(prompt[cut:])


@dataclass
class RequestState:
    """What the logits hook keeps for one request across its steps, and what it measured."""

    plan: RequestPlan
    tokens: RuleTokens
    no_speech_prob: float | None = None
    language_probs: dict[str, float] | None = None
    steps: int = 0
    _cum: dict[tuple[int, ...], float] = field(default_factory=lambda: {(): 0.0})
    _eot: dict[tuple[int, ...], float] = field(default_factory=dict)
    _last_rows: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    _top: dict[tuple[int, ...], dict[int, float]] = field(default_factory=dict)

    def step(self, logits: np.ndarray, histories: list[list[int]]) -> None:
        """One decoding step: `logits` [rows, vocab] for the rows' `histories` (tokens after the sent prompt).

        Records the sot-position measurements at the first step, forces the start sequence, applies
        openai's filters, and keeps the log-probabilities of the filtered distribution (openai's
        `sum_logprobs` is over the filtered logits, without temperature).
        """
        self.steps += 1
        if self.steps == 1:
            first = logits[0]
            self.no_speech_prob = no_speech_probability(first, self.tokens)
            self.language_probs = language_probabilities(first, self.tokens)
        if self.plan.detect_only:
            return
        forced = self.plan.forced
        free_rows, free_histories = [], []
        for row, history in enumerate(histories):
            if len(history) < len(forced):
                token = forced[len(history)]
                logits[row, :] = NEG_INF
                logits[row, token] = 0.0
                continue
            free_rows.append(row)
            free_histories.append(list(history[len(forced):]))
        if not free_rows:
            return
        block = logits[free_rows]
        apply_rules(block, free_histories, self.tokens, timestamps=self.plan.timestamps,
                    blank=self.plan.suppress_blank, max_initial_timestamp_index=self.plan.max_initial_timestamp_index)
        logits[free_rows] = block
        rows = log_softmax(block)
        previous = self._last_rows
        self._last_rows = {}
        for sampled, row_logprobs in zip(free_histories, rows):
            key = tuple(sampled)
            if key and key not in self._cum:
                parent = key[:-1]
                if parent in self._cum and parent in previous:
                    self._cum[key] = self._cum[parent] + float(previous[parent][key[-1]])
            self._last_rows[key] = row_logprobs
            self._eot[key] = float(row_logprobs[self.tokens.eot])
            # the few likeliest next tokens, so a sequence cut short later still gets its last token's score
            top = np.argpartition(-row_logprobs, _TOP_KEPT)[:_TOP_KEPT]
            self._top[key] = {int(t): float(row_logprobs[t]) for t in top}

    def sum_logprob(self, sampled: list[int], ended: bool) -> float | None:
        """openai's sum_logprob of one returned sequence (its tokens after the forced ones, eot excluded).

        `ended`: the sequence stopped on <|endoftext|>, whose log-probability counts (as in openai);
        otherwise it stopped at the length limit and its last token's log-probability comes from the
        last step's rows.
        """
        key = tuple(sampled)
        if ended:
            if key in self._cum and key in self._eot:
                return self._cum[key] + self._eot[key]
            return None
        if key in self._cum:
            return self._cum[key]
        parent = key[:-1]
        if key and parent in self._cum:
            if parent in self._last_rows:
                return self._cum[parent] + float(self._last_rows[parent][key[-1]])
            if key[-1] in self._top.get(parent, {}):
                return self._cum[parent] + self._top[parent][key[-1]]
        return None
