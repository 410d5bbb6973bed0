"""A CPU stand-in for TensorRT-LLM 0.17's `tensorrt_llm.runtime.ModelRunnerCpp` (encoder-decoder use).

It replaces the upstream class, not the engine's code: the engine builds its `from_dir` / `generate`
calls, registers its logits processors and parses the output exactly as it would on a GPU. The
stand-in decodes for real: a greedy / beam / sampling loop over the per-step logits of a real
Whisper model (openai-whisper's own `Whisper` module, loaded from the bundled CTranslate2 weights),
calling the registered logits processors at every step as the executor does. It never asks
CTranslate2 (or anything else) for the tokens it returns.

Each rule below names the upstream source it follows. The exact 0.17.0 tree is not in the stored
sources; the rules come from NVIDIA/TensorRT-LLM `tensorrt_llm/runtime/model_runner_cpp.py` at the
stored commits 03832911f05dbe10232949eb3c56aac45578e30a (after 0.17) and the 2024-11 version of the
same file (before it), which agree on every rule used here, and from the executor's C++
(`cpp/include/tensorrt_llm/executor/types.h`, `batch_manager/logitsPostProcessor.cpp`).
The pinned pairing: triton-inference-server/tensorrtllm_backend tag v0.17.0 (its `tensorrt_llm`
submodule at 350625cc1c0754882f764a6df5540e35caa48ef3).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# generate(**kwargs) keys that model_runner_cpp.py turns into trtllm.SamplingConfig ("accepted_parameters").
# Upstream silently drops any other keyword; the stand-in raises TypeError instead, so a misspelt
# sampling keyword fails a test rather than being ignored on the GPU.
ACCEPTED_SAMPLING = frozenset({
    "num_beams", "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "temperature", "min_tokens",
    "beam_search_diversity_rate", "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty",
    "early_stopping", "no_repeat_ngram_size", "random_seed", "num_return_sequences",
})
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
    """Last-position logits of one growing sequence, feeding only the new tokens (as a KV-cached runtime does)."""

    def __init__(self, model, audio: torch.Tensor):
        self.model, self.audio = model, audio
        self.cache, self.hooks = model.install_kv_cache_hooks()
        self.fed = 0

    def logits(self, sequence: list[int]) -> torch.Tensor:
        with torch.no_grad():
            tokens = torch.tensor([sequence[self.fed:]], dtype=torch.long)
            self.fed = len(sequence)
            return self.model.decoder(tokens, self.audio, kv_cache=self.cache)[:, -1].float()

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.cache.clear()


class StandInModelRunnerCpp:
    """`ModelRunnerCpp` for an encoder-decoder engine directory, decoding on CPU with `step_model`."""

    step_model: StepModel | None = None  # set by the test fixture
    instances: list["StandInModelRunnerCpp"] = []

    def __init__(self, engine_dir: str, max_batch_size: int, max_input_len: int, max_seq_len: int,
                 max_beam_width: int, dtype: str, processors: dict, device_ids: list[int] | None,
                 gather_generation_logits: bool):
        self.engine_dir = engine_dir
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.max_beam_width = max_beam_width
        self.dtype = dtype
        self.processors = processors
        self.device_ids = device_ids
        self.gather_generation_logits = gather_generation_logits
        self.calls: list[dict] = []
        self._next_request_id = 1

    @classmethod
    def from_dir(cls, engine_dir: str, *, lora_dir=None, rank: int = 0, max_batch_size=None, max_input_len=None,
                 max_output_len=None, max_beam_width=None, max_attention_window_size=None, sink_token_length=None,
                 kv_cache_free_gpu_memory_fraction=None, cross_kv_cache_fraction=None, medusa_choices=None,
                 eagle_choices=None, eagle_posterior_threshold=None, lookahead_config=None, debug_mode=False,
                 lora_ckpt_source="hf", use_gpu_direct_storage=False, gpu_weights_percent=1,
                 max_tokens_in_paged_kv_cache=None, kv_cache_enable_block_reuse=False, enable_chunked_context=False,
                 is_enc_dec=False, multi_block_mode=True, enable_context_fmha_fp32_acc=None, cuda_graph_mode=None,
                 logits_processor_map=None, device_ids=None, is_orchestrator_mode=False, use_runtime_defaults=True,
                 gather_generation_logits=False) -> "StandInModelRunnerCpp":
        """The keyword-only signature of `ModelRunnerCpp.from_dir` (an unknown keyword is a TypeError, as upstream).

        Rules (model_runner_cpp.py `from_dir`): with is_enc_dec the engines are `<dir>/encoder` and
        `<dir>/decoder`; max_input_len defaults to the encoder's; for enc-dec `max_seq_len` is the
        decoder engine's and `max_output_len` is ignored; max_batch_size and max_beam_width may not exceed
        the engine's (assert); cross_kv_cache_fraction only with cross attention (enc-dec).
        """
        root = Path(engine_dir)
        if not is_enc_dec:
            raise AssertionError("the stand-in serves Whisper's encoder-decoder engines only (is_enc_dec=True)")
        encoder = json.loads((root / "encoder" / "config.json").read_text())
        decoder = json.loads((root / "decoder" / "config.json").read_text())
        encoder_build, decoder_build = encoder["build_config"], decoder["build_config"]
        if max_input_len is None:
            max_input_len = encoder_build["max_input_len"]
        if max_batch_size is None:
            max_batch_size = decoder_build["max_batch_size"]
        assert max_batch_size <= decoder_build["max_batch_size"]
        if max_beam_width is None:
            max_beam_width = decoder_build["max_beam_width"]
        assert max_beam_width <= decoder_build["max_beam_width"]
        dtype = (encoder.get("pretrained_config") or {}).get("dtype", "float16")
        for name, processor in (logits_processor_map or {}).items():
            if not callable(processor):
                raise TypeError(f"logits processor {name!r} is not callable")
        runner = cls(str(root), int(max_batch_size), int(max_input_len), int(decoder_build["max_seq_len"]),
                     int(max_beam_width), dtype, dict(logits_processor_map or {}), device_ids, gather_generation_logits)
        runner.from_dir_kwargs = dict(
            max_batch_size=max_batch_size, max_input_len=max_input_len, max_output_len=max_output_len,
            max_beam_width=max_beam_width, kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            cross_kv_cache_fraction=cross_kv_cache_fraction, is_enc_dec=is_enc_dec, device_ids=device_ids,
            processor_names=sorted(runner.processors))
        cls.instances.append(runner)
        return runner

    def generate(self, batch_input_ids: list[torch.Tensor], *, position_ids=None, encoder_input_ids=None,
                 encoder_input_features=None, encoder_output_lengths=None, cross_attention_masks=None,
                 mrope_params=None, sampling_config=None, lora_uids=None, lookahead_config=None, streaming=False,
                 stopping_criteria=None, logits_processor_names=None, max_new_tokens: int = 1, end_id=None,
                 pad_id=None, bad_words_list=None, stop_words_list=None, return_dict=False,
                 output_sequence_lengths=False, output_log_probs=False, output_cum_log_probs=False,
                 prompt_table=None, prompt_tasks=None, input_token_extra_ids=None,
                 return_all_generated_tokens=False, **kwargs):
        """`ModelRunnerCpp.generate` for Whisper requests, answered in its output format.

        Rules (model_runner_cpp.py `generate`, `_check_inputs`, `_fill_output`):
        - sampling keywords arrive through **kwargs and only `accepted_parameters` count;
        - `_check_inputs` (RuntimeError): batch <= max_batch_size; without encoder_input_ids the input
          lengths are the decoder prompts', <= max_input_len; prompt + max_new_tokens <= max_seq_len;
          num_beams <= max_beam_width;
        - each request may name a logits post-processor (`logits_processor_names[i]`); the executor
          calls it at every step before sampling, as
          `processor(request_id, logits, token_ids, stream_ptr, client_id)` (executor/types.h
          `LogitsPostProcessor`; batch_manager/logitsPostProcessor.cpp), with logits
          [1, beams, vocab] to change in place and, per beam, the prompt and the tokens so far;
          ModelRunnerCpp sets no client id (None). An unknown name is an error;
        - OutputConfig(return_log_probs=output_log_probs): log-probs, and with them cum_log_probs,
          exist only when output_log_probs is set; `cum_log_probs` is returned only with
          output_cum_log_probs, as zeros when the log-probs were not asked for;
        - the executor's default normalize_log_probs (ExecutorConfig, 0.17) gives greedy top_k=1
          decoding log-probs of 0: the one candidate has probability 1 (tensorrtllm_backend#276,
          maintainer's answer; TensorRT-LLM PR #12366 changed that default in 2026);
        - output_ids [B, beams, max_seq_len] int32: the prompt, then the generated tokens, padded with
          end_id to max_seq_len; sequence_lengths [B, beams] count the prompt and generated tokens;
        - bad_words_list: per request, words (token lists) that are never generated (applied after the
          processors, in the sampling layers).
        Not modelled: the per-token `log_probs` values (zeros of the right shape; the engine reads the
        hook's scores instead), streaming, and whether the end token itself precedes the end_id padding
        (the engine's parsing accepts both).
        """
        unknown = set(kwargs) - ACCEPTED_SAMPLING - {"skip_cross_attn_blocks", "draft_tokens_list",
                                                      "draft_logits_list"}
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)} (upstream would "
                            "silently ignore them)")
        if stopping_criteria is not None:
            raise RuntimeError("Stopping criteria is not supported in C++ session.")
        if sampling_config is not None:
            raise AssertionError("the stand-in takes sampling keywords, not a SamplingConfig")
        batch = len(batch_input_ids)
        beams = int(kwargs.get("num_beams", 1))
        prompts = [ids.tolist() for ids in batch_input_ids]
        self._check_inputs(prompts, beams, max_new_tokens)
        if encoder_input_features is None or len(encoder_input_features) != batch:
            raise RuntimeError("an encoder-decoder request needs encoder_input_features per request")
        if encoder_output_lengths is None or len(encoder_output_lengths) != batch:
            raise RuntimeError("Whisper requests need encoder_output_lengths per request")
        names = logits_processor_names or [None] * batch
        if len(names) != batch:
            raise RuntimeError("logits_processor_names must name one processor (or None) per request")
        for name in names:
            if name is not None and name not in self.processors:
                raise RuntimeError(f"LogitsPostProcessor {name} not found.")
        expected = _DTYPES[self.dtype]
        for features, length in zip(encoder_input_features, encoder_output_lengths):
            if features.dtype != expected:
                raise RuntimeError(f"encoder_input_features are {features.dtype}, the encoder engine takes {expected}")
            if features.ndim != 2 or features.shape[0] > self.max_input_len or int(length) != features.shape[0] // 2:
                raise RuntimeError(f"bad encoder input {list(features.shape)} / output length {length}")
        self.calls.append(dict(batch=batch, prompts=prompts, max_new_tokens=max_new_tokens, end_id=end_id,
                               pad_id=pad_id, sampling=dict(kwargs), names=list(names),
                               output_log_probs=output_log_probs, output_cum_log_probs=output_cum_log_probs,
                               feature_dtype=encoder_input_features[0].dtype if batch else None,
                               bad_words_list=bad_words_list))
        results = []
        for index, (prompt, features) in enumerate(zip(prompts, encoder_input_features)):
            processor = self.processors.get(names[index]) if names[index] else None
            banned = sorted({word[0] for word in (bad_words_list[index] if bad_words_list else []) if len(word) == 1})
            request_id = self._next_request_id
            self._next_request_id += 1
            results.append(self._decode(request_id, prompt, features, processor, banned, max_new_tokens, end_id,
                                        kwargs))
        return self._fill_output(results, prompts, end_id, beams, return_dict, output_sequence_lengths,
                                 output_log_probs, output_cum_log_probs, kwargs)

    # ---- upstream's checks and output format ----------------------------------------------------
    def _check_inputs(self, prompts: list[list[int]], beams: int, max_new_tokens: int) -> None:
        if len(prompts) > self.max_batch_size:
            raise RuntimeError(f"Input batch size ({len(prompts)}) exceeds the engine or specified limit "
                               f"({self.max_batch_size})")
        longest = max(len(p) for p in prompts)
        if longest > self.max_input_len:
            raise RuntimeError(f"Maximum input length ({longest}) exceeds the engine or specified limit "
                               f"({self.max_input_len})")
        if longest + max_new_tokens > self.max_seq_len:
            raise RuntimeError(f"Maximum input length ({longest}) + maximum new tokens ({max_new_tokens}) exceeds "
                               f"the engine or specified limit ({self.max_seq_len})")
        if beams > self.max_beam_width:
            raise RuntimeError(f"Num beams ({beams}) exceeds the engine or specified limit ({self.max_beam_width})")

    def _fill_output(self, results, prompts, end_id, beams, return_dict, output_sequence_lengths, output_log_probs,
                     output_cum_log_probs, sampling):
        greedy = beams == 1 and int(sampling.get("top_k", 0) or 0) == 1
        rows, lengths, cum = [], [], []
        for prompt, beam_results in zip(prompts, results):
            row, row_lengths, row_cum = [], [], []
            for generated, score in beam_results:
                tokens = prompt + generated
                row_lengths.append(len(tokens))
                row.append(tokens + [end_id] * (self.max_seq_len - len(tokens)))
                row_cum.append(0.0 if (greedy or not output_log_probs) else score)
            rows.append(row)
            lengths.append(row_lengths)
            cum.append(row_cum)
        output_ids = torch.tensor(rows, dtype=torch.int32)
        if not return_dict:
            return output_ids
        outputs = {"output_ids": output_ids}
        if output_sequence_lengths:
            outputs["sequence_lengths"] = torch.tensor(lengths, dtype=torch.int32)
        if output_cum_log_probs:
            outputs["cum_log_probs"] = torch.tensor(cum, dtype=torch.float32)
        if output_log_probs:
            width = max(len(g) for r in results for g, _ in r) or 1
            outputs["log_probs"] = torch.zeros((len(prompts), beams, width), dtype=torch.float32)
        return outputs

    # ---- decoding over real logits --------------------------------------------------------------
    def _decode(self, request_id: int, prompt: list[int], features: torch.Tensor, processor: Callable | None,
                banned: list[int], max_new_tokens: int, end_id: int, sampling: dict) -> list[tuple[list[int], float]]:
        model = self.step_model
        if model is None:
            raise AssertionError("StandInModelRunnerCpp.step_model is not set")
        audio = model.encode(features)
        beams = int(sampling.get("num_beams", 1))
        if beams > 1:
            return self._beam_search(request_id, prompt, audio, processor, banned, max_new_tokens, end_id, beams,
                                     float(sampling.get("length_penalty", 1.0)))
        temperature = float(sampling.get("temperature", 1.0))
        top_k = int(sampling.get("top_k", 0) or 0)
        rng = np.random.default_rng(int(sampling.get("random_seed", 0) or 0))
        generated: list[int] = []
        score = 0.0
        decoder = model.incremental(audio)
        try:
            for _ in range(max_new_tokens):
                logits = self._step_logits(request_id, [prompt + generated], audio, processor, banned,
                                           decoder=decoder)[0]
                logprobs = torch.log_softmax(logits.double(), dim=-1)
                if top_k == 1:
                    token = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits.double() / max(temperature, 1e-6), dim=-1).numpy()
                    token = int(rng.choice(len(probs), p=probs / probs.sum()))
                score += float(logprobs[token])
                if token == end_id:
                    break
                generated.append(token)
        finally:
            decoder.close()
        return [(generated, score)]

    def _beam_search(self, request_id, prompt, audio, processor, banned, max_new_tokens, end_id, beams,
                     length_penalty) -> list[tuple[list[int], float]]:
        """Beam search as the runtime's: beam_width live beams, finished ones kept with length-normalised scores."""
        live: list[tuple[list[int], float]] = [([], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_new_tokens):
            logits = self._step_logits(request_id, [prompt + g for g, _ in live], audio, processor, banned)
            logprobs = torch.log_softmax(logits.double(), dim=-1).numpy()
            candidates = []
            for (generated, score), row in zip(live, logprobs):
                for token in np.argsort(-row)[: 2 * beams]:
                    if np.isfinite(row[token]):
                        candidates.append((score + float(row[token]), generated, int(token)))
            candidates.sort(key=lambda c: -c[0])
            live = []
            for score, generated, token in candidates:
                if token == end_id:
                    if len(finished) < beams:
                        finished.append((generated, score))
                elif len(live) < beams:
                    live.append((generated + [token], score))
                if len(live) == beams:
                    break
            if len(finished) >= beams or not live:
                break
        pool = finished + [c for c in live if len(finished) < beams]

        def normalised(item):
            generated, score = item
            return score / max(len(generated) + 1, 1) ** length_penalty

        pool.sort(key=lambda item: -normalised(item))
        pool = (pool + pool[:1] * beams)[:beams]
        return pool

    def _step_logits(self, request_id, sequences, audio, processor, banned, decoder=None) -> torch.Tensor:
        if decoder is not None:
            logits = decoder.logits(sequences[0])  # [1, vocab]
        else:
            logits = self.step_model.logits(sequences, audio)  # [beams, vocab]
        if processor is not None:
            view = logits[None]  # [1, beams, vocab]: the executor's per-request logits tensor
            processor(request_id, view, [list(s) for s in sequences], None, None)
            logits = view[0]
        if banned:
            logits[:, banned] = -float("inf")
        return logits


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
         {"architecture": "DecoderModel", "dtype": dtype, "vocab_size": 51864}),
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
    from whisper_triton.engines.tensorrtllm.engine import TensorRTLLMEngine
    from whisper_triton.contract.release import TENSORRT_LLM_VERSION

    class StandInRuntimeEngine(TensorRTLLMEngine):
        """TensorRTLLMEngine on the CPU: platform probe, device and runner class are stand-ins, the rest is real."""

        standin_platform = (TENSORRT_LLM_VERSION, GPU_ARCH)

        def _platform(self):
            return self.standin_platform

        def _runner_class(self):
            return StandInModelRunnerCpp

        def _torch_device(self):
            return torch.device("cpu")

        def _aligner_device(self):
            return "cpu", "float32"

        @property
        def calls(self) -> list[dict]:
            return self._runner.calls

    return StandInRuntimeEngine


StandInRuntimeEngine = _engine_class()
