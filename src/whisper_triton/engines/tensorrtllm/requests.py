"""What crosses the TensorRT-LLM runtime boundary, as plain data: engine limits, one executor request per
window (its sent prompt, the start sequence the rules force, its token budget, its sampling), and the
executor's output tokens parsed back. Pure Python and numpy; `engine.py` turns these into
`tensorrt_llm.bindings.executor` objects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...contract.engine_manifest import EngineManifest
from ...pipeline.tokenizer import MAX_PROMPT_TOKENS
from ..base import MAX_NEW_TOKENS, DecodeOptions
from ..whisper_rules import RequestPlan, split_prompt
from .rules import AUTO_LANGUAGE

logger = logging.getLogger(__name__)

_POSITIONS = 448  # Whisper decoder positions (n_text_ctx): prompt + generated tokens must fit
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


# ---- one window, one executor request ----------------------------------------------------------------
@dataclass(frozen=True)
class PromptTokens:
    """The special tokens a request is built from (the model's tokenizer)."""

    sot: int
    sot_prev: int
    eot: int
    no_timestamps: int
    transcribe: int
    translate: int
    language_ids: frozenset[int]
    multilingual: bool


@dataclass
class WindowRequest:
    """What the executor gets for one window, as plain data."""

    sent: list[int]  # decoder input ids: up to and including <|startoftranscript|>
    plan: RequestPlan  # what the rules force after it (AUTO_LANGUAGE: the sot step's language) and apply
    max_new_tokens: int  # the forced tokens count among them
    output_max: int  # new tokens a hypothesis may keep (forced ones not counted)
    sampling: dict  # SamplingConfig keywords
    features: np.ndarray  # [frames, n_mels], float16 or float32 (cast to the engine's dtype on the way)
    encoder_output_length: int  # frames // 2 (Whisper's stride-2 conv)
    auto_language: bool = False


def sampling_settings(options: DecodeOptions) -> dict:
    """DecodeOptions -> `SamplingConfig` keywords (names of the v0.17.0 backend's SamplingConfig call).

    Greedy: top_k 1. Temperature > 0 samples from the whole distribution (top_k 0, top_p 1.0), as CTranslate2
    and openai-whisper do. One beam always: beam search is refused while the rules run (rules.py says why).
    """
    settings = {"beam_width": 1, "repetition_penalty": float(options.repetition_penalty)}
    if options.temperature > 0:
        settings.update(temperature=float(options.temperature), top_k=0, top_p=1.0)
    else:
        settings.update(top_k=1)
    return settings


def window_features(window: np.ndarray, dtype: str = "float16") -> np.ndarray:
    """[n_mels, frames] log-mel -> contiguous [frames, n_mels] (the executor's layout); float16 engines get float16,
    bfloat16 (which numpy lacks) and float32 engines get float32 cast on the way."""
    return np.ascontiguousarray(window.T, dtype=np.float16 if dtype == "float16" else np.float32)


def needs_language(prompt: list[int], tokens: PromptTokens) -> bool:
    """A multilingual prompt whose start sequence holds no language token: the sot step chooses it."""
    if not tokens.multilingual or tokens.sot not in prompt:
        return False
    after = prompt[prompt.index(tokens.sot) + 1:]
    return bool(after) and after[0] in (tokens.transcribe, tokens.translate)


def build_window_request(window: np.ndarray, prompt: list[int], options: DecodeOptions, *, tokens: PromptTokens,
                         limits: EngineLimits, feature_dtype: str = "float16") -> WindowRequest:
    """One window's executor request, checked against the engine's limits.

    The prompt is sent up to <|startoftranscript|>; the rest of the start sequence (language, task,
    <|notimestamps|>) is forced by the rules processor over the first steps, so its first step is the sot
    position where openai reads the no-speech probability and the language. A multilingual prompt without a
    language token after <|startoftranscript|> asks for auto language: the sot step picks it.
    """
    frames = int(window.shape[-1])
    if frames > limits.max_input_frames or frames % 2:
        raise ValueError(f"features have {frames} frames; the encoder takes an even number up to "
                         f"{limits.max_input_frames}.")
    forced_len = len(prompt) - prompt.index(tokens.sot) - 1 if tokens.sot in prompt else 0
    fitted = fit_prompt(prompt, limits.max_prompt_len + forced_len, tokens.sot, tokens.sot_prev)
    sent, forced = split_prompt(fitted, tokens.sot)
    auto = needs_language(fitted, tokens)
    if auto:
        forced = (AUTO_LANGUAGE,) + tuple(forced)
    if len(sent) > limits.max_prompt_len:
        raise ValueError(f"a {len(sent)}-token prompt is above the engine's max_prompt_len {limits.max_prompt_len}.")
    output_max = min(options.max_new_tokens, MAX_NEW_TOKENS, limits.max_seq_len - len(sent) - len(forced))
    if output_max < 1:
        raise ValueError(f"a {len(sent) + len(forced)}-token prompt leaves no room for new tokens in "
                         f"{limits.max_seq_len}.")
    plan = RequestPlan(forced=tuple(forced), timestamps=tokens.no_timestamps not in forced,
                       suppress_blank=options.suppress_blank)
    return WindowRequest(sent=sent, plan=plan, max_new_tokens=int(output_max + len(forced)), output_max=int(output_max),
                         sampling=sampling_settings(options), features=window_features(window, feature_dtype),
                         encoder_output_length=frames // 2, auto_language=auto)


def build_detect_request(window: np.ndarray, *, sot: int, limits: EngineLimits,
                         feature_dtype: str = "float16") -> WindowRequest:
    """Language detection alone: <|startoftranscript|>, one step, read at the sot position (openai's rule)."""
    frames = int(window.shape[-1])
    if frames > limits.max_input_frames or frames % 2:
        raise ValueError(f"features have {frames} frames; the encoder takes an even number up to "
                         f"{limits.max_input_frames}.")
    return WindowRequest(sent=[sot], plan=RequestPlan(detect_only=True), max_new_tokens=1, output_max=0,
                         sampling={"beam_width": 1, "top_k": 1}, features=window_features(window, feature_dtype),
                         encoder_output_length=frames // 2)


# ---- output parsing (pure) ---------------------------------------------------------------------
def new_tokens(sequence: list[int], prompt: list[int], eot: int, length: int | None = None) -> list[int]:
    """Generated tokens of one sequence: prompt removed (if echoed), cut at the first eot and padding."""
    sequence = list(sequence[:length] if length is not None else sequence)
    if sequence[: len(prompt)] == list(prompt):
        sequence = sequence[len(prompt):]
    if eot in sequence:
        sequence = sequence[: sequence.index(eot)]
    return [int(token) for token in sequence]


def parse_window_output(output_ids: list[int], request: WindowRequest, tokens: PromptTokens
                        ) -> tuple[list[int], list[int], bool]:
    """One window's output tokens -> (forced tokens as decoded, kept new tokens, ended on <|endoftext|>).

    The prompt is removed when echoed, the output cut at the first eot; the forced start sequence is checked
    (the rules processor was applied) and removed. A request that stopped before its token budget ended on eot
    (the executor leaves the end token out of the output).
    """
    raw = list(output_ids)
    if raw[: len(request.sent)] == list(request.sent):
        raw = raw[len(request.sent):]
    generated = new_tokens(raw, [], tokens.eot)
    ended = tokens.eot in raw or len(raw) < request.max_new_tokens
    forced = request.plan.forced
    seen = generated[: len(forced)]
    expected_ok = len(seen) == len(forced) and all(
        (token in tokens.language_ids) if want == AUTO_LANGUAGE else token == want for token, want in zip(seen, forced))
    if forced and not expected_ok and not (ended and len(seen) < len(forced)):
        raise RuntimeError(
            "The executor did not decode the forced start sequence: the Whisper logits processor was not applied. "
            "Check that ExecutorConfig.logits_post_processor_config has processor_batched and each Request names "
            "Request.BATCHED_POST_PROCESSOR_NAME.")
    kept = generated[len(forced):]
    if len(kept) > request.output_max:
        kept, ended = kept[: request.output_max], False
    return seen, kept, ended


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


