"""A CPU stand-in for TensorRT-LLM 0.17's executor bindings (`tensorrt_llm.bindings.executor`), Whisper use.

It replaces the upstream module, not the engine's code: the engine builds its `ExecutorConfig`,
`Request`s and batched logits processor and reads `Response`s exactly as it would on a GPU. The
stand-in decodes for real, over the per-step logits of a real Whisper model (openai-whisper's
`Whisper` module, loaded from the bundled CTranslate2 weights), and it behaves as upstream does where
the engine could get it wrong. Each rule names the upstream file it follows (the exact 0.17.0 tree is
not in the stored sources; the rules come from the stored versions of these files, see docs/gpu.md):

- one loop steps ALL in-flight requests together; requests enqueued meanwhile join between steps
  (`cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp` forwardAsync: schedule, context and
  generation requests of one iteration; `cpp/tensorrt_llm/executor/executorImpl.cpp` executionLoop:
  new requests are fetched before each iteration), at most `max_batch_size` active, admitted only when
  their whole KV need fits (CapacitySchedulerPolicy GUARANTEED_NO_EVICT, `capacityScheduler.cpp`);
- the batched processor is called ONCE per step with every request that named
  `Request.BATCHED_POST_PROCESSOR_NAME`, as `(req_ids, logits, token_ids, stream_ptr, client_ids)`,
  per-request processors one by one before it (`batch_manager/logitsPostProcessor.cpp`);
- logits are float16 `[1, beams, vocab_padded]` "device" tensors (`DeviceTensor`): every host read of
  them or of anything computed from them (`.cpu()`, `.item()`, `.tolist()`, `.numpy()`, `bool()`,
  `nonzero`, boolean-mask indexing) is counted as a device-to-host copy, per processor call;
  `stream_ptr` names a `CountedStream` whose synchronisations are counted (executor.md: users "must
  use the stream"; synchronising "will slow down the entire execution pipeline");
- beam search keeps per-SLOT token histories: the processor sees each slot's raw token list, not the
  beam's path (`llmReq->getTokens()`; tokens are gathered along parent ids only for the final output,
  `gatherTree`); the context step's logits are tiled one row per beam (`handleContextLogits.cpp`);
- a step costs `fixed_ms + per_row_ms x rows` on a virtual clock (`StepCost`), so tests can reason in
  steps and cost, never in wall-clock time;
- argument checks as upstream: unknown keywords are TypeErrors (pybind), unknown processor names,
  beam width above the executor's, prompt + new tokens above max_seq_len, encoder features of another
  dtype than the engine's, or longer than its max_input_len, are refused at enqueue.
Not modelled: the executor's own log-probs (the engine does not ask for them), streaming, cancellation
mid-request, chunked context, several GPUs. The end token is not part of `output_token_ids`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import threading
import types
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ENCODER_POSITIONS = 1500  # Whisper's encoder output frames: the cross-attention KV of every request


# ---- a counted "device": host reads and stream synchronisations ----------------------------------
class DeviceCounters:
    """Device-to-host copies and synchronisations, split by where they happened (thread-local scope)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._scope = threading.local()
        self.processor_calls: list[dict] = []  # per processor call: {"d2h": n, "syncs": n, "rows": n}
        self.outside = {"d2h": 0, "syncs": 0}

    def count(self, kind: str) -> None:
        current = getattr(self._scope, "call", None)
        with self._lock:
            (current if current is not None else self.outside)[kind] += 1

    @contextlib.contextmanager
    def processor_call(self, rows: int):
        record = {"d2h": 0, "syncs": 0, "rows": rows}
        self._scope.call = record
        try:
            yield record
        finally:
            self._scope.call = None
            with self._lock:
                self.processor_calls.append(record)


COUNTERS = DeviceCounters()
_HOST_READS = {"cpu", "numpy", "tolist", "item", "__bool__", "__float__", "__int__", "__index__", "__array__",
               "nonzero", "masked_select", "argwhere", "unique"}


class DeviceTensor(torch.Tensor):
    """A CPU tensor standing for GPU memory: results of torch operations on it stay DeviceTensors, and
    every read of its values by the host is counted (what would be a device-to-host copy on a GPU)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "cpu" or (name == "to" and _to_host(args, kwargs))
        if name in _HOST_READS or to_host or (name == "__getitem__" and _bool_index(args)):
            COUNTERS.count("d2h")
        result = super().__torch_function__(func, types, args, kwargs)
        if to_host and isinstance(result, DeviceTensor):
            result = result.as_subclass(torch.Tensor)  # now in host memory: reading it costs nothing more
        return result


def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def on_device(tensor: torch.Tensor) -> DeviceTensor:
    return tensor.as_subclass(DeviceTensor)


def host_view(tensor: torch.Tensor) -> torch.Tensor:
    """Upstream's own reads (sampling): not the processor's, not counted."""
    return tensor.as_subclass(torch.Tensor) if isinstance(tensor, DeviceTensor) else tensor


class CountedStream:
    """The executor's CUDA stream as the processor sees it (by pointer); synchronising it is counted."""

    def __init__(self, ptr: int):
        self.ptr = ptr
        self.entered = 0

    def synchronize(self) -> None:
        COUNTERS.count("syncs")


STREAMS: dict[int, CountedStream] = {}


class StandInCuda:
    """The engine's CUDA calls (engine.CudaDevice) on the stand-in: calls recorded in order."""

    memory = (20 << 30, 24 << 30)  # (free, total) bytes reported by mem_get_info; tests may change it
    runtime_bytes = 1 << 30  # what the executor allocates before its KV cache (engines, activations)
    capability = (8, 6)

    def __init__(self, torch_module, index: int | None):
        self.torch = torch_module
        self.index = 0 if index is None else int(index)
        self.calls: list[str] = []

    def select(self) -> None:
        self.calls.append("set_device")

    def available(self) -> bool:
        self.calls.append("is_available")
        return True

    def device_capability(self) -> tuple[int, int]:
        self.calls.append("get_device_capability")
        return self.capability

    def mem_get_info(self) -> tuple[int, int]:
        self.calls.append("mem_get_info")
        return self.memory

    def stream(self, ptr):
        stream = STREAMS.get(ptr)
        if stream is None:
            raise RuntimeError(f"no executor stream {ptr}: the processor must use the stream it was given")
        stream.entered += 1
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        COUNTERS.count("syncs")


@dataclass
class StepCost:
    """Virtual cost of one executor iteration: a fixed part (launches, the sampling layers) + per row."""

    fixed_ms: float = 6.0
    per_row_ms: float = 0.15

    def of(self, rows: int) -> float:
        return self.fixed_ms + self.per_row_ms * rows


class StepModel:
    """Per-step logits of a real Whisper model: openai-whisper's `Whisper` module on CPU (float32)."""

    def __init__(self, model):
        self.model = model.eval()
        self._encoded: dict[str, torch.Tensor] = {}

    @classmethod
    def from_ct2_dir(cls, model_dir: str | Path) -> "StepModel":
        import whisper.model

        from whisper_triton.export.ct2_weights import openai_checkpoint_from_ct2

        checkpoint = openai_checkpoint_from_ct2(model_dir)
        model = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
        model.load_state_dict(checkpoint["model_state_dict"])
        return cls(model)

    @property
    def vocab_size(self) -> int:
        return int(self.model.dims.n_vocab)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """features [frames, n_mels] in any dtype -> audio features (cached: the encoder is deterministic)."""
        mel = features.float().T.contiguous()
        key = hashlib.sha1(mel.numpy().tobytes()).hexdigest()
        if key not in self._encoded:
            with torch.no_grad():
                self._encoded[key] = self.model.embed_audio(mel[None])
            if len(self._encoded) > 64:
                self._encoded.pop(next(iter(self._encoded)))
        return self._encoded[key]

    def incremental(self, audio: torch.Tensor) -> "IncrementalDecoder":
        """A one-sequence decoder that keeps its key/value cache (openai's kv-cache hooks), for greedy loops."""
        return IncrementalDecoder(self.model, audio)

    def logits(self, sequences: list[list[int]], audio: torch.Tensor) -> torch.Tensor:
        """Last-position logits [len(sequences), vocab] (float32) for equally long sequences."""
        with torch.no_grad():
            tokens = torch.tensor(sequences, dtype=torch.long)
            return self.model.logits(tokens, audio.expand(len(sequences), -1, -1))[:, -1].float()


class IncrementalDecoder:
    """Last-position logits of one growing sequence, feeding only the new tokens (as a KV-cached runtime does).

    Several decoders share one model (in-flight requests): openai's kv-cache hooks are installed around each
    call only, on this decoder's own cache, so one request's keys never land in another's cache."""

    def __init__(self, model, audio: torch.Tensor):
        self.model, self.audio = model, audio
        self.cache: dict = {}
        self.fed = 0

    def logits(self, sequence: list[int]) -> torch.Tensor:
        with torch.no_grad():
            tokens = torch.tensor([sequence[self.fed:]], dtype=torch.long)
            cache, hooks = self.model.install_kv_cache_hooks(self.cache)
            try:
                out = self.model.decoder(tokens, self.audio, kv_cache=cache)[:, -1].float()
            finally:
                for hook in hooks:
                    hook.remove()
            self.cache = cache
            self.fed = len(sequence)
            return out

    def close(self) -> None:
        self.cache.clear()




# ---- tensorrt_llm.bindings.executor, the parts the engine uses --------------------------------------
# Keyword names: pybind `cpp/tensorrt_llm/pybind/executor/{executor,executorConfig,request}.cpp` and their
# use by triton-inference-server/tensorrtllm_backend at tag v0.17.0
# (`all_models/inflight_batcher_llm/tensorrt_llm/1/model.py`: Request(**inputs) with max_new_tokens,
# end_id, pad_id, bad_words, encoder_input_features, encoder_output_length, sampling_config, output_config;
# SamplingConfig with beam_width, top_k, top_p, random_seed, temperature, min_length, ...;
# KvCacheConfig with free_gpu_memory_fraction, cross_kv_cache_fraction, enable_block_reuse; ExecutorConfig;
# executor.enqueue_requests / await_responses(timeout=timedelta) / response.request_id, has_error(),
# error_msg, result.output_token_ids, result.is_final). Any other keyword is a TypeError, as pybind's.
class _Enum:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _enum(*names):
    return types.SimpleNamespace(**{name: _Enum(name) for name in names})


ModelType = _enum("DECODER_ONLY", "ENCODER_DECODER")
BatchingType = _enum("STATIC", "INFLIGHT")
CapacitySchedulerPolicy = _enum("MAX_UTILIZATION", "GUARANTEED_NO_EVICT")
CommunicationType = _enum("MPI")
CommunicationMode = _enum("LEADER", "ORCHESTRATOR")


class _Config:
    """Keyword arguments as attributes; unknown keywords refused (pybind)."""

    _fields: dict = {}

    def __init__(self, *args, **kwargs):
        names = list(self._fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes at most {len(names)} positional arguments")
        values = dict(self._fields)
        for name, value in zip(names, args):
            values[name] = value
        unknown = set(kwargs) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {sorted(unknown)}")
        values.update(kwargs)
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        if name not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        self.__dict__[name] = value


class SchedulerConfig(_Config):
    _fields = {"capacity_scheduler_policy": CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
               "context_chunking_policy": None, "dynamic_batch_config": None}


class KvCacheConfig(_Config):
    _fields = {"enable_block_reuse": False, "max_tokens": None, "max_attention_window": None,
               "sink_token_length": None, "free_gpu_memory_fraction": None, "host_cache_size": None,
               "onboard_blocks": True, "cross_kv_cache_fraction": None, "secondary_offload_min_priority": None,
               "event_buffer_max_size": 0}


class ParallelConfig(_Config):
    _fields = {"communication_type": CommunicationType.MPI, "communication_mode": CommunicationMode.LEADER,
               "device_ids": None, "participant_ids": None, "orchestrator_config": None}


class LogitsPostProcessorConfig(_Config):
    _fields = {"processor_map": None, "processor_batched": None, "replicate": True}


class ExecutorConfig(_Config):
    _fields = {"max_beam_width": 1, "scheduler_config": None, "kv_cache_config": None,
               "enable_chunked_context": False, "normalize_log_probs": True, "iter_stats_max_iterations": 1000,
               "request_stats_max_iterations": 0, "batching_type": BatchingType.INFLIGHT, "max_batch_size": None,
               "max_num_tokens": None, "parallel_config": None, "peft_cache_config": None,
               "logits_post_processor_config": None, "decoding_config": None, "use_gpu_direct_storage": False,
               "gpu_weights_percent": 1.0, "max_queue_size": None, "extended_runtime_perf_knob_config": None,
               "debug_config": None, "recv_poll_period_ms": 0}


class SamplingConfig(_Config):
    _fields = {"beam_width": 1, "top_k": None, "top_p": None, "top_p_min": None, "top_p_reset_ids": None,
               "top_p_decay": None, "random_seed": None, "temperature": None, "min_length": None,
               "beam_search_diversity_rate": None, "repetition_penalty": None, "presence_penalty": None,
               "frequency_penalty": None, "length_penalty": None, "early_stopping": None,
               "no_repeat_ngram_size": None, "num_return_sequences": None}


class OutputConfig(_Config):
    _fields = {"return_log_probs": False, "return_context_logits": False, "return_generation_logits": False,
               "exclude_input_from_output": False, "return_encoder_output": False, "return_perf_metrics": False}


class Request(_Config):
    """`input_token_ids` and the token budget (`max_new_tokens` in 0.17, as the v0.17.0 backend sends it;
    `max_tokens` in later releases) first; the rest by keyword."""

    BATCHED_POST_PROCESSOR_NAME = "batched"  # tle::Request::kBatchedPostProcessorName
    _fields = {"input_token_ids": None, "max_new_tokens": None, "max_tokens": None, "streaming": False,
               "sampling_config": None, "output_config": None, "end_id": None, "pad_id": None,
               "position_ids": None, "bad_words": None, "stop_words": None, "embedding_bias": None,
               "external_draft_tokens_config": None, "prompt_tuning_config": None, "lora_config": None,
               "lookahead_config": None, "kv_cache_retention_config": None, "logits_post_processor_name": None,
               "encoder_input_token_ids": None, "client_id": None, "return_all_generated_tokens": False,
               "priority": 0.5, "type": None, "context_phase_params": None, "encoder_input_features": None,
               "encoder_output_length": None, "cross_attention_mask": None, "num_return_sequences": None}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.input_token_ids is None or (self.max_new_tokens is None) == (self.max_tokens is None):
            raise TypeError("Request() needs input_token_ids and one of max_new_tokens / max_tokens")
        if self.sampling_config is None:
            self.sampling_config = SamplingConfig()
        if self.output_config is None:
            self.output_config = OutputConfig()

    @property
    def budget(self) -> int:
        return int(self.max_new_tokens if self.max_new_tokens is not None else self.max_tokens)


@dataclass
class Result:
    output_token_ids: list[list[int]]
    is_final: bool = True
    cum_log_probs: list[float] | None = None
    log_probs: list[list[float]] | None = None
    context_logits: object = None
    generation_logits: object = None


@dataclass
class Response:
    request_id: int
    result: Result | None = None
    error_msg: str = ""

    def has_error(self) -> bool:
        return bool(self.error_msg)


@dataclass
class _Active:
    rid: int
    request: Request
    prompt: list[int]
    beams: int
    budget: int
    audio: torch.Tensor | None = None
    joined: int | None = None  # the step it first took part in
    steps: int = 0
    paths: list[list[int]] = field(default_factory=lambda: [[]])  # each live beam's true path
    slots: list[list[int]] = field(default_factory=lambda: [[]])  # each beam SLOT's raw token list
    cum: list[float] = field(default_factory=lambda: [0.0])
    finished: list[tuple[list[int], float]] = field(default_factory=list)
    decoder: object = None
    rng: object = None


class Executor:
    """`Executor(encoder_model_path, decoder_model_path, ModelType.ENCODER_DECODER, executor_config)`."""

    step_model = None  # a StepModel, set by the test fixture
    cost = StepCost()
    instances: list["Executor"] = []
    _stream_ids = itertools.count(0x7F00)

    def __init__(self, *args, **kwargs):
        names = ("encoder_model_path", "decoder_model_path", "model_type", "executor_config")
        unknown = set(kwargs) - set(names)
        if unknown or len(args) + len(kwargs) != 4:
            raise TypeError(f"Executor(): the stand-in takes {names} (got {len(args)} positional, {sorted(kwargs)})")
        values = dict(zip(names, args), **kwargs)
        if values["model_type"] is not ModelType.ENCODER_DECODER:
            raise RuntimeError("the stand-in serves Whisper's encoder-decoder engines only (ModelType.ENCODER_DECODER)")
        self.config: ExecutorConfig = values["executor_config"]
        encoder = json.loads((Path(values["encoder_model_path"]) / "config.json").read_text())
        decoder = json.loads((Path(values["decoder_model_path"]) / "config.json").read_text())
        build, pretrained = decoder["build_config"], decoder["pretrained_config"]
        self.max_batch_size = int(self.config.max_batch_size or build["max_batch_size"])
        if self.max_batch_size > build["max_batch_size"] or self.config.max_beam_width > build["max_beam_width"]:
            raise RuntimeError("max_batch_size / max_beam_width above the engine's build")
        self.max_input_len, self.max_seq_len = int(build["max_input_len"]), int(build["max_seq_len"])
        self.encoder_max_input = int(encoder["build_config"]["max_input_len"])
        self.n_mels = int(encoder["pretrained_config"]["n_mels"])
        self.dtype = _DTYPES[encoder["pretrained_config"]["dtype"]]
        self.vocab = int(pretrained["vocab_size"])
        self.vocab_padded = -(-self.vocab // 8) * 8  # vocab_size_padded: a multiple of the TP size x 8
        self.kv = self._kv_budget(pretrained)
        lpp = self.config.logits_post_processor_config
        self.processor_map = dict((lpp.processor_map or {}) if lpp else {})
        self.processor_batched = lpp.processor_batched if lpp else None
        self.stream = CountedStream(next(self._stream_ids))
        STREAMS[self.stream.ptr] = self.stream
        self._ids = itertools.count(1)
        self._queue: deque[_Active] = deque()
        self._active: list[_Active] = []
        self._responses: deque[Response] = deque()
        self._cv = threading.Condition()
        self._running = True
        self.requests: list[Request] = []  # every request enqueued (tests)
        self.encoder_runs = 0
        self.steps = 0
        self.clock_ms = 0.0
        self.step_log: list[dict] = []  # per step: the request ids in it and its rows
        self.joined: dict[int, int] = {}
        self.finished_at: dict[int, int] = {}
        self._thread = threading.Thread(target=self._loop, name="standin-executor", daemon=True)
        self._thread.start()
        Executor.instances.append(self)

    # ---- KV budget (KvCacheConfig; cross attention gets cross_kv_cache_fraction of it) ----------
    def _kv_budget(self, pretrained: dict) -> dict:
        kv = self.config.kv_cache_config or KvCacheConfig()
        fraction = kv.free_gpu_memory_fraction if kv.free_gpu_memory_fraction is not None else 0.9
        cross = kv.cross_kv_cache_fraction
        if cross is None:
            raise RuntimeError("an encoder-decoder model needs KvCacheConfig.cross_kv_cache_fraction "
                               "(trtGptModelInflightBatching.cpp: cross KV cache is required)")
        per_token = 2 * int(pretrained["num_hidden_layers"]) * int(pretrained["hidden_size"]) * 2  # K and V, fp16
        total = int((StandInCuda.memory[0] - StandInCuda.runtime_bytes) * fraction)  # free after loading
        return {"self_tokens": int(total * (1 - cross)) // per_token, "cross_tokens": int(total * cross) // per_token,
                "bytes_per_token": per_token, "fraction": fraction, "cross_fraction": cross}

    def _fits(self, item: _Active, active: list[_Active]) -> bool:
        used_self = sum((len(a.prompt) + a.budget) * a.beams for a in active)
        used_cross = ENCODER_POSITIONS * len(active)
        return (used_self + (len(item.prompt) + item.budget) * item.beams <= self.kv["self_tokens"]
                and used_cross + ENCODER_POSITIONS <= self.kv["cross_tokens"])

    # ---- the API ----------------------------------------------------------------------------------
    def can_enqueue_requests(self) -> bool:
        return self._running

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        return [self.enqueue_request(request) for request in requests]

    def enqueue_request(self, request: Request) -> int:
        self._validate(request)
        rid = next(self._ids)
        beams = int(request.sampling_config.beam_width or 1)
        item = _Active(rid, request, list(request.input_token_ids), beams, request.budget)
        item.slots = [[] for _ in range(beams)]  # every slot starts from the prompt
        seed = request.sampling_config.random_seed
        item.rng = np.random.default_rng(0 if seed is None else int(seed))
        with self._cv:
            self.requests.append(request)
            self._queue.append(item)
            self._cv.notify_all()
        return rid

    def await_responses(self, timeout=None) -> list[Response]:
        seconds = None if timeout is None else timeout.total_seconds()
        with self._cv:
            if not self._responses:
                self._cv.wait(seconds)
            out = list(self._responses)
            self._responses.clear()
        return out

    def cancel_request(self, id=None) -> None:  # noqa: A002 - upstream's keyword
        with self._cv:
            for item in list(self._queue):
                if item.rid == id:
                    self._queue.remove(item)
                    self._responses.append(Response(id, error_msg="cancelled"))
            self._cv.notify_all()

    def shutdown(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ---- enqueue-time checks (executorImpl.cpp enqueueRequest, llmRequest validate) ----------------
    def _validate(self, request: Request) -> None:
        name = request.logits_post_processor_name
        if name == Request.BATCHED_POST_PROCESSOR_NAME and self.processor_batched is None:
            raise RuntimeError("Request asks for the batched logits post-processor but none was configured")
        if name not in (None, Request.BATCHED_POST_PROCESSOR_NAME) and name not in self.processor_map:
            raise RuntimeError(f"LogitsPostProcessor {name} not found.")
        beams = int(request.sampling_config.beam_width or 1)
        if beams > self.config.max_beam_width:
            raise RuntimeError(f"Request beam width {beams} exceeds the executor's max_beam_width "
                               f"{self.config.max_beam_width}")
        prompt = list(request.input_token_ids)
        if len(prompt) > self.max_input_len or len(prompt) + request.budget > self.max_seq_len:
            raise RuntimeError(f"prompt {len(prompt)} + new tokens {request.budget} exceeds the engine's limits "
                               f"(max_input_len {self.max_input_len}, max_seq_len {self.max_seq_len})")
        if request.end_id is None:
            raise RuntimeError("Whisper requests need end_id")
        features, length = request.encoder_input_features, request.encoder_output_length
        if not isinstance(features, torch.Tensor) or features.dtype != self.dtype:
            raise RuntimeError(f"encoder_input_features must be a {self.dtype} tensor (the encoder engine's dtype)")
        if features.ndim != 2 or features.shape[1] != self.n_mels or features.shape[0] > self.encoder_max_input:
            raise RuntimeError(f"bad encoder input {list(features.shape)}")
        if length is None or int(length) != features.shape[0] // 2:
            raise RuntimeError(f"encoder_output_length {length} is not frames // 2")

    # ---- the loop: one step over every active request -------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not self._queue and not self._active:
                    self._cv.wait()
                if not self._running:
                    return
                while self._queue and len(self._active) < self.max_batch_size:
                    if not self._fits(self._queue[0], self._active):
                        if not self._active:
                            item = self._queue.popleft()
                            self._responses.append(Response(item.rid, error_msg="the request does not fit the "
                                                                                "KV cache"))
                            self._cv.notify_all()
                            continue
                        break
                    self._active.append(self._queue.popleft())
                active = list(self._active)
            if active:
                self._step(active)

    def _step(self, active: list[_Active]) -> None:
        self.steps += 1
        tensors = []
        for item in active:
            if item.joined is None:
                item.joined = self.joined[item.rid] = self.steps
                self.encoder_runs += 1
                item.audio = self.step_model.encode(item.request.encoder_input_features)
                if item.beams == 1:
                    item.decoder = self.step_model.incremental(item.audio)
            tensors.append(self._device_logits(item))
        self._run_processors(active, tensors)
        rows = sum(item.beams for item in active)
        self.clock_ms += self.cost.of(rows)
        self.step_log.append({"step": self.steps, "requests": [item.rid for item in active], "rows": rows})
        done = [item for item, tensor in zip(active, tensors) if self._sample(item, host_view(tensor)[0])]
        with self._cv:
            for item in done:
                self._active.remove(item)
                self.finished_at[item.rid] = self.steps
                self._responses.append(self._response(item))
                if item.decoder is not None:
                    item.decoder.close()
            if done:
                self._cv.notify_all()

    def _device_logits(self, item: _Active) -> DeviceTensor:
        """[1, beams, vocab_padded] float16: one row per beam; the context step's row tiled per beam."""
        if item.decoder is not None:
            rows = item.decoder.logits(item.prompt + item.paths[0])
        elif item.steps == 0:
            rows = self.step_model.logits([item.prompt], item.audio).expand(item.beams, -1)
        else:
            rows = self.step_model.logits([item.prompt + path for path in item.paths], item.audio)
        padded = torch.zeros((1, item.beams, self.vocab_padded), dtype=torch.float16)
        padded[0, :, : self.vocab] = rows.to(torch.float16)
        return on_device(padded)

    def _run_processors(self, active: list[_Active], tensors: list) -> None:
        batched = []
        for item, tensor in zip(active, tensors):
            histories = [item.prompt + slot for slot in item.slots]  # per SLOT, raw
            name = item.request.logits_post_processor_name
            if name == Request.BATCHED_POST_PROCESSOR_NAME:
                batched.append((item, tensor, histories))
            elif name is not None:
                with COUNTERS.processor_call(item.beams):
                    self.processor_map[name](item.rid, tensor, histories, self.stream.ptr, item.request.client_id)
        if batched:
            with COUNTERS.processor_call(sum(item.beams for item, _, _ in batched)):
                self.processor_batched([item.rid for item, _, _ in batched], [t for _, t, _ in batched],
                                       [h for _, _, h in batched], self.stream.ptr,
                                       [item.request.client_id for item, _, _ in batched])

    # ---- sampling (upstream's own reads: not counted) ---------------------------------------------
    def _sample(self, item: _Active, logits: torch.Tensor) -> bool:
        """One token per live beam; True when the request is finished."""
        logits = logits[:, : self.vocab].double()
        item.steps += 1
        eot = int(item.request.end_id)
        if item.beams > 1:
            return self._beam_step(item, logits, eot)
        sampling = item.request.sampling_config
        if sampling.temperature and (sampling.top_k in (None, 0)):
            probs = torch.softmax(logits[0] / float(sampling.temperature), dim=-1).numpy()
            token = int(item.rng.choice(len(probs), p=probs / probs.sum()))
        else:
            token = int(torch.argmax(logits[0]))
        if token == eot:
            return True
        item.paths[0].append(token)
        item.slots[0].append(token)
        return len(item.paths[0]) >= item.budget

    def _beam_step(self, item: _Active, logits: torch.Tensor, eot: int) -> bool:
        logprobs = torch.log_softmax(logits, dim=-1).numpy()
        live = range(1) if item.steps == 1 else range(len(item.paths))  # context step: beam 0 only
        candidates = []
        for beam in live:
            for token in np.argsort(-logprobs[beam])[: 2 * item.beams]:
                if np.isfinite(logprobs[beam, token]):
                    candidates.append((item.cum[beam] + float(logprobs[beam, token]), beam, int(token)))
        candidates.sort(key=lambda c: -c[0])
        chosen = []
        for score, beam, token in candidates:
            if token == eot:
                if len(item.finished) < item.beams:
                    item.finished.append((list(item.paths[beam]), score))
            elif len(chosen) < item.beams:
                chosen.append((score, beam, token))
            if len(chosen) == item.beams:
                break
        if not chosen or len(item.finished) >= item.beams:
            return True
        while len(chosen) < item.beams:  # keep every slot busy (duplicates of the best)
            chosen.append(chosen[0])
        item.paths = [item.paths[beam] + [token] for _, beam, token in chosen]  # the true paths (gathered)
        for slot, (_, _, token) in zip(item.slots, chosen):
            slot.append(token)  # each slot's raw list: no reordering along parents (getTokens())
        item.cum = [score for score, _, _ in chosen]
        return len(item.paths[0]) >= item.budget

    def _response(self, item: _Active) -> Response:
        if item.beams > 1:
            penalty = float(item.request.sampling_config.length_penalty or 1.0)
            pool = item.finished + [(path, score) for path, score in zip(item.paths, item.cum)]
            pool.sort(key=lambda entry: -entry[1] / max(len(entry[0]) + 1, 1) ** penalty)
            outputs = [path for path, _ in pool[: item.beams]]
        else:
            outputs = [item.paths[0]]
        if not item.request.output_config.exclude_input_from_output:
            outputs = [item.prompt + path for path in outputs]
        return Response(item.rid, Result(output_token_ids=[list(path) for path in outputs], is_final=True))


def executor_module() -> types.ModuleType:
    """`tensorrt_llm.bindings.executor` as the engine imports it, on the stand-in."""
    module = types.ModuleType("tensorrt_llm.bindings.executor")
    for name in ("ModelType", "BatchingType", "CapacitySchedulerPolicy", "CommunicationType", "CommunicationMode",
                 "SchedulerConfig", "KvCacheConfig", "ParallelConfig", "LogitsPostProcessorConfig", "ExecutorConfig",
                 "SamplingConfig", "OutputConfig", "Request", "Result", "Response", "Executor"):
        setattr(module, name, globals()[name])
    return module


def patch_torch_cuda(monkeypatch, capability=(8, 6)) -> list[str]:
    """torch.cuda as the engine's CudaDevice calls it, on a machine without CUDA: calls recorded in order."""
    calls: list[str] = []

    def record(name, value=None):
        def call(*args, **kwargs):
            calls.append(name)
            return value
        return call

    monkeypatch.setattr(torch.cuda, "is_available", record("is_available", True))
    monkeypatch.setattr(torch.cuda, "set_device", record("set_device"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", record("get_device_capability", capability))
    monkeypatch.setattr(torch.cuda, "mem_get_info", record("mem_get_info", StandInCuda.memory))
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda ptr: STREAMS[ptr])
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: _entered(stream))
    return calls


def _entered(stream: CountedStream):
    stream.entered += 1
    return contextlib.nullcontext()


def install_fake_tensorrt_llm(monkeypatch, version: str) -> types.ModuleType:
    """`import tensorrt_llm` / `tensorrt_llm.bindings.executor` give the stand-in (the engine's own import path)."""
    import sys

    package = types.ModuleType("tensorrt_llm")
    package.__version__ = version
    bindings = types.ModuleType("tensorrt_llm.bindings")
    executor = executor_module()
    bindings.executor = executor
    package.bindings = bindings
    for name, module in (("tensorrt_llm", package), ("tensorrt_llm.bindings", bindings),
                         ("tensorrt_llm.bindings.executor", executor)):
        monkeypatch.setitem(sys.modules, name, module)
    return executor


# ---- an engine directory and the engine on this stand-in (shared by the tests) -----------------
GPU_ARCH = "sm_86"
STANDIN_MAX_BATCH = 2  # smaller than the contract's test batch, so the engine must split it


def write_engine_dir(root: Path, model_dir: Path, *, version: str | None = None, arch: str = GPU_ARCH,
                     max_batch_size: int = STANDIN_MAX_BATCH, max_beam_width: int = 4, max_seq_len: int = 448,
                     max_prompt_len: int = 32, dtype: str = "float16", ct2_copy: bool = False) -> Path:
    """An engine directory as the export lays it out, minus the engine plans (the stand-in needs none).

    Engine config.json files carry `build_config` and `pretrained_config` as trtllm-build writes them
    (only the fields read here); `ctranslate2/` is the export's CTranslate2 copy of the same weights.
    """
    import shutil

    from whisper_triton.contract.engine_manifest import BuildConfig, EngineManifest
    from whisper_triton.pipeline.features import N_FRAMES
    from whisper_triton.contract.release import TENSORRT_LLM_VERSION

    root.mkdir(parents=True, exist_ok=True)
    build = BuildConfig(max_batch_size=max_batch_size, max_beam_width=max_beam_width, max_output_len=max_seq_len,
                        max_prompt_len=max_prompt_len, n_mels=80, dtype=dtype)
    EngineManifest(tensorrt_llm_version=version or TENSORRT_LLM_VERSION, gpu_arch=arch, gpu_name="NVIDIA A10G",
                   build=build, model={"name": "tiny.en", "is_multilingual": False, "vocab_size": 51864}).save(root)
    for part, build_config, pretrained in (
        ("encoder", {"max_batch_size": max_batch_size, "max_input_len": N_FRAMES},
         {"architecture": "WhisperEncoder", "dtype": dtype, "n_mels": 80}),
        ("decoder", {"max_batch_size": max_batch_size, "max_beam_width": max_beam_width,
                     "max_input_len": max_prompt_len, "max_seq_len": max_seq_len},
         {"architecture": "DecoderModel", "dtype": dtype, "vocab_size": 51864, "hidden_size": 384,
          "num_hidden_layers": 4, "num_attention_heads": 6}),
    ):
        (root / part).mkdir(exist_ok=True)
        (root / part / "config.json").write_text(json.dumps({"build_config": build_config,
                                                             "pretrained_config": pretrained}))
    if ct2_copy:
        shutil.copytree(model_dir, root / "ctranslate2")
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(model_dir / name, root / name)
    return root



def _engine_class():
    from whisper_triton.contract.release import TENSORRT_LLM_VERSION
    from whisper_triton.engines.tensorrtllm.engine import TensorRTLLMEngine

    class StandInRuntimeEngine(TensorRTLLMEngine):
        """TensorRTLLMEngine on the CPU: the runtime module is the stand-in, CUDA calls are recorded; the rest is real."""

        runtime_version = TENSORRT_LLM_VERSION

        def _runtime(self):
            self._cuda.calls.append("import tensorrt_llm")
            return self.runtime_version, executor_module()

        @property
        def executor(self) -> Executor:
            return self._executor

        def _cuda_device(self, torch_module, index):
            return StandInCuda(torch_module, index)

        def _aligner_device(self):
            return "cpu", "float32"

    return StandInRuntimeEngine


StandInRuntimeEngine = _engine_class()
