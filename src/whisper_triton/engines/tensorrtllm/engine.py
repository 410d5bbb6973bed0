"""TensorRT-LLM Whisper engine (NVIDIA GPU) on the executor API of the pinned release, window by window.

Each 30 s window is ONE request to TensorRT-LLM's in-flight-batching executor
(`tensorrt_llm.bindings.executor`: `Executor(encoder_model_path, decoder_model_path,
ModelType.ENCODER_DECODER, ExecutorConfig)`, `Request`, `enqueue_request`, `await_responses`), enqueued as
soon as its caller hands it over and answered as soon as it finishes: a response thread resolves each
window's future. Nothing holds a lock while the executor decodes, so windows of other callers join the
running batch between decoder steps instead of waiting for it. Names and arguments are those of the pybind
files `cpp/tensorrt_llm/pybind/executor/{executor,executorConfig,request}.cpp` and of their use by
triton-inference-server/tensorrtllm_backend at tag v0.17.0 (`all_models/inflight_batcher_llm/tensorrt_llm/
1/model.py`: `Request(max_new_tokens=..., encoder_input_features=..., encoder_output_length=...)`,
`SamplingConfig(beam_width=, top_k=, ...)`, `KvCacheConfig(free_gpu_memory_fraction=,
cross_kv_cache_fraction=)`, `await_responses(timeout=timedelta)`, `response.result.output_token_ids`,
`is_final`), and `tensorrt_llm/runtime/model_runner_cpp.py` (the encoder-decoder `Executor` constructor,
`ParallelConfig(..., device_ids=)`, `LogitsPostProcessorConfig`, `logits_post_processor_name`). The exact
0.17.0 TensorRT-LLM tree is not in the stored public sources: docs/gpu.md lists the versions read.

Whisper's rules run as ONE batched logits post-processor on the executor's stream (rules.py:
`LogitsPostProcessorConfig.processor_batched`, each request naming `Request.BATCHED_POST_PROCESSOR_NAME`);
no logits reach the host during decoding, and each window's scores, no-speech and language probabilities
are read once, when it finishes. A multilingual prompt without a language token gets its language at the
sot step of the same request: one encoder pass per window. Beam search is refused (capability
`max_beam_size = 1`, a 400 naming beam_size): the pinned release gives the processor each beam slot's raw
tokens, not the beam's path.

Memory and devices: `torch.cuda.set_device(device_id)` comes before anything touches CUDA (tensorrt_llm
is imported after it); the KV-cache fraction leaves room for the word-timestamp copy, computed from its
size; the cross-attention share is sized for 1,500 encoder positions; the windows in flight are declared
from the build's max_batch_size and that KV budget (memory.py).

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
import datetime
import itertools
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...contract.capabilities import EngineCapabilities
from ...contract.engine_manifest import EngineManifest
from ...errors import invalid_parameter
from ...pipeline.tokenizer import WhisperTokenizer
from ..base import DecodeOptions, Hypothesis, TokenTimings, check_batch
from ..whisper_rules import RuleTokens
from .compatibility import (TensorRTLLMUnavailableError, _import_runtime, _import_torch, check_compatibility,
                            engine_dtype, engine_vocab_size)
from .memory import DecoderShape, KvPlan, aligner_reserve_bytes, engine_bytes, kv_plan
from .requests import (PromptTokens, WindowRequest, _read_json, build_detect_request, build_window_request,
                       engine_limits, parse_window_output, read_suppress_tokens)
from .rules import RuleState, WhisperRulesProcessor

logger = logging.getLogger(__name__)

CT2_COPY_DIR = "ctranslate2"  # the export's CTranslate2 copy of the same weights, for `align`
BEAMS_REFUSED = ("TensorRT-LLM's logits post-processor gets each beam slot's raw tokens, not the beam's path "
                 "(TensorRT-LLM 0.17 passes no parent ids), so Whisper's timestamp rules and scores cannot follow "
                 "beams: this engine decodes one beam (greedy or with temperature)")
_POLL = datetime.timedelta(milliseconds=100)


class CudaDevice:
    """The engine's CUDA calls, on its own GPU. `select` comes first, before anything touches CUDA."""

    def __init__(self, torch_module, index: int | None):
        self.torch = torch_module
        self.index = 0 if index is None else int(index)

    def select(self) -> None:
        self.torch.cuda.set_device(self.index)

    def available(self) -> bool:
        return bool(self.torch.cuda.is_available())

    def device_capability(self) -> tuple[int, int]:
        return tuple(self.torch.cuda.get_device_capability(self.index))

    def mem_get_info(self) -> tuple[int, int]:
        return tuple(self.torch.cuda.mem_get_info(self.index))

    def stream(self, ptr):
        return self.torch.cuda.stream(self.torch.cuda.ExternalStream(ptr))


@dataclass
class _Window:
    client_id: int
    request: WindowRequest
    future: Future


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
        cross_kv_cache_fraction: float | None = None,
        device_id: int | None = None,
    ):
        """`tokens`: the model's SpecialTokens, checked against the tokenizer read here. `device_id`: the GPU this
        instance runs on (Triton's args["model_instance_device_id"]); None: GPU 0. `kv_cache_free_gpu_memory_fraction`
        is an upper bound: less is asked for when the word-timestamp copy needs the room. `cross_kv_cache_fraction`:
        None sizes it for 1,500 encoder positions against the decoder's max_seq_len (memory.py)."""
        if device not in ("cuda", "auto"):
            raise TensorRTLLMUnavailableError(
                f"The TensorRT-LLM engine runs only on an NVIDIA GPU, but device={device!r} was asked for. "
                "Set WHISPER_TRITON_DEVICE=cuda, or use WHISPER_TRITON_ENGINE=ctranslate2 on CPU."
            )
        for name, value in (("kv_cache_free_gpu_memory_fraction", kv_cache_free_gpu_memory_fraction),
                            ("cross_kv_cache_fraction", cross_kv_cache_fraction)):
            if value is not None and not 0.0 < value < 1.0:
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
        self.device_id = None if device_id is None else int(device_id)
        self.feature_dtype = engine_dtype(encoder_config, self.manifest)
        self.vocab_size = engine_vocab_size(decoder_config, self.manifest, self.is_multilingual)
        self._suppress_tokens = read_suppress_tokens(self.model_dir)
        self.rule_tokens = RuleTokens.from_tokenizer(self.tokenizer, self.vocab_size, self._suppress_tokens)
        tok = self.tokenizer
        self.prompt_tokens = PromptTokens(tok.sot, tok.sot_prev, tok.eot, tok.no_timestamps, tok.transcribe,
                                          tok.translate, frozenset(tok.language_ids.values()), self.is_multilingual)
        ct2_dir = self.model_dir / CT2_COPY_DIR
        self.ct2_dir = ct2_dir if (ct2_dir / "model.bin").is_file() else None
        self._aligner = None
        self._aligner_lock = threading.Lock()

        # the GPU first: nothing touches CUDA (nor imports tensorrt_llm) before this instance's device is set
        self._torch = self._import_torch()
        self._cuda = self._cuda_device(self._torch, self.device_id)
        if not self._cuda.available():  # a device count (no CUDA context yet)
            raise TensorRTLLMUnavailableError(
                "The TensorRT-LLM engine needs an NVIDIA GPU but CUDA sees none. Run the container with the GPU "
                "(docker run --gpus all, or a SageMaker GPU instance), or use WHISPER_TRITON_ENGINE=ctranslate2."
            )
        self._cuda.select()
        runtime_version, self._trtllm = self._runtime()
        major, minor = self._cuda.device_capability()
        gpu_arch = f"sm_{major}{minor}"
        check_compatibility(self.manifest, runtime_version=runtime_version, gpu_arch=gpu_arch,
                            max_batch_size=max_batch_size, limits=self.limits)
        self.kv_plan = self._plan_memory(kv_cache_free_gpu_memory_fraction, cross_kv_cache_fraction, decoder_config)
        self.kv_cache_free_gpu_memory_fraction = self.kv_plan.free_fraction
        self.cross_kv_cache_fraction = self.kv_plan.cross_fraction
        self.in_flight_windows = self.kv_plan.windows
        self.capabilities = self._capabilities(model_info)
        self.processor = WhisperRulesProcessor(self.rule_tokens, self._torch, capacity=2 * self.max_batch_size,
                                               stream_scope=self._cuda.stream)
        self._client_ids = itertools.count(1)
        self._windows: dict[int, _Window] = {}  # executor request id -> window
        self._windows_lock = threading.Lock()  # enqueue + bookkeeping only; never held while decoding
        self._stopping = threading.Event()
        self._executor = self._create_executor()
        self._responder = threading.Thread(target=self._respond, name="trtllm-responses", daemon=True)
        self._responder.start()
        logger.info(
            "TensorRT-LLM Whisper loaded from %s (TensorRT-LLM %s, %s, GPU %d, %s, n_mels=%d, multilingual=%s, "
            "max_batch_size=%d, max_seq_len=%d, word timestamps=%s); %s",
            self.model_dir, runtime_version, gpu_arch, self._cuda.index, self.feature_dtype, self.n_mels,
            self.is_multilingual, self.max_batch_size, self.limits.max_seq_len, self.ct2_dir is not None,
            self.kv_plan.describe(),
        )

    def _capabilities(self, model_info: dict) -> EngineCapabilities:
        notes = {"beam_size": BEAMS_REFUSED, "patience": "one beam only on this engine (beam_size)"}
        if self.ct2_dir is None:
            notes["word_timestamps"] = (
                f"this engine directory has no {CT2_COPY_DIR}/ copy of the weights to align words with; "
                "re-export it with the project's export")
        return EngineCapabilities(
            scores=True, no_speech_prob=True, language_probabilities=True, timestamp_rules=True,
            suppress_blank=True, word_timestamps=self.ct2_dir is not None, encoder_reuse=False,
            max_beam_size=1, in_flight_windows=self.in_flight_windows, language_in_decode=self.is_multilingual,
            decoding_options=("beam_size", "max_new_tokens", "temperature", "repetition_penalty"),
            multilingual=self.is_multilingual, translate=self._can_translate(model_info),
            n_mels=self.n_mels, engine=self.name, notes=notes,
        )

    def _can_translate(self, model_info: dict) -> bool:
        """The export's model card (whisper_model.json) says; else the manifest; else multilingual models can."""
        from ...contract.model_card import ModelCard

        card = ModelCard.load(self.model_dir)
        if card is not None:
            return bool(card.translate) and self.is_multilingual
        return bool(model_info.get("translate", self.is_multilingual)) and self.is_multilingual

    # ---- the platform: overridden by the CPU stand-in (tests/trtllm_standin.py) -------------------
    def _import_torch(self):
        return _import_torch()

    def _cuda_device(self, torch_module, index: int | None):
        return CudaDevice(torch_module, index)

    def _runtime(self):
        """(installed TensorRT-LLM version, `tensorrt_llm.bindings.executor`)."""
        return _import_runtime()

    # ---- memory -----------------------------------------------------------------------------------
    def _plan_memory(self, requested: float, cross: float | None, decoder_config: dict | None) -> KvPlan:
        free, _total = self._cuda.mem_get_info()
        plan = kv_plan(free_bytes=free, engines=engine_bytes(self.model_dir), reserve=aligner_reserve_bytes(self.ct2_dir),
                       requested_fraction=requested, shape=DecoderShape.from_config(decoder_config),
                       max_seq_len=self.limits.max_seq_len, max_batch_size=self.max_batch_size)
        if cross is not None:
            plan = KvPlan(plan.free_fraction, float(cross), plan.windows, plan.kv_bytes, plan.reserve_bytes,
                          plan.free_after_engines)
        if plan.free_fraction < requested:
            logger.info("KV cache fraction %.3f instead of %.3f: the word-timestamp copy (%s) needs %.2f GiB",
                        plan.free_fraction, requested, self.ct2_dir, plan.reserve_bytes / (1 << 30))
        return plan

    # ---- the executor -----------------------------------------------------------------------------
    def executor_config(self):
        """The ExecutorConfig: in-flight batching, one beam, the KV plan, this GPU, the batched rules processor."""
        trt = self._trtllm
        kv = trt.KvCacheConfig(free_gpu_memory_fraction=self.kv_plan.free_fraction,
                               cross_kv_cache_fraction=self.kv_plan.cross_fraction, enable_block_reuse=False)
        config = trt.ExecutorConfig(
            max_beam_width=1, max_batch_size=self.max_batch_size, kv_cache_config=kv,
            scheduler_config=trt.SchedulerConfig(trt.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT),
            batching_type=trt.BatchingType.INFLIGHT,
            parallel_config=trt.ParallelConfig(trt.CommunicationType.MPI, trt.CommunicationMode.LEADER,
                                               device_ids=[self._cuda.index]),
        )
        processors = trt.LogitsPostProcessorConfig()
        processors.processor_batched = self.processor
        config.logits_post_processor_config = processors
        return config

    def _create_executor(self):
        trt = self._trtllm
        return trt.Executor(str(self.model_dir / "encoder"), str(self.model_dir / "decoder"),
                            trt.ModelType.ENCODER_DECODER, self.executor_config())

    def _executor_request(self, window: WindowRequest, client_id: int):
        trt, torch = self._trtllm, self._torch
        dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        features = torch.from_numpy(window.features).to(dtypes[self.feature_dtype])
        output = trt.OutputConfig()
        output.exclude_input_from_output = True
        eot = self.tokenizer.eot
        return trt.Request(input_token_ids=list(window.sent), max_new_tokens=window.max_new_tokens,
                           sampling_config=trt.SamplingConfig(**window.sampling), output_config=output,
                           end_id=eot, pad_id=eot, encoder_input_features=features,
                           encoder_output_length=window.encoder_output_length,
                           logits_post_processor_name=trt.Request.BATCHED_POST_PROCESSOR_NAME, client_id=client_id)

    def _enqueue(self, window: WindowRequest) -> Future:
        future: Future = Future()
        client_id = next(self._client_ids)
        self.processor.register(client_id, RuleState(plan=window.plan, prompt_length=len(window.sent)))
        try:
            request = self._executor_request(window, client_id)
            with self._windows_lock:
                request_id = self._executor.enqueue_request(request)
                self._windows[int(request_id)] = _Window(client_id, window, future)
        except Exception:
            self.processor.forget(client_id)
            raise
        return future

    def _respond(self) -> None:
        """The response thread: each finished window's tokens and its one read of the rules' measurements."""
        while not self._stopping.is_set():
            try:
                responses = self._executor.await_responses(timeout=_POLL)
            except Exception:  # noqa: BLE001 - the executor went away (shutdown)
                if self._stopping.is_set():
                    return
                logger.exception("awaiting TensorRT-LLM responses failed")
                continue
            for response in responses:
                self._complete(response)

    def _complete(self, response) -> None:
        with self._windows_lock:
            window = self._windows.get(int(response.request_id))
            if window is None:
                return
            if not response.has_error() and not response.result.is_final:
                return  # not streaming: only the final result counts
            del self._windows[int(response.request_id)]
        try:
            if response.has_error():
                self.processor.forget(window.client_id)
                raise RuntimeError(f"TensorRT-LLM failed the window: {response.error_msg}")
            window.future.set_result(self._hypothesis(window, list(response.result.output_token_ids[0])))
        except BaseException as exc:  # noqa: BLE001 - the waiting caller gets it
            window.future.set_exception(exc)

    def _hypothesis(self, window: _Window, output_ids: list[int]) -> Hypothesis:
        request = window.request
        if request.plan.detect_only:
            measured = self.processor.finish(window.client_id, [], True)
            return Hypothesis(tokens=[], language_probs=measured.language_probs)
        try:
            _, tokens, ended = parse_window_output(output_ids, request, self.prompt_tokens)
        except Exception:
            self.processor.forget(window.client_id)
            raise
        measured = self.processor.finish(window.client_id, tokens, ended)
        sum_logprob = measured.sum_logprob
        return Hypothesis(tokens=tokens, sum_logprob=sum_logprob,
                          avg_logprob=None if sum_logprob is None else sum_logprob / (len(tokens) + 1),
                          no_speech_prob=measured.no_speech_prob,
                          language_probs=measured.language_probs if request.auto_language else None)

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(Exception):
            self._executor.shutdown()
        self._responder.join(timeout=10)
        with self._windows_lock:
            pending, self._windows = list(self._windows.values()), {}
        for window in pending:
            window.future.set_exception(RuntimeError("the TensorRT-LLM engine was closed before this window finished"))

    # ---- the Engine interface ---------------------------------------------------------------------
    def _check_beam(self, options: DecodeOptions) -> None:
        if options.beam_size > 1 and options.temperature == 0:
            raise invalid_parameter("beam_size", f"beam_size must be 1 on this engine, got {options.beam_size}: "
                                    f"{BEAMS_REFUSED}.")

    def submit(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Future]:
        """One executor request per window, enqueued now; each future gives the window's Hypothesis."""
        check_batch(features, prompts, self.n_mels)
        self._check_beam(options)
        windows = [build_window_request(features[i], prompts[i], options, tokens=self.prompt_tokens,
                                        limits=self.limits, feature_dtype=self.feature_dtype)
                   for i in range(features.shape[0])]
        return [self._enqueue(window) for window in windows]

    def generate(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Hypothesis]:
        return [future.result() for future in self.submit(features, prompts, options)]

    def detect_language(self, features: np.ndarray) -> list[dict[str, float]]:
        if features.ndim != 3 or features.shape[1] != self.n_mels:
            raise ValueError(f"features must be [B, {self.n_mels}, frames], got {list(features.shape)}")
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in range(features.shape[0])]
        windows = [build_detect_request(window, sot=self.tokenizer.sot, limits=self.limits,
                                        feature_dtype=self.feature_dtype) for window in features]
        futures = [self._enqueue(window) for window in windows]
        return [dict(future.result().language_probs or {"en": 1.0}) for future in futures]

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
        with self._aligner_lock:
            if self._aligner is None:
                self._aligner = self._load_aligner()
        return self._aligner.align(features, start_sequence, text_tokens, num_frames)
