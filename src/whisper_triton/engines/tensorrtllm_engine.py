"""TensorRT-LLM Whisper engine (NVIDIA GPU), on the C++ encoder-decoder runtime of the pinned release.

Written against TensorRT-LLM's `ModelRunnerCpp` (see `release.TENSORRT_LLM_VERSION`): `from_dir(...,
is_enc_dec=True)` loads `<engine_dir>/encoder` and `<engine_dir>/decoder` into one in-flight-batching
executor, and `generate(...)` takes per-request decoder prompt ids, per-request encoder input features
`[frames, n_mels]` (fp16) and encoder output lengths (frames // 2, after Whisper's stride-2 conv).

Everything around the runtime is plain Python and numpy and is unit-tested without a GPU:
request building (`build_generate_request`, `build_language_request`), output parsing
(`parse_generate_output`, `parse_language_output`) and the compatibility checks against the engine
manifest (`check_compatibility`). The only code that touches `tensorrt_llm` / `torch` is
`TensorRTLLMEngine._platform`, `_load_runner` and `_run` (the one runtime call); nothing here imports
them at module import time.

The engine directory is what the project's export writes:
    manifest.json          EngineManifest (TensorRT-LLM version, GPU arch, build limits)
    encoder/  decoder/     TensorRT-LLM engines with their config.json
    tokenizer.json         the model's Whisper tokenizer
    config.json            optional; `suppress_ids` (CTranslate2 convention), or
    generation_config.json optional; `suppress_tokens` (Hugging Face convention)
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..export.manifest import EngineManifest
from ..release import TENSORRT_LLM_VERSION, TRITON_IMAGE
from ..tokenizer import WhisperTokenizer
from .base import MAX_NEW_TOKENS, DecodeOptions, EngineCapabilities, Hypothesis, check_batch

logger = logging.getLogger(__name__)

_POSITIONS = 448  # Whisper decoder positions: prompt + generated tokens must fit
_LANGUAGE_BEAMS = 4  # top-k first tokens read for language detection (beam search, one step)


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
        n_mels=int(build.n_mels),
    )


def _release(version: str) -> str:
    """'0.17.0.post1' and '0.17.0+cu12' -> '0.17.0' (post releases repackage the same TensorRT)."""
    version = version.strip().split("+", 1)[0]
    return re.sub(r"\.post\d+$", "", version)


def check_compatibility(manifest: EngineManifest, *, runtime_version: str, gpu_arch: str,
                        max_batch_size: int | None, limits: EngineLimits) -> None:
    """Refuse, with the cause and the fix, engines that cannot run here or a batch they cannot take."""
    if _release(manifest.tensorrt_llm_version) != _release(runtime_version):
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


# ---- what crosses the runtime boundary ---------------------------------------------------------
@dataclass
class RuntimeRequest:
    """One `ModelRunnerCpp.generate` call, as plain data."""

    prompts: list[list[int]]  # decoder input ids per request
    features: list[np.ndarray]  # per request [frames, n_mels], float16
    encoder_output_lengths: list[int]  # per request, frames // 2
    max_new_tokens: int
    end_id: int
    pad_id: int
    sampling: dict  # generate() keyword arguments: num_beams, temperature, top_k, top_p, penalties
    bad_words: list[list[list[int]]] | None = None  # per request: words, each a token list


@dataclass
class RuntimeOutput:
    """What `generate(return_dict=True, ...)` gives back, as plain data."""

    output_ids: list[list[list[int]]]  # [B][beams][tokens], maybe padded with end_id, maybe with the prompt
    sequence_lengths: list[list[int]] | None = None  # [B][beams]
    cum_log_probs: list[list[float]] | None = None  # [B][beams]
    generation_logits: np.ndarray | None = None  # [B, beams, steps, vocab] when the engine gathers them
    extra: dict = field(default_factory=dict)


# ---- request building (pure) -------------------------------------------------------------------
def feature_tensors(features: np.ndarray) -> list[np.ndarray]:
    """[B, n_mels, frames] log-mel -> B contiguous float16 [frames, n_mels] arrays (the runtime's layout)."""
    return [np.ascontiguousarray(window.T, dtype=np.float16) for window in features]


def encoder_output_lengths(features: np.ndarray) -> list[int]:
    """Encoder output length per window: Whisper's second conv has stride 2."""
    return [int(features.shape[2]) // 2] * int(features.shape[0])


def sampling_settings(options: DecodeOptions) -> dict:
    """DecodeOptions -> TensorRT-LLM sampling keywords.

    Greedy: top_k 1. Beam search: num_beams > 1 with length_penalty. Temperature > 0 samples from the
    whole distribution (top_k 0, top_p 1.0) with one beam, as CTranslate2 and openai-whisper do.
    `patience` and `suppress_blank` have no TensorRT-LLM equivalent (beam search stops at beam_width
    finished hypotheses, which is patience 1.0).
    """
    settings = {"repetition_penalty": float(options.repetition_penalty)}
    if options.temperature > 0:
        settings.update(num_beams=1, temperature=float(options.temperature), top_k=0, top_p=1.0)
    elif options.beam_size > 1:
        settings.update(num_beams=int(options.beam_size), length_penalty=float(options.length_penalty))
    else:
        settings.update(num_beams=1, top_k=1)
    return settings


def fit_prompt(prompt: list[int], max_len: int, sot: int, sot_prev: int) -> list[int]:
    """Shorten the previous-text part of a prompt (oldest tokens first) so it fits the engine."""
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
        "decoder with a larger max_prompt_len."
    )


def build_generate_request(features: np.ndarray, prompts: list[list[int]], options: DecodeOptions, *,
                           eot: int, sot: int, sot_prev: int, limits: EngineLimits,
                           suppress_tokens: list[int] | None = None) -> RuntimeRequest:
    """Everything `generate` needs for one batch, checked against the engine's limits."""
    frames = int(features.shape[2])
    if frames > limits.max_input_frames or frames % 2:
        raise ValueError(
            f"features have {frames} frames; the encoder takes an even number up to {limits.max_input_frames}."
        )
    fitted = [fit_prompt(prompt, limits.max_prompt_len, sot, sot_prev) for prompt in prompts]
    longest = max(len(prompt) for prompt in fitted)
    max_new_tokens = min(options.max_new_tokens, MAX_NEW_TOKENS, limits.max_seq_len - longest)
    if max_new_tokens < 1:
        raise ValueError(f"a {longest}-token prompt leaves no room for new tokens in {limits.max_seq_len}.")
    bad_words = None
    if suppress_tokens:
        words = [[int(token)] for token in suppress_tokens]
        bad_words = [words for _ in fitted]
    return RuntimeRequest(
        prompts=fitted,
        features=feature_tensors(features),
        encoder_output_lengths=encoder_output_lengths(features),
        max_new_tokens=int(max_new_tokens),
        end_id=eot,
        pad_id=eot,
        sampling=sampling_settings(options),
        bad_words=bad_words,
    )


def build_language_request(features: np.ndarray, *, sot: int, eot: int, limits: EngineLimits) -> RuntimeRequest:
    """<|startoftranscript|> alone, one new token; beam search over a few beams yields the top first tokens."""
    beams = max(1, min(_LANGUAGE_BEAMS, limits.max_beam_width))
    sampling = {"num_beams": beams, "repetition_penalty": 1.0}
    if beams == 1:
        sampling["top_k"] = 1
    return RuntimeRequest(
        prompts=[[sot] for _ in range(features.shape[0])],
        features=feature_tensors(features),
        encoder_output_lengths=encoder_output_lengths(features),
        max_new_tokens=1,
        end_id=eot,
        pad_id=eot,
        sampling=sampling,
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


def parse_generate_output(output: RuntimeOutput, prompts: list[list[int]], eot: int,
                          max_new_tokens: int) -> list[Hypothesis]:
    """The best beam of each request as a Hypothesis (scores when the runtime gave them)."""
    if len(output.output_ids) != len(prompts):
        raise RuntimeError(f"the runtime returned {len(output.output_ids)} results for {len(prompts)} requests")
    hypotheses = []
    for index, (beams, prompt) in enumerate(zip(output.output_ids, prompts)):
        length = output.sequence_lengths[index][0] if output.sequence_lengths else None
        tokens = new_tokens(beams[0], prompt, eot, length)[:max_new_tokens]
        sum_logprob = avg_logprob = None
        if output.cum_log_probs is not None:
            sum_logprob = float(output.cum_log_probs[index][0])
            avg_logprob = sum_logprob / (len(tokens) + 1)
        hypotheses.append(Hypothesis(tokens=tokens, sum_logprob=sum_logprob, avg_logprob=avg_logprob))
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

    With generation logits: softmax over the language tokens of the first step (openai-whisper's rule).
    Without: the first new token of each beam with its log-probability, normalised over the languages
    seen; a window whose beams hold no language token gets `{default: 1.0}`.
    """
    results = []
    language_ids = np.array(sorted(language_by_id), dtype=np.int64)
    for index, (beams, prompt) in enumerate(zip(output.output_ids, prompts)):
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


# ---- the engine --------------------------------------------------------------------------------
class TensorRTLLMEngine:
    name = "tensorrtllm"

    def __init__(
        self,
        model_dir: str | Path,
        tokens=None,  # the special tokens (contract.capabilities.SpecialTokens); read from tokenizer.json here
        device: str = "cuda",
        compute_type: str | None = None,
        cpu_threads: int = 0,
        max_batch_size: int | None = None,
        kv_cache_free_gpu_memory_fraction: float = 0.8,
        cross_kv_cache_fraction: float = 0.5,
    ):
        if device not in ("cuda", "auto"):
            raise TensorRTLLMUnavailableError(
                f"The TensorRT-LLM engine runs only on an NVIDIA GPU, but device={device!r} was asked for. "
                "Set WHISPER_TRITON_DEVICE=cuda, or use WHISPER_TRITON_ENGINE=ctranslate2 on CPU."
            )
        for name, value in (("kv_cache_free_gpu_memory_fraction", kv_cache_free_gpu_memory_fraction),
                            ("cross_kv_cache_fraction", cross_kv_cache_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {value}")
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
        self.limits = engine_limits(
            self.manifest,
            _read_json(self.model_dir / "decoder" / "config.json"),
            _read_json(self.model_dir / "encoder" / "config.json"),
        )
        model_info = self.manifest.model or {}
        self.tokenizer = WhisperTokenizer.from_model_dir(self.model_dir, model_info.get("is_multilingual"))
        self.n_mels = self.limits.n_mels
        self.is_multilingual = self.tokenizer.is_multilingual
        self.max_batch_size = max_batch_size or self.limits.max_batch_size
        self.max_beam_width = self.limits.max_beam_width
        self.kv_cache_free_gpu_memory_fraction = kv_cache_free_gpu_memory_fraction
        self.cross_kv_cache_fraction = cross_kv_cache_fraction
        self._suppress_tokens = read_suppress_tokens(self.model_dir)
        self.capabilities = self._capabilities()

        runtime_version, gpu_arch = self._platform()
        check_compatibility(self.manifest, runtime_version=runtime_version, gpu_arch=gpu_arch,
                            max_batch_size=max_batch_size, limits=self.limits)
        self._runner = self._load_runner()
        logger.info(
            "TensorRT-LLM Whisper loaded from %s (TensorRT-LLM %s, %s, n_mels=%d, multilingual=%s, "
            "max_batch_size=%d, max_beam_width=%d, max_seq_len=%d)",
            self.model_dir, runtime_version, gpu_arch, self.n_mels, self.is_multilingual,
            self.max_batch_size, self.max_beam_width, self.limits.max_seq_len,
        )

    def _capabilities(self) -> EngineCapabilities:
        """What this engine gives today; the pipeline reports each missing rule in `info.not_applied`."""
        missing = "the TensorRT-LLM runtime does not provide it yet"
        return EngineCapabilities(
            scores=True, no_speech_prob=False, language_probabilities=False, timestamp_rules=False,
            suppress_blank=False, word_timestamps=False, encoder_reuse=False, max_beam_size=self.max_beam_width,
            decoding_options=("beam_size", "max_new_tokens", "temperature", "repetition_penalty", "length_penalty"),
            multilingual=self.is_multilingual, translate=self.is_multilingual, n_mels=self.n_mels, engine=self.name,
            notes={"no_speech_prob": f"no <|nospeech|> probability: {missing}",
                   "language_probabilities": "language from the top first tokens, not a softmax over languages",
                   "timestamp_rules": f"openai-whisper's timestamp rules: {missing}",
                   "word_timestamps": "no cross-attention alignment on this engine"})

    # ---- the three methods that touch tensorrt_llm / torch ---------------------------------------
    def _platform(self) -> tuple[str, str]:
        """(installed TensorRT-LLM version, GPU architecture as 'sm_XY')."""
        tensorrt_llm, torch, _ = _import_runtime()
        if not torch.cuda.is_available():
            raise TensorRTLLMUnavailableError(
                "The TensorRT-LLM engine needs an NVIDIA GPU but CUDA sees none. Run the container with the GPU "
                "(docker run --gpus all, or a SageMaker GPU instance), or use WHISPER_TRITON_ENGINE=ctranslate2."
            )
        major, minor = torch.cuda.get_device_capability(0)
        return str(tensorrt_llm.__version__), f"sm_{major}{minor}"

    def _load_runner(self):
        _, _, ModelRunnerCpp = _import_runtime()
        return ModelRunnerCpp.from_dir(
            engine_dir=str(self.model_dir),
            is_enc_dec=True,
            max_batch_size=self.max_batch_size,
            max_input_len=self.limits.max_input_frames,
            max_output_len=self.limits.max_seq_len,
            max_beam_width=self.max_beam_width,
            kv_cache_free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction,
            cross_kv_cache_fraction=self.cross_kv_cache_fraction,
        )

    def _run(self, request: RuntimeRequest) -> RuntimeOutput:
        """The one runtime call: RuntimeRequest in, RuntimeOutput out (tests substitute this)."""
        _, torch, _ = _import_runtime()
        with torch.no_grad():
            outputs = self._runner.generate(
                batch_input_ids=[torch.tensor(prompt, dtype=torch.int32) for prompt in request.prompts],
                encoder_input_features=[torch.from_numpy(f).cuda() for f in request.features],
                encoder_output_lengths=request.encoder_output_lengths,
                max_new_tokens=request.max_new_tokens,
                end_id=request.end_id,
                pad_id=request.pad_id,
                bad_words_list=request.bad_words,
                return_dict=True,
                output_sequence_lengths=True,
                output_cum_log_probs=True,
                **request.sampling,
            )
            torch.cuda.synchronize()
        logits = outputs.get("generation_logits")
        cum_log_probs = outputs.get("cum_log_probs")
        return RuntimeOutput(
            output_ids=outputs["output_ids"].cpu().tolist(),
            sequence_lengths=outputs["sequence_lengths"].cpu().tolist() if "sequence_lengths" in outputs else None,
            cum_log_probs=cum_log_probs.cpu().tolist() if cum_log_probs is not None else None,
            generation_logits=logits.float().cpu().numpy() if logits is not None else None,
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
            )
            output = self._run(request)
            hypotheses += parse_generate_output(output, request.prompts, self.tokenizer.eot, request.max_new_tokens)
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
                limits=self.limits,
            )
            output = self._run(request)
            results += parse_language_output(output, request.prompts, self.tokenizer.eot,
                                             self.tokenizer.language_by_id)
        return results
