"""What crosses the TensorRT-LLM runtime boundary, as plain data: engine limits, requests built from
windows and prompts, and the runtime's outputs parsed back into hypotheses. Pure Python and numpy.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...contract.engine_manifest import EngineManifest
from ...pipeline.tokenizer import MAX_PROMPT_TOKENS
from ..base import MAX_NEW_TOKENS, DecodeOptions, Hypothesis
from ..whisper_rules import RequestPlan, RequestState, split_prompt

logger = logging.getLogger(__name__)

_POSITIONS = 448  # Whisper decoder positions (n_text_ctx): prompt + generated tokens must fit
_LANGUAGE_BEAMS = 4  # top-k first tokens read for language detection without the hook (fallback parsing)
PREVIOUS_TEXT_BUDGET = MAX_PROMPT_TOKENS  # openai keeps up to n_text_ctx // 2 - 1 = 223 previous-text tokens
# decoder input a build needs for the full budget: <|startofprev|> + 223 + <|startoftranscript|>
# (the rest of the start sequence is forced by the logits hook and counts as generated tokens)
FULL_PROMPT_LEN = PREVIOUS_TEXT_BUDGET + 2


# ---- limits and compatibility -------------------------------------------------------------------
@dataclass(frozen=True)
class EngineLimits:
    """What the built engines accept; requests are shaped to stay inside these."""

    max_batch_size: int
    max_beam_width: int
    max_input_frames: int  # encoder input: mel frames (3000 for 30 s)
    max_prompt_len: int  # decoder input tokens
    max_seq_len: int  # decoder prompt + new tokens
    n_mels: int


def engine_limits(manifest: EngineManifest, decoder_config: dict | None = None,
                  encoder_config: dict | None = None) -> EngineLimits:
    """Limits from the manifest's build config, narrowed by the engines' own config.json where present."""
    build = manifest.build
    decoder_build = (decoder_config or {}).get("build_config", {}) or {}
    encoder_build = (encoder_config or {}).get("build_config", {}) or {}
    max_seq_len = decoder_build.get("max_seq_len") or build.max_prompt_len + build.max_output_len
    return EngineLimits(
        max_batch_size=int(decoder_build.get("max_batch_size") or build.max_batch_size),
        max_beam_width=int(decoder_build.get("max_beam_width") or build.max_beam_width),
        max_input_frames=int(encoder_build.get("max_input_len") or 3000),
        max_prompt_len=int(decoder_build.get("max_input_len") or build.max_prompt_len),
        max_seq_len=min(int(max_seq_len), _POSITIONS),
        # the encoder engine's own n_mels first (the checkpoint's), then the manifest's build
        n_mels=int(((encoder_config or {}).get("pretrained_config") or {}).get("n_mels") or build.n_mels or 128),
    )



# ---- what crosses the runtime boundary ---------------------------------------------------------
@dataclass
class RuntimeRequest:
    """One `ModelRunnerCpp.generate` call, as plain data."""

    prompts: list[list[int]]  # decoder input ids per request (up to <|startoftranscript|> when the hook forces)
    features: list[np.ndarray]  # per request [frames, n_mels]: float16, or float32 to be cast to `feature_dtype`
    encoder_output_lengths: list[int]  # per request, frames // 2
    max_new_tokens: int
    end_id: int
    pad_id: int
    sampling: dict  # generate() keyword arguments: num_beams, temperature, top_k, top_p, penalties
    bad_words: list[list[list[int]]] | None = None  # per request: words, each a token list
    feature_dtype: str = "float16"
    forced: list[tuple[int, ...]] | None = None  # per request: start-sequence tokens the hook forces
    plans: list[RequestPlan] | None = None  # per request: the rules the hook applies
    output_max_tokens: int | None = None  # new tokens a hypothesis may keep (forced ones not counted)


@dataclass
class RuntimeOutput:
    """What `generate(return_dict=True, ...)` gives back, as plain data."""

    output_ids: list[list[list[int]]]  # [B][beams][tokens], maybe padded with end_id, maybe with the prompt
    sequence_lengths: list[list[int]] | None = None  # [B][beams]
    cum_log_probs: list[list[float]] | None = None  # [B][beams]
    generation_logits: np.ndarray | None = None  # [B, beams, steps, vocab] when the engine gathers them
    states: list[RequestState | None] | None = None  # what the logits hook measured, per request
    extra: dict = field(default_factory=dict)


# ---- request building (pure) -------------------------------------------------------------------
def feature_tensors(features: np.ndarray, dtype: str = "float16") -> list[np.ndarray]:
    """[B, n_mels, frames] log-mel -> B contiguous [frames, n_mels] arrays (the runtime's layout).

    float16 engines get float16 arrays; bfloat16 (which numpy lacks) and float32 engines get float32
    arrays that `_run` casts on the device.
    """
    numpy_dtype = np.float16 if dtype == "float16" else np.float32
    return [np.ascontiguousarray(window.T, dtype=numpy_dtype) for window in features]


def encoder_output_lengths(features: np.ndarray) -> list[int]:
    """Encoder output length per window: Whisper's second conv has stride 2."""
    return [int(features.shape[2]) // 2] * int(features.shape[0])


def sampling_settings(options: DecodeOptions) -> dict:
    """DecodeOptions -> TensorRT-LLM sampling keywords.

    Greedy: top_k 1. Beam search: num_beams > 1 with length_penalty. Temperature > 0 samples from the
    whole distribution (top_k 0, top_p 1.0) with one beam, as CTranslate2 and openai-whisper do.
    `patience` has no TensorRT-LLM equivalent (beam search stops at beam_width finished hypotheses,
    which is patience 1.0); `suppress_blank` is applied by the logits hook.
    """
    settings = {"repetition_penalty": float(options.repetition_penalty)}
    if options.temperature > 0:
        settings.update(num_beams=1, temperature=float(options.temperature), top_k=0, top_p=1.0)
    elif options.beam_size > 1:
        settings.update(num_beams=int(options.beam_size), length_penalty=float(options.length_penalty))
    else:
        settings.update(num_beams=1, top_k=1)
    return settings


def fit_prompt(prompt: list[int], max_len: int, sot: int, sot_prev: int,
               previous_budget: int = PREVIOUS_TEXT_BUDGET) -> list[int]:
    """Shorten the previous-text part of a prompt (oldest tokens first) to openai's budget and the engine."""
    if prompt and prompt[0] == sot_prev and sot in prompt:
        start = prompt.index(sot)
        if start - 1 > previous_budget:
            prompt = prompt[:1] + prompt[start - previous_budget:]
    if len(prompt) <= max_len:
        return list(prompt)
    if prompt and prompt[0] == sot_prev and sot in prompt:
        start = prompt.index(sot)
        head, previous, tail = prompt[:1], prompt[1:start], prompt[start:]
        keep = max_len - len(head) - len(tail)
        if keep >= 0:
            return head + (previous[len(previous) - keep:] if keep else []) + tail
    raise ValueError(
        f"The decoder prompt has {len(prompt)} tokens but the engine takes at most {max_len}: rebuild the "
        f"decoder with a larger max_prompt_len (at least {FULL_PROMPT_LEN} for openai's previous-text budget)."
    )


def request_plan(forced: tuple[int, ...], no_timestamps: int, options: DecodeOptions) -> RequestPlan:
    """The rules for one request: timestamps are decoded when <|notimestamps|> is not in its prompt."""
    return RequestPlan(forced=forced, timestamps=no_timestamps not in forced, suppress_blank=options.suppress_blank)


def build_generate_request(features: np.ndarray, prompts: list[list[int]], options: DecodeOptions, *,
                           eot: int, sot: int, sot_prev: int, limits: EngineLimits,
                           suppress_tokens: list[int] | None = None, feature_dtype: str = "float16",
                           no_timestamps: int | None = None) -> RuntimeRequest:
    """Everything `generate` needs for one batch, checked against the engine's limits.

    With `no_timestamps` given, the logits hook runs: each prompt is sent up to
    <|startoftranscript|> and the rest is forced (so those tokens count against the new tokens), and
    the suppressed tokens are the hook's (no bad_words: the runtime applies those after the hook,
    where the scores would not see them). Without it, the full prompts are sent and `suppress_tokens`
    become bad_words.
    """
    frames = int(features.shape[2])
    if frames > limits.max_input_frames or frames % 2:
        raise ValueError(
            f"features have {frames} frames; the encoder takes an even number up to {limits.max_input_frames}."
        )
    fitted = [fit_prompt(prompt, limits.max_prompt_len + _forced_len(prompt, sot, no_timestamps), sot, sot_prev)
              for prompt in prompts]
    if no_timestamps is not None:
        split = [split_prompt(prompt, sot) for prompt in fitted]
        sent = [head for head, _ in split]
        forced = [rest for _, rest in split]
    else:
        sent, forced = fitted, [() for _ in fitted]
    too_long = [len(prompt) for prompt in sent if len(prompt) > limits.max_prompt_len]
    if too_long:
        raise ValueError(
            f"a {max(too_long)}-token prompt is above the engine's max_prompt_len {limits.max_prompt_len}.")
    longest = max(len(prompt) + len(rest) for prompt, rest in zip(sent, forced))
    output_max = min(options.max_new_tokens, MAX_NEW_TOKENS, limits.max_seq_len - longest)
    if output_max < 1:
        raise ValueError(f"a {longest}-token prompt leaves no room for new tokens in {limits.max_seq_len}.")
    extra = max(len(rest) for rest in forced)
    max_new_tokens = min(output_max + extra, limits.max_seq_len - max(len(prompt) for prompt in sent))
    bad_words = None
    if suppress_tokens and no_timestamps is None:
        words = [[int(token)] for token in suppress_tokens]
        bad_words = [words for _ in sent]
    plans = [request_plan(rest, no_timestamps, options) for rest in forced] if no_timestamps is not None else None
    return RuntimeRequest(
        prompts=sent,
        features=feature_tensors(features, feature_dtype),
        encoder_output_lengths=encoder_output_lengths(features),
        max_new_tokens=int(max_new_tokens),
        end_id=eot,
        pad_id=eot,
        sampling=sampling_settings(options),
        bad_words=bad_words,
        feature_dtype=feature_dtype,
        forced=forced if no_timestamps is not None else None,
        plans=plans,
        output_max_tokens=int(output_max),
    )


def _forced_len(prompt: list[int], sot: int, no_timestamps: int | None) -> int:
    """Tokens after <|startoftranscript|> that the hook forces (and so need no room in max_prompt_len)."""
    if no_timestamps is None or sot not in prompt:
        return 0
    return len(prompt) - prompt.index(sot) - 1


def build_language_request(features: np.ndarray, *, sot: int, eot: int, limits: EngineLimits,
                           feature_dtype: str = "float16", hook: bool = False) -> RuntimeRequest:
    """<|startoftranscript|> alone, one new token.

    With the hook, one greedy step whose logits at the sot position give a softmax over the language
    tokens (openai's rule). Without, beam search over a few beams yields the top first tokens.
    """
    beams = 1 if hook else max(1, min(_LANGUAGE_BEAMS, limits.max_beam_width))
    sampling = {"num_beams": beams, "repetition_penalty": 1.0}
    if beams == 1:
        sampling["top_k"] = 1
    return RuntimeRequest(
        prompts=[[sot] for _ in range(features.shape[0])],
        features=feature_tensors(features, feature_dtype),
        encoder_output_lengths=encoder_output_lengths(features),
        max_new_tokens=1,
        end_id=eot,
        pad_id=eot,
        sampling=sampling,
        feature_dtype=feature_dtype,
        plans=[RequestPlan(detect_only=True) for _ in range(features.shape[0])] if hook else None,
    )


# ---- output parsing (pure) ---------------------------------------------------------------------
def new_tokens(sequence: list[int], prompt: list[int], eot: int, length: int | None = None) -> list[int]:
    """Generated tokens of one sequence: prompt removed (if echoed), cut at the first eot and padding."""
    sequence = list(sequence[:length] if length is not None else sequence)
    if sequence[: len(prompt)] == list(prompt):
        sequence = sequence[len(prompt):]
    if eot in sequence:
        sequence = sequence[: sequence.index(eot)]
    return [int(token) for token in sequence]


def parse_generate_output(output: RuntimeOutput, prompts: list[list[int]], eot: int, max_new_tokens: int,
                          forced: list[tuple[int, ...]] | None = None,
                          request_max_new_tokens: int | None = None) -> list[Hypothesis]:
    """The best beam of each request as a Hypothesis.

    Scores: the logits hook's (openai's sum of log-probabilities of the filtered distribution) where it
    ran, else the runtime's cum_log_probs where it gave them. The forced start-sequence tokens are
    checked and removed.
    """
    if len(output.output_ids) != len(prompts):
        raise RuntimeError(f"the runtime returned {len(output.output_ids)} results for {len(prompts)} requests")
    hypotheses = []
    for index, (beams, prompt) in enumerate(zip(output.output_ids, prompts)):
        length = output.sequence_lengths[index][0] if output.sequence_lengths else None
        generated = new_tokens(beams[0], prompt, eot, length)
        raw = list(beams[0][:length] if length is not None else beams[0])[len(prompt):]
        ended = eot in raw or (request_max_new_tokens is not None and len(raw) < request_max_new_tokens)
        rest = tuple(forced[index]) if forced else ()
        if rest:
            if tuple(generated[: len(rest)]) != rest:
                raise RuntimeError(
                    "The runtime did not decode the forced start sequence: the logits processors were not applied. "
                    "Check that ModelRunnerCpp.from_dir got logits_processor_map and generate got "
                    "logits_processor_names (TensorRT-LLM's logits post-processor needs the C++ runtime)."
                )
            generated = generated[len(rest):]
        tokens = generated[:max_new_tokens]
        if len(tokens) < len(generated):
            ended = False
        state = output.states[index] if output.states else None
        sum_logprob = state.sum_logprob(tokens, ended) if state is not None else None
        if sum_logprob is None and output.cum_log_probs is not None and state is None:
            sum_logprob = float(output.cum_log_probs[index][0])
        avg_logprob = sum_logprob / (len(tokens) + 1) if sum_logprob is not None else None
        hypotheses.append(Hypothesis(tokens=tokens, sum_logprob=sum_logprob, avg_logprob=avg_logprob,
                                     no_speech_prob=state.no_speech_prob if state is not None else None))
    return hypotheses


def _normalised(scores: dict[str, float]) -> dict[str, float]:
    """log-scores -> probabilities summing to 1, most likely first."""
    top = max(scores.values())
    weights = {code: math.exp(score - top) for code, score in scores.items()}
    total = sum(weights.values())
    return dict(sorted(((code, w / total) for code, w in weights.items()), key=lambda item: -item[1]))


def parse_language_output(output: RuntimeOutput, prompts: list[list[int]], eot: int,
                          language_by_id: dict[int, str], default: str = "en") -> list[dict[str, float]]:
    """Language probabilities per window.

    From the logits hook: its softmax over the language tokens at the sot position (openai's rule).
    With generation logits: the same softmax over the first step's logits. Without either: the first
    new token of each beam with its log-probability, normalised over the languages seen; a window
    whose beams hold no language token gets `{default: 1.0}`.
    """
    results = []
    language_ids = np.array(sorted(language_by_id), dtype=np.int64)
    for index, (beams, prompt) in enumerate(zip(output.output_ids, prompts)):
        state = output.states[index] if output.states else None
        if state is not None and state.language_probs:
            results.append(dict(state.language_probs))
            continue
        if output.generation_logits is not None:
            logits = np.asarray(output.generation_logits[index][0][0], dtype=np.float64)
            results.append(_normalised({language_by_id[int(i)]: float(logits[i]) for i in language_ids}))
            continue
        scores: dict[str, float] = {}
        for beam, sequence in enumerate(beams):
            length = output.sequence_lengths[index][beam] if output.sequence_lengths else None
            generated = new_tokens(sequence, prompt, eot=-1, length=length)
            if not generated or generated[0] not in language_by_id:
                continue
            score = float(output.cum_log_probs[index][beam]) if output.cum_log_probs is not None else -float(beam)
            code = language_by_id[generated[0]]
            scores[code] = max(score, scores.get(code, -math.inf))
        if not scores:
            logger.warning("language detection found no language token in window %d; using %r", index, default)
            scores = {default: 0.0}
        results.append(_normalised(scores))
    return results


def read_suppress_tokens(model_dir: Path) -> list[int]:
    """The model's always-suppressed tokens, from CTranslate2's or Hugging Face's config file."""
    config = model_dir / "config.json"
    if config.is_file():
        ids = json.loads(config.read_text()).get("suppress_ids")
        if ids:
            return [int(i) for i in ids]
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        ids = json.loads(generation.read_text()).get("suppress_tokens")
        if ids:
            return [int(i) for i in ids]
    return []


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


