"""Whether engines on disk can run here: TensorRT-LLM release, GPU architecture, build flags, dtypes.

Everything is plain Python over the engine manifest and the engines' config.json; `_import_runtime`
is the one place that imports tensorrt_llm (lazily, with the cause and the fix when it is missing).
"""

from __future__ import annotations

from ...contract.engine_manifest import EngineManifest, release_of, same_release
from ...contract.release import TENSORRT_LLM_VERSION, TRITON_IMAGE
from .requests import EngineLimits

FEATURE_DTYPES = ("float16", "bfloat16", "float32")


class TensorRTLLMUnavailableError(RuntimeError):
    """tensorrt_llm / torch / a CUDA GPU is missing where the TensorRT-LLM engine was asked for."""


class EngineCompatibilityError(RuntimeError):
    """The engine on disk cannot run here (other TensorRT-LLM version, GPU arch, or too small a build)."""



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



def _import_error(exc: Exception) -> TensorRTLLMUnavailableError:
    return TensorRTLLMUnavailableError(
        f"The TensorRT-LLM engine cannot start: {exc}. It needs tensorrt_llm {TENSORRT_LLM_VERSION}, torch "
        f"and an NVIDIA GPU. Run it in the GPU image (Dockerfile.server, FROM {TRITON_IMAGE}), or install "
        f"tensorrt_llm=={TENSORRT_LLM_VERSION} from https://pypi.nvidia.com on a GPU machine. Without a GPU, "
        "use WHISPER_TRITON_ENGINE=ctranslate2."
    )


def _import_torch():
    """torch, or a clear error saying why not and what to do (imported before tensorrt_llm: the GPU is chosen first)."""
    try:
        import torch
    except ImportError as exc:
        raise _import_error(exc) from exc
    return torch


def _import_runtime():
    """(tensorrt_llm version, `tensorrt_llm.bindings.executor`), or a clear error saying why not and what to do."""
    try:
        import tensorrt_llm
        import tensorrt_llm.bindings.executor as executor
    except ImportError as exc:
        raise _import_error(exc) from exc
    return str(tensorrt_llm.__version__), executor
