"""TensorRT-LLM Whisper engine (NVIDIA GPU), on the C++ encoder-decoder runtime of the pinned release.

Written against TensorRT-LLM's `ModelRunnerCpp` (see `release.TENSORRT_LLM_VERSION`): `from_dir(...,
is_enc_dec=True)` loads `<engine_dir>/encoder` and `<engine_dir>/decoder` into one in-flight-batching
executor, and `generate(...)` takes per-request decoder prompt ids, per-request encoder input features
`[frames, n_mels]` (in the encoder engine's dtype) and encoder output lengths (frames // 2, after
Whisper's stride-2 conv).

Whisper's decoding rules (timestamp rules, suppress_blank, suppressed tokens), the no-speech
probability, language probabilities and openai-style scores come from `whisper_rules`, applied
through the runtime's per-step logits hook: `from_dir(logits_processor_map=...)` registers one
processor per batch slot, `generate(logits_processor_names=[...])` names a slot per request, and the
slot's `RequestState` sees each step's logits and token history. The prompt is sent up to
<|startoftranscript|>; the rest of the start sequence is forced by the hook, so its first step is
the sot position where openai reads the no-speech probability.

Everything around the runtime is plain Python and numpy and is unit-tested without a GPU:
request building (`build_generate_request`, `build_language_request`), output parsing
(`parse_generate_output`, `parse_language_output`), the rules, and the compatibility checks against the
engine manifest (`check_compatibility`). The code that touches `tensorrt_llm` / `torch` is
`TensorRTLLMEngine._platform`, `_load_runner`, `_run` and `TorchLogitsProcessor`; nothing here imports
them at module import time. Tests replace `ModelRunnerCpp` itself (tests/trtllm_standin.py).

The engine directory is what the project's export writes:
    manifest.json          EngineManifest (TensorRT-LLM version, GPU arch, build limits)
    encoder/  decoder/     TensorRT-LLM engines with their config.json
    tokenizer.json         the model's Whisper tokenizer
    ctranslate2/           optional: a CTranslate2 copy of the same weights, for word timestamps
    config.json            optional; `suppress_ids` (CTranslate2 convention), or
    generation_config.json optional; `suppress_tokens` (Hugging Face convention)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract.capabilities import EngineCapabilities
from ..contract.engine_manifest import EngineManifest, release_of, same_release
from ..contract.release import TENSORRT_LLM_VERSION, TRITON_IMAGE
from ..pipeline.tokenizer import MAX_PROMPT_TOKENS, WhisperTokenizer
from .base import MAX_NEW_TOKENS, DecodeOptions, Hypothesis, TokenTimings, check_batch
from .whisper_rules import RequestPlan, RequestState, RuleTokens, split_prompt

logger = logging.getLogger(__name__)

_POSITIONS = 448  # Whisper decoder positions (n_text_ctx): prompt + generated tokens must fit
_LANGUAGE_BEAMS = 4  # top-k first tokens read for language detection without the hook (fallback parsing)
PREVIOUS_TEXT_BUDGET = MAX_PROMPT_TOKENS  # openai keeps up to n_text_ctx // 2 - 1 = 223 previous-text tokens
# decoder input a build needs for the full budget: <|startofprev|> + 223 + <|startoftranscript|>
# (the rest of the start sequence is forced by the logits hook and counts as generated tokens)
FULL_PROMPT_LEN = PREVIOUS_TEXT_BUDGET + 2
FEATURE_DTYPES = ("float16", "bfloat16", "float32")
CT2_COPY_DIR = "ctranslate2"  # the export's CTranslate2 copy of the same weights, for `align`
PROCESSOR_PREFIX = "whisper_rules_"


class TensorRTLLMUnavailableError(RuntimeError):
    """tensorrt_llm / torch / a CUDA GPU is missing where the TensorRT-LLM engine was asked for."""


class EngineCompatibilityError(RuntimeError):
    """The engine on disk cannot run here (other TensorRT-LLM version, GPU arch, or too small a build)."""


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


def _release(version: str) -> str:
    """The release a version belongs to (export.manifest.release_of: '0.17.0.post1' -> '0.17.0')."""
    return release_of(version)


def check_compatibility(manifest: EngineManifest, *, runtime_version: str, gpu_arch: str,
                        max_batch_size: int | None, limits: EngineLimits) -> None:
    """Refuse, with the cause and the fix, engines that cannot run here or a batch they cannot take."""
    if not same_release(manifest.tensorrt_llm_version, runtime_version):
        raise EngineCompatibilityError(
            f"These engines were built with TensorRT-LLM {manifest.tensorrt_llm_version}, but this server runs "
            f"TensorRT-LLM {runtime_version}; TensorRT engines only load in the version that built them. "
            f"Rebuild them with the project's export inside {TRITON_IMAGE} (TensorRT-LLM {TENSORRT_LLM_VERSION}), "
            "or serve them with the image that built them."
        )
    if manifest.gpu_arch.strip().lower() != gpu_arch.strip().lower():
        raise EngineCompatibilityError(
            f"These engines were built for GPU architecture {manifest.gpu_arch}"
            f"{' (' + manifest.gpu_name + ')' if manifest.gpu_name else ''}, but this GPU is {gpu_arch}; "
            "TensorRT engines only run on the architecture they were built on. Run the export on the same "
            "instance family that serves (e.g. ml.g5 = A10G = sm_86)."
        )
    if not (manifest.build.paged_kv_cache and manifest.build.remove_input_padding):
        raise EngineCompatibilityError(
            "These engines were built without paged KV cache or without remove-input-padding; the C++ "
            "encoder-decoder runtime (in-flight batching) needs both. Rebuild with the project's export defaults."
        )
    if max_batch_size is not None and max_batch_size > limits.max_batch_size:
        raise EngineCompatibilityError(
            f"max_batch_size {max_batch_size} is above the engine's build limit of {limits.max_batch_size}. "
            f"Lower the Triton model's max_batch_size to at most {limits.max_batch_size}, or rebuild the engines "
            "with a larger max_batch_size."
        )


def engine_dtype(encoder_config: dict | None, manifest: EngineManifest) -> str:
    """The encoder engine's input dtype: its config's `pretrained_config.dtype` (the checkpoint's), else the build's.

    TensorRT-LLM's Whisper encoder takes `input_features` in the checkpoint dtype; bf16 engines need
    bf16 features.
    """
    dtype = ((encoder_config or {}).get("pretrained_config") or {}).get("dtype") or manifest.build.dtype
    if dtype not in FEATURE_DTYPES:
        raise EngineCompatibilityError(
            f"The encoder engine's dtype is {dtype!r}; this server sends features as one of "
            f"{', '.join(FEATURE_DTYPES)}. "
            "Rebuild the engines with the project's export (--dtype float16 or bfloat16)."
        )
    return dtype


def engine_vocab_size(decoder_config: dict | None, manifest: EngineManifest, is_multilingual: bool) -> int:
    """The decoder's vocabulary (the logits' width before padding)."""
    size = ((decoder_config or {}).get("pretrained_config") or {}).get("vocab_size") or (manifest.model or {}).get(
        "vocab_size")
    return int(size) if size else (51865 if is_multilingual else 51864)


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


def _import_runtime():
    """(tensorrt_llm, torch, ModelRunnerCpp), or a clear error saying why not and what to do."""
    try:
        import tensorrt_llm
        import torch
        from tensorrt_llm.runtime import ModelRunnerCpp
    except ImportError as exc:
        raise TensorRTLLMUnavailableError(
            f"The TensorRT-LLM engine cannot start: {exc}. It needs tensorrt_llm {TENSORRT_LLM_VERSION}, torch "
            f"and an NVIDIA GPU. Run it in the GPU image (Dockerfile.server, FROM {TRITON_IMAGE}), or install "
            f"tensorrt_llm=={TENSORRT_LLM_VERSION} from https://pypi.nvidia.com on a GPU machine. Without a GPU, "
            "use WHISPER_TRITON_ENGINE=ctranslate2."
        ) from exc
    return tensorrt_llm, torch, ModelRunnerCpp


# ---- the logits hook ---------------------------------------------------------------------------
class ProcessorSlots:
    """One logits processor per batch slot; before each `generate` the engine puts each request's state in its slot.

    The runtime's processor map is fixed at `from_dir`, and a processor learns only the executor's
    request id (assigned inside `generate`) and the token history, not which of our requests it is
    serving. Naming slot i's processor for request i of the batch (`logits_processor_names`) binds
    them without guessing; the engine runs one `generate` at a time (a lock), so a slot holds one
    request at a time.
    """

    def __init__(self, size: int, vocab_size: int):
        self.names = [f"{PROCESSOR_PREFIX}{slot}" for slot in range(size)]
        self.vocab_size = vocab_size
        self.states: list[RequestState | None] = [None] * size
        self.prompt_lengths = [0] * size
        self.errors: list[str] = []

    def processor_map(self) -> dict:
        return {name: TorchLogitsProcessor(self, slot) for slot, name in enumerate(self.names)}

    @contextlib.contextmanager
    def bound(self, states: list[RequestState], prompts: list[list[int]]):
        """Put the batch's states in slots 0..B-1 for the duration of one `generate`."""
        if len(states) > len(self.states):
            raise ValueError(f"a batch of {len(states)} is above the {len(self.states)} processor slots")
        self.errors.clear()
        for slot, (state, prompt) in enumerate(zip(states, prompts)):
            self.states[slot], self.prompt_lengths[slot] = state, len(prompt)
        try:
            yield self.names[: len(states)]
        finally:
            self.states = [None] * len(self.states)
        if self.errors:
            raise RuntimeError(f"the Whisper logits processor failed: {self.errors[0]}")


class TorchLogitsProcessor:
    """The runtime's processor callback: `(request_id, logits, token_ids, stream_ptr, client_id)`.

    `logits` is the request's [1, beams, vocab_padded] tensor on the GPU, changed in place before
    sampling; `token_ids` holds, per beam, the prompt and the tokens so far; `stream_ptr` is the
    executor's CUDA stream (work on the tensor must be ordered on it). The rules run in numpy on a
    host copy of the rows (a [beams, vocab] copy each way per step).
    """

    def __init__(self, slots: ProcessorSlots, slot: int):
        self.slots = slots
        self.slot = slot

    def __call__(self, request_id, logits, token_ids, stream_ptr, client_id) -> None:
        state = self.slots.states[self.slot]
        if state is None:
            return
        try:
            self._apply(state, logits, token_ids, stream_ptr)
        except Exception as exc:  # raising into the executor's thread would take the runtime down
            logger.exception("Whisper logits processor failed on request %s", request_id)
            self.slots.errors.append(f"{type(exc).__name__}: {exc}")

    def _apply(self, state: RequestState, logits, token_ids, stream_ptr) -> None:
        import torch

        stream = torch.cuda.ExternalStream(stream_ptr) if stream_ptr is not None and logits.is_cuda else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            width = logits.shape[-1]
            host = logits.detach().reshape(-1, width).float().cpu().numpy().copy()
            vocab = min(self.slots.vocab_size, width)
            prompt_length = self.slots.prompt_lengths[self.slot]
            histories = [list(beam)[prompt_length:] for beam in token_ids]
            if len(histories) != host.shape[0]:
                # e.g. one context-step row for several beams that share the prompt: the rows lead
                histories = (histories + histories[-1:] * host.shape[0])[: host.shape[0]]
            rows = host[:, :vocab]
            state.step(rows, histories)
            host[:, :vocab] = rows
            host[:, vocab:] = -np.inf  # padded vocabulary columns are never tokens
            logits.copy_(torch.from_numpy(host).reshape(logits.shape).to(device=logits.device, dtype=logits.dtype))


# ---- the engine --------------------------------------------------------------------------------
class TensorRTLLMEngine:
    name = "tensorrtllm"

    def __init__(
        self,
        model_dir: str | Path,
        tokens=None,
        device: str = "cuda",
        compute_type: str | None = None,
        cpu_threads: int = 0,
        max_batch_size: int | None = None,
        kv_cache_free_gpu_memory_fraction: float = 0.8,
        cross_kv_cache_fraction: float = 0.5,
        device_id: int | None = None,
    ):
        """`tokens`: the model's SpecialTokens (contract.capabilities), checked against the tokenizer read here
        (the rules need more of it: the blank token, the non-speech list). `device_id`: the GPU this instance
        runs on (Triton's args["model_instance_device_id"]); None: the current one."""
        if device not in ("cuda", "auto"):
            raise TensorRTLLMUnavailableError(
                f"The TensorRT-LLM engine runs only on an NVIDIA GPU, but device={device!r} was asked for. "
                "Set WHISPER_TRITON_DEVICE=cuda, or use WHISPER_TRITON_ENGINE=ctranslate2 on CPU."
            )
        for name, value in (("kv_cache_free_gpu_memory_fraction", kv_cache_free_gpu_memory_fraction),
                            ("cross_kv_cache_fraction", cross_kv_cache_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {value}")
        if device_id is not None and int(device_id) < 0:
            raise ValueError(f"device_id must be a GPU index (0 or more), got {device_id}")
        if compute_type not in (None, "", "float16", "float32", "default"):
            logger.info("compute_type %r ignored: the precision is fixed when the engine is built", compute_type)
        self.model_dir = Path(model_dir)
        self.manifest = EngineManifest.load(self.model_dir)
        for part in ("encoder", "decoder"):
            if not (self.model_dir / part / "config.json").is_file():
                raise FileNotFoundError(
                    f"{self.model_dir / part} holds no TensorRT-LLM engine (no config.json): the engine directory "
                    "must come from the project's export (encoder/, decoder/, manifest.json, tokenizer.json)."
                )
        decoder_config = _read_json(self.model_dir / "decoder" / "config.json")
        encoder_config = _read_json(self.model_dir / "encoder" / "config.json")
        self.limits = engine_limits(self.manifest, decoder_config, encoder_config)
        model_info = self.manifest.model or {}
        self.tokenizer = WhisperTokenizer.from_model_dir(self.model_dir, model_info.get("is_multilingual"))
        if tokens is not None and (tokens.sot, tokens.eot) != (self.tokenizer.sot, self.tokenizer.eot):
            raise ValueError(
                f"The special tokens given (sot {tokens.sot}, eot {tokens.eot}) are not this engine directory's "
                f"(sot {self.tokenizer.sot}, eot {self.tokenizer.eot}): the tokenizer.json beside the engines must be "
                "the model's."
            )
        self.n_mels = self.limits.n_mels
        self.is_multilingual = self.tokenizer.is_multilingual
        self.max_batch_size = max_batch_size or self.limits.max_batch_size
        self.max_beam_width = self.limits.max_beam_width
        self.kv_cache_free_gpu_memory_fraction = kv_cache_free_gpu_memory_fraction
        self.cross_kv_cache_fraction = cross_kv_cache_fraction
        self.device_id = None if device_id is None else int(device_id)
        self.feature_dtype = engine_dtype(encoder_config, self.manifest)
        self.vocab_size = engine_vocab_size(decoder_config, self.manifest, self.is_multilingual)
        self._suppress_tokens = read_suppress_tokens(self.model_dir)
        self.rule_tokens = RuleTokens.from_tokenizer(self.tokenizer, self.vocab_size, self._suppress_tokens)
        self._slots = ProcessorSlots(self.max_batch_size, self.vocab_size)
        self._lock = threading.Lock()
        ct2_dir = self.model_dir / CT2_COPY_DIR
        self.ct2_dir = ct2_dir if (ct2_dir / "model.bin").is_file() else None
        self._aligner = None
        self.capabilities = self._capabilities(model_info)

        runtime_version, gpu_arch = self._platform()
        check_compatibility(self.manifest, runtime_version=runtime_version, gpu_arch=gpu_arch,
                            max_batch_size=max_batch_size, limits=self.limits)
        self._runner = self._load_runner()
        logger.info(
            "TensorRT-LLM Whisper loaded from %s (TensorRT-LLM %s, %s, GPU %s, %s, n_mels=%d, multilingual=%s, "
            "max_batch_size=%d, max_beam_width=%d, max_seq_len=%d, word timestamps=%s)",
            self.model_dir, runtime_version, gpu_arch, "current" if self.device_id is None else self.device_id,
            self.feature_dtype, self.n_mels, self.is_multilingual, self.max_batch_size, self.max_beam_width,
            self.limits.max_seq_len, self.ct2_dir is not None,
        )

    def _capabilities(self, model_info: dict) -> EngineCapabilities:
        notes = {"patience": "TensorRT-LLM's beam search has no patience option (it is always 1.0)"}
        if self.ct2_dir is None:
            notes["word_timestamps"] = (
                f"this engine directory has no {CT2_COPY_DIR}/ copy of the weights to align words with; "
                "re-export it with the project's export")
        return EngineCapabilities(
            scores=True, no_speech_prob=True, language_probabilities=True, timestamp_rules=True,
            suppress_blank=True, word_timestamps=self.ct2_dir is not None, encoder_reuse=False,
            max_beam_size=self.max_beam_width,
            decoding_options=("beam_size", "max_new_tokens", "temperature", "repetition_penalty", "length_penalty"),
            multilingual=self.is_multilingual,
            translate=self._can_translate(model_info),
            n_mels=self.n_mels, engine=self.name, notes=notes,
        )

    def _can_translate(self, model_info: dict) -> bool:
        """The export's model card (whisper_model.json) says; else the manifest; else multilingual models can."""
        from ..contract.model_card import ModelCard

        card = ModelCard.load(self.model_dir)
        if card is not None:
            return bool(card.translate) and self.is_multilingual
        return bool(model_info.get("translate", self.is_multilingual)) and self.is_multilingual

    # ---- the methods that touch tensorrt_llm / torch ---------------------------------------------
    def _platform(self) -> tuple[str, str]:
        """(installed TensorRT-LLM version, GPU architecture as 'sm_XY')."""
        tensorrt_llm, torch, _ = _import_runtime()
        if not torch.cuda.is_available():
            raise TensorRTLLMUnavailableError(
                "The TensorRT-LLM engine needs an NVIDIA GPU but CUDA sees none. Run the container with the GPU "
                "(docker run --gpus all, or a SageMaker GPU instance), or use WHISPER_TRITON_ENGINE=ctranslate2."
            )
        major, minor = torch.cuda.get_device_capability(self.device_id or 0)
        return str(tensorrt_llm.__version__), f"sm_{major}{minor}"

    def _runner_class(self):
        return _import_runtime()[2]

    def _torch_device(self):
        import torch

        return torch.device("cuda", self.device_id or 0)

    def _load_runner(self):
        kwargs = dict(
            is_enc_dec=True,
            max_batch_size=self.max_batch_size,
            max_input_len=self.limits.max_input_frames,
            max_output_len=self.limits.max_seq_len,
            max_beam_width=self.max_beam_width,
            kv_cache_free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction,
            cross_kv_cache_fraction=self.cross_kv_cache_fraction,
            logits_processor_map=self._slots.processor_map(),
        )
        if self.device_id is not None:
            kwargs["device_ids"] = [self.device_id]  # else the executor binds the current device (GPU 0)
        return self._runner_class().from_dir(str(self.model_dir), **kwargs)

    def _run(self, request: RuntimeRequest) -> RuntimeOutput:
        """The one runtime call: RuntimeRequest in, RuntimeOutput out."""
        import torch

        dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        device = self._torch_device()
        kwargs = dict(
            batch_input_ids=[torch.tensor(prompt, dtype=torch.int32) for prompt in request.prompts],
            encoder_input_features=[torch.from_numpy(f).to(device=device, dtype=dtypes[request.feature_dtype])
                                    for f in request.features],
            encoder_output_lengths=request.encoder_output_lengths,
            max_new_tokens=request.max_new_tokens,
            end_id=request.end_id,
            pad_id=request.pad_id,
            return_dict=True,
            output_sequence_lengths=True,
            # OutputConfig(return_log_probs=output_log_probs): without it cum_log_probs are zeros or empty
            output_log_probs=True,
            output_cum_log_probs=True,
            **request.sampling,
        )
        if request.bad_words:
            kwargs["bad_words_list"] = request.bad_words
        states: list[RequestState] | None = None
        with self._lock:
            if request.plans is not None:
                states = [RequestState(plan=plan, tokens=self.rule_tokens) for plan in request.plans]
                with self._slots.bound(states, request.prompts) as names, torch.no_grad():
                    outputs = self._runner.generate(logits_processor_names=names, **kwargs)
            else:
                with torch.no_grad():
                    outputs = self._runner.generate(**kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        logits = outputs.get("generation_logits")
        cum_log_probs = outputs.get("cum_log_probs")
        return RuntimeOutput(
            output_ids=outputs["output_ids"].cpu().tolist(),
            sequence_lengths=outputs["sequence_lengths"].cpu().tolist() if "sequence_lengths" in outputs else None,
            cum_log_probs=cum_log_probs.cpu().tolist() if cum_log_probs is not None else None,
            generation_logits=logits.float().cpu().numpy() if logits is not None else None,
            states=states,
        )

    # ---- the Engine interface ---------------------------------------------------------------------
    def generate(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Hypothesis]:
        check_batch(features, prompts, self.n_mels)
        options.validate(self.max_beam_width)
        hypotheses: list[Hypothesis] = []
        for start in range(0, features.shape[0], self.max_batch_size):
            chunk = slice(start, start + self.max_batch_size)
            request = build_generate_request(
                features[chunk], prompts[chunk], options, eot=self.tokenizer.eot, sot=self.tokenizer.sot,
                sot_prev=self.tokenizer.sot_prev, limits=self.limits, suppress_tokens=self._suppress_tokens,
                feature_dtype=self.feature_dtype, no_timestamps=self.tokenizer.no_timestamps,
            )
            output = self._run(request)
            hypotheses += parse_generate_output(output, request.prompts, self.tokenizer.eot,
                                                request.output_max_tokens or request.max_new_tokens,
                                                forced=request.forced, request_max_new_tokens=request.max_new_tokens)
        return hypotheses

    def detect_language(self, features: np.ndarray) -> list[dict[str, float]]:
        if features.ndim != 3 or features.shape[1] != self.n_mels:
            raise ValueError(f"features must be [B, {self.n_mels}, frames], got {list(features.shape)}")
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in range(features.shape[0])]
        results: list[dict[str, float]] = []
        for start in range(0, features.shape[0], self.max_batch_size):
            request = build_language_request(
                features[start:start + self.max_batch_size], sot=self.tokenizer.sot, eot=self.tokenizer.eot,
                limits=self.limits, feature_dtype=self.feature_dtype, hook=True,
            )
            output = self._run(request)
            results += parse_language_output(output, request.prompts, self.tokenizer.eot,
                                             self.tokenizer.language_by_id)
        return results

    # ---- word timestamps: CTranslate2 alignment on the export's copy of the same weights ---------
    def _aligner_device(self) -> tuple[str, str]:
        """(device, compute_type) for the CTranslate2 aligner: this instance's GPU, in the engine's precision."""
        return "cuda", "bfloat16" if self.feature_dtype == "bfloat16" else "float16"

    def _load_aligner(self):
        import ctranslate2

        from .ctranslate2_engine import CTranslate2Engine

        device, compute_type = self._aligner_device()
        model = ctranslate2.models.Whisper(str(self.ct2_dir), device=device, device_index=self.device_id or 0,
                                           compute_type=compute_type, inter_threads=1)
        logger.info("word timestamps: CTranslate2 copy %s loaded on %s (%s)", self.ct2_dir, device, compute_type)
        return CTranslate2Engine(self.ct2_dir, self.tokenizer.special_tokens(), device=device,
                                 compute_type=compute_type, max_batch_size=self.max_batch_size, model=model)

    def align(self, features: np.ndarray, start_sequence: list[int], text_tokens: list[list[int]],
              num_frames: list[int]) -> list[TokenTimings]:
        """Per-token start/end (seconds) and probability for given tokens, by CTranslate2's cross-attention alignment.

        Alignment depends only on the weights and the tokens, so the tokens TensorRT-LLM decoded are
        aligned on the CTranslate2 copy of the same weights; it is loaded on first use, so an instance
        that is never asked for words never holds it.
        """
        if self.ct2_dir is None:
            raise RuntimeError(self.capabilities.missing_reason("word_timestamps"))
        with self._lock:
            if self._aligner is None:
                self._aligner = self._load_aligner()
        return self._aligner.align(features, start_sequence, text_tokens, num_frames)
