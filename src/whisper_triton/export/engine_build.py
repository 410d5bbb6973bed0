"""Engine build: render the `trtllm-build` command lines for encoder and decoder from one
`BuildConfig`, run them where `trtllm-build` exists, and write the `EngineManifest` beside them.

Choices the C++ runtime (Triton's tensorrtllm backend, ModelRunnerCpp) needs: paged KV cache and
remove-input-padding on for both engines. The decoder's `max_seq_len` (prompt + generated tokens)
is Whisper's 448-position context, never more (the position table has 448 rows: a longer sequence
would read past it) and never the README's 114 that cuts output at ~96 tokens; the runtime caps
new tokens at 448 - prompt. n_mels is not a build flag: it comes from the checkpoint (a build
config without one takes the checkpoint's; one that disagrees is refused).

Beside the engines the directory gets what serving and word timestamps need, when the CTranslate2
export of the same merged weights is given (`ctranslate2_dir`): its `tokenizer.json`,
`preprocessor_config.json` and `config.json` (suppressed tokens, alignment heads) at the root, and
the whole CTranslate2 model in `ctranslate2/` (the TensorRT-LLM engine aligns words with it); and
always `whisper_model.json` (`model_card`: layout, n_mels, whether the model can translate).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from ..contract.release import TENSORRT_LLM_VERSION
from .common import ExportError, atomic_output_dir, file_table, list_files
from ..contract.engine_manifest import MANIFEST_NAME, BuildConfig, EngineManifest, same_release
from .model_card import ModelCard, model_card

logger = logging.getLogger(__name__)

TRTLLM_BUILD = "trtllm-build"
MEL_FRAMES = 3000  # one 30 s window of log-mel frames: the encoder's input length
WHISPER_CONTEXT = 448
_VERSION_RE = re.compile(r"TensorRT-LLM version:\s*([0-9][^\s]*)")
CTRANSLATE2_SUBDIR = "ctranslate2"  # the CTranslate2 copy of the weights, for word alignment on the GPU path
ROOT_FILES = ("tokenizer.json", "preprocessor_config.json", "config.json")  # from the CTranslate2 export


@dataclass
class BuildPlan:
    encoder: list[str]
    decoder: list[str]

    def script(self) -> str:
        return "\n".join(["#!/bin/sh", "set -e", shlex.join(self.encoder), shlex.join(self.decoder)]) + "\n"


def validate_build_config(config: BuildConfig, checkpoint_dir: Path | None = None) -> None:
    if config.max_output_len < WHISPER_CONTEXT:
        raise ExportError(
            f"max_output_len {config.max_output_len} is below Whisper's {WHISPER_CONTEXT}-token context: fast or CJK "
            f"speech would be cut off. Use max_output_len >= {WHISPER_CONTEXT}."
        )
    if not (config.paged_kv_cache and config.remove_input_padding):
        raise ExportError("The C++ runtime needs paged_kv_cache and remove_input_padding on; leave both enabled.")
    if config.dtype not in ("float16", "bfloat16"):
        raise ExportError(f"Engines are built in float16 or bfloat16, got {config.dtype!r}.")
    if config.max_batch_size < 1 or config.max_beam_width < 1 or config.max_prompt_len < 1:
        raise ExportError("max_batch_size, max_beam_width and max_prompt_len must be at least 1.")
    if config.max_prompt_len >= WHISPER_CONTEXT:
        raise ExportError(f"max_prompt_len {config.max_prompt_len} leaves no room in Whisper's {WHISPER_CONTEXT}-token "
                          f"context for generated tokens; use at most {WHISPER_CONTEXT // 2 + 4} (openai-whisper's "
                          "previous-text budget plus the start tokens).")
    if checkpoint_dir is not None:
        _check_checkpoint_matches(config, checkpoint_dir)


def _check_checkpoint_matches(config: BuildConfig, checkpoint_dir: Path) -> None:
    encoder_cfg, decoder_cfg = (checkpoint_dir / part / "config.json" for part in ("encoder", "decoder"))
    if not encoder_cfg.is_file() or not decoder_cfg.is_file():
        raise ExportError(f"{checkpoint_dir} is not a TensorRT-LLM Whisper checkpoint: run the trtllm-checkpoint step first.")
    encoder = json.loads(encoder_cfg.read_text())
    if config.n_mels is not None and encoder.get("n_mels") != config.n_mels:
        raise ExportError(
            f"The build config says n_mels={config.n_mels} but the checkpoint's encoder has n_mels={encoder.get('n_mels')}: "
            "set n_mels to the model's (80 up to large-v2, 128 for large-v3)."
        )
    if encoder.get("dtype") != config.dtype:
        raise ExportError(f"The checkpoint is {encoder.get('dtype')} but the build config asks for {config.dtype}; convert again with that dtype.")
    quant = (encoder.get("quantization") or {}).get("quant_algo")
    wanted = {None: None, "int8": "W8A16", "int4": "W4A16"}[config.weight_only_precision]
    if quant != wanted:
        raise ExportError(f"The checkpoint's quant_algo is {quant} but the build config asks for {wanted}; convert again.")


def checkpoint_n_mels(checkpoint_dir: str | Path) -> int:
    path = Path(checkpoint_dir) / "encoder" / "config.json"
    if not path.is_file():
        raise ExportError(f"{Path(checkpoint_dir)} is not a TensorRT-LLM Whisper checkpoint: run the trtllm-checkpoint step first.")
    return int(json.loads(path.read_text())["n_mels"])


def resolve_build_config(config: BuildConfig, checkpoint_dir: str | Path) -> BuildConfig:
    """The build config with n_mels from the checkpoint where it was left unset (never a default of 80)."""
    if config.n_mels is None:
        return replace(config, n_mels=checkpoint_n_mels(checkpoint_dir))
    return config


def build_plan(config: BuildConfig, checkpoint_dir: str | Path, engine_dir: str | Path) -> BuildPlan:
    checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
    common = ["--moe_plugin", "disable", "--max_batch_size", str(config.max_batch_size),
              "--remove_input_padding", "enable", "--bert_attention_plugin", config.dtype]
    encoder = [TRTLLM_BUILD, "--checkpoint_dir", str(checkpoint_dir / "encoder"), "--output_dir", str(engine_dir / "encoder"),
               *common, "--gemm_plugin", "disable",
               "--max_input_len", str(MEL_FRAMES), "--max_seq_len", str(MEL_FRAMES),
               "--max_num_tokens", str(MEL_FRAMES * config.max_batch_size)]
    decoder = [TRTLLM_BUILD, "--checkpoint_dir", str(checkpoint_dir / "decoder"), "--output_dir", str(engine_dir / "decoder"),
               *common, "--gemm_plugin", config.dtype, "--gpt_attention_plugin", config.dtype,
               "--kv_cache_type", "paged" if config.paged_kv_cache else "continuous",
               "--max_beam_width", str(config.max_beam_width),
               "--max_input_len", str(config.max_prompt_len),
               "--max_seq_len", str(WHISPER_CONTEXT),  # prompt + new tokens share the 448 positions
               "--max_encoder_input_len", str(MEL_FRAMES)]
    return BuildPlan(encoder=encoder, decoder=decoder)


def gpu_info() -> tuple[str, str]:
    """("sm_86", "NVIDIA A10G") from nvidia-smi, or ("unknown", "") where there is none."""
    if shutil.which("nvidia-smi") is None:
        return "unknown", ""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap,name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        logger.warning("nvidia-smi failed (%s); GPU architecture recorded as unknown", exc)
        return "unknown", ""
    line = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    cap, _, name = line.partition(",")
    cap = cap.strip()
    return (f"sm_{cap.replace('.', '')}" if cap else "unknown"), name.strip()


def _run(command: list[str], log_path: Path) -> str:
    logger.info("Running %s", shlex.join(command))
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(result.stdout)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-20:])
        raise ExportError(f"{shlex.join(command)} failed with exit code {result.returncode}; see {log_path}. Last lines:\n{tail}")
    return result.stdout


def build_engines(config: BuildConfig, checkpoint_dir: str | Path, engine_dir: str | Path, model_info: dict | None = None,
                  allow_version_mismatch: bool = False, ctranslate2_dir: str | Path | None = None,
                  translate: str = "auto") -> EngineManifest:
    """Build both engines into `engine_dir` (atomically), add the serving files, write manifest.json."""
    checkpoint_dir, engine_dir = Path(checkpoint_dir).absolute(), Path(engine_dir).absolute()
    config = resolve_build_config(config, checkpoint_dir)
    validate_build_config(config, checkpoint_dir)
    card = checkpoint_card(checkpoint_dir, translate)
    final_plan = build_plan(config, checkpoint_dir, engine_dir)
    if shutil.which(TRTLLM_BUILD) is None:
        raise ExportError(
            f"{TRTLLM_BUILD} is not on PATH (it comes with TensorRT-LLM {TENSORRT_LLM_VERSION}, e.g. in "
            "the Triton trtllm image, on a machine with an NVIDIA GPU). Run these commands there, then "
            "`whisper-export build-engines --manifest-only` to write the manifest:\n" + final_plan.script()
        )
    with atomic_output_dir(engine_dir) as staging:
        plan = build_plan(config, checkpoint_dir, staging)
        output = _run(plan.encoder, staging / "build_encoder.log") + _run(plan.decoder, staging / "build_decoder.log")
        version = _built_version(output)
        if not same_release(version, TENSORRT_LLM_VERSION) and not allow_version_mismatch:
            raise ExportError(
                f"{TRTLLM_BUILD} is TensorRT-LLM {version}, but the serving image pins {TENSORRT_LLM_VERSION}; engines only "
                "load with the version that built them. Build inside the pinned image."
            )
        attach_serving_files(staging, ctranslate2_dir, card)
        arch, name = gpu_info()
        manifest = EngineManifest(tensorrt_llm_version=version, gpu_arch=arch, gpu_name=name, build=config,
                                  model=dict(model_info or _model_info(checkpoint_dir, card)), files=file_table(staging))
        manifest.save(staging)
    logger.info("Engines built in %s for %s (%s)", engine_dir, arch, name)
    return manifest


def write_manifest_for_existing(config: BuildConfig, checkpoint_dir: str | Path, engine_dir: str | Path,
                                ctranslate2_dir: str | Path | None = None, translate: str = "auto") -> EngineManifest:
    """Manifest for engines built elsewhere with the printed commands (version read from their config.json)."""
    engine_dir = Path(engine_dir)
    config = resolve_build_config(config, checkpoint_dir)
    validate_build_config(config, Path(checkpoint_dir))
    card = checkpoint_card(Path(checkpoint_dir), translate)
    versions = set()
    for part in ("encoder", "decoder"):
        engine_config = engine_dir / part / "config.json"
        if not engine_config.is_file() or not any((engine_dir / part).glob("*.engine")):
            raise ExportError(f"{engine_dir / part} holds no built engine (config.json and *.engine); build the engines first.")
        versions.add(str(json.loads(engine_config.read_text()).get("version", "unknown")))
    if len(versions) != 1:
        raise ExportError(f"Encoder and decoder were built by different TensorRT-LLM versions {sorted(versions)}; rebuild both.")
    attach_serving_files(engine_dir, ctranslate2_dir, card)
    arch, name = gpu_info()
    manifest = EngineManifest(tensorrt_llm_version=versions.pop(), gpu_arch=arch, gpu_name=name, build=config,
                              model=_model_info(Path(checkpoint_dir), card), files=file_table(engine_dir))
    manifest.files.pop(MANIFEST_NAME, None)
    manifest.save(engine_dir)
    return manifest


def _built_version(output: str) -> str:
    match = _VERSION_RE.search(output)
    return match.group(1) if match else "unknown"


def _model_info(checkpoint_dir: Path, card: ModelCard) -> dict:
    encoder = json.loads((checkpoint_dir / "encoder" / "config.json").read_text())
    vocab = int(encoder["vocab_size"])
    return {"n_mels": encoder["n_mels"], "vocab_size": vocab, "is_multilingual": vocab >= 51865,
            "num_languages": encoder.get("num_languages"), "layout": card.layout, "translate": card.translate}


def checkpoint_card(checkpoint_dir: Path, translate: str = "auto") -> ModelCard:
    from .trtllm_checkpoint import dims_from_trtllm_configs

    encoder, decoder = (json.loads((checkpoint_dir / part / "config.json").read_text()) for part in ("encoder", "decoder"))
    return model_card(dims_from_trtllm_configs(encoder, decoder), translate)


def attach_serving_files(engine_dir: Path, ctranslate2_dir: str | Path | None, card: ModelCard) -> None:
    """The model card, and (from the CTranslate2 export of the same weights) the tokenizer, the
    suppressed tokens and the CTranslate2 copy used to align words."""
    if ctranslate2_dir is not None:
        source = Path(ctranslate2_dir)
        if not (source / "model.bin").is_file() or not (source / "tokenizer.json").is_file():
            raise ExportError(f"{source} is not a CTranslate2 Whisper model with its tokenizer.json: run the ctranslate2 "
                              "step on the same merged model first.")
        source_card = ModelCard.load(source)
        if source_card is not None and (source_card.n_mels, source_card.n_vocab, source_card.n_text_layer) != (
                card.n_mels, card.n_vocab, card.n_text_layer):
            raise ExportError(f"The CTranslate2 model in {source} is not the model of these engines ({source_card} vs "
                              f"{card}); export both from the same merged model.")
        target = engine_dir / CTRANSLATE2_SUBDIR
        if target.exists():
            shutil.rmtree(target)
        for rel in list_files(source):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, target / rel)
        for name in ROOT_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, engine_dir / name)
    card.save(engine_dir)


def engines_ready(engine_dir: str | Path) -> bool:
    """True when manifest.json exists and every engine file still has its recorded sha256."""
    from .common import sha256_file

    engine_dir = Path(engine_dir)
    try:
        manifest = EngineManifest.load(engine_dir)
    except (FileNotFoundError, ValueError, TypeError):
        return False
    for rel, info in manifest.files.items():
        path = engine_dir / rel
        if rel == MANIFEST_NAME or not path.is_file() or sha256_file(path) != info["sha256"]:
            return False
    return bool(manifest.files)
