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

import logging
import threading
from pathlib import Path

import numpy as np

from ...contract.capabilities import EngineCapabilities
from ...contract.engine_manifest import EngineManifest
from ...pipeline.tokenizer import WhisperTokenizer
from ..base import DecodeOptions, Hypothesis, TokenTimings, check_batch
from ..whisper_rules import RequestState, RuleTokens
from .compatibility import (TensorRTLLMUnavailableError, _import_runtime, check_compatibility, engine_dtype,
                            engine_vocab_size)
from .requests import (RuntimeOutput, RuntimeRequest, _read_json, build_generate_request, build_language_request,
                       engine_limits, parse_generate_output, parse_language_output, read_suppress_tokens)
from .rules import ProcessorSlots

logger = logging.getLogger(__name__)

CT2_COPY_DIR = "ctranslate2"  # the export's CTranslate2 copy of the same weights, for `align`


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
        from ...contract.model_card import ModelCard

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

        from ..ctranslate2_engine import CTranslate2Engine

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
