"""`whisper-export`: one subcommand per export step, and `all` that runs them in order, skipping
steps whose verified outputs already exist (so a failed run resumes where it stopped)."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .common import ExportError
from ..contract.engine_manifest import BuildConfig

logger = logging.getLogger("whisper_triton.export")


# ---- single steps ---------------------------------------------------------------------------------
def cmd_hf_from_ct2(args) -> None:
    from .ct2_weights import bundled_tiny_en_dir, write_hf_from_ct2

    write_hf_from_ct2(args.ct2 or bundled_tiny_en_dir(), args.output)


def cmd_merge(args) -> None:
    from .merge import MergeConfig, run_merge

    run_merge(MergeConfig(base_dir=args.base, adapter_dir=args.adapter, output_dir=args.output, save_dtype=args.save_dtype))


def cmd_trtllm_checkpoint(args) -> None:
    from .trtllm_checkpoint import CheckpointConfig, write_trtllm_checkpoint

    write_trtllm_checkpoint(args.openai, args.output, CheckpointConfig(dtype=args.dtype, weight_only_precision=args.weight_only))


def _build_config(args) -> BuildConfig:
    return BuildConfig(max_batch_size=args.max_batch_size, max_beam_width=args.max_beam_width, max_output_len=args.max_output_len,
                       max_prompt_len=args.max_prompt_len, n_mels=args.n_mels, dtype=args.dtype, weight_only_precision=args.weight_only)


def cmd_build_engines(args) -> None:
    from .engine_build import build_engines, write_manifest_for_existing

    extras = {"ctranslate2_dir": args.ctranslate2, "translate": args.translate}
    if args.manifest_only:
        write_manifest_for_existing(_build_config(args), args.checkpoint, args.output, **extras)
    else:
        build_engines(_build_config(args), args.checkpoint, args.output, **extras)


def cmd_ctranslate2(args) -> None:
    from .ctranslate2_export import CT2ExportConfig, export_ctranslate2

    export_ctranslate2(CT2ExportConfig(hf_dir=args.hf, output_dir=args.output, quantization=args.quantization,
                                       translate=args.translate))


def cmd_model_repo(args) -> None:
    from .model_repo import ModelRepoConfig, write_model_repository

    write_model_repository(ModelRepoConfig(model_dir=args.model_dir, output_dir=args.output, engine=args.engine or "",
                                           max_batch_size=args.max_batch_size, n_mels=args.n_mels,
                                           template_dir=args.template or "", device=args.device or "",
                                           compute_type=args.compute_type or "", cpu_threads=args.cpu_threads))


def cmd_models(args) -> None:
    from .models import ModelsExportConfig, adapters_in, export_models, parse_pairs

    adapters = parse_pairs(args.adapter, "adapter")
    if args.adapters:
        for model_id, directory in adapters_in(args.adapters).items():
            if model_id in adapters:
                raise ExportError(f"The model id {model_id!r} is given twice (--adapter and --adapters).")
            adapters[model_id] = directory
    manifest = export_models(ModelsExportConfig(
        base_dir=args.base, output_dir=args.output, adapters=adapters, extra_models=parse_pairs(args.model, "model"),
        base_id=args.base_id, include_base=not args.no_base, default=args.default or "",
        quantization=args.quantization, translate=args.translate, keep_merged=args.keep_merged))
    for model in manifest.models:
        print(f"{model.id}{' (default)' if model.id == manifest.default_id else ''}: {model.path}")


def _progress_bar(total_bytes: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, leave=False)


def cmd_upload(args) -> None:
    from .common import file_table
    from .s3 import TransferSettings, upload_directory

    total = sum(info["size"] for info in file_table(args.source).values())
    with _progress_bar(total, "upload") as bar:
        report = upload_directory(args.source, args.uri, TransferSettings(workers=args.workers), progress=bar.update)
    logger.info("%d files uploaded, %d unchanged", len(report.transferred), len(report.skipped))


def cmd_download(args) -> None:
    from .s3 import TransferSettings, download_directory

    with _progress_bar(0, "download") as bar:
        download_directory(args.uri, args.output, TransferSettings(workers=args.workers), progress=bar.update)


# ---- all ------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    done: Callable[[], bool]
    run: Callable[[], None]


def plan_all(args) -> list[Step]:
    from .ctranslate2_export import CT2ExportConfig, ctranslate2_ready, export_ctranslate2
    from .engine_build import build_engines, engines_ready
    from .merge import MergeConfig, merge_outputs_ready, run_merge
    from .model_repo import ModelRepoConfig, model_repository_ready, write_model_repository
    from .s3 import TransferSettings, upload_directory
    from .trtllm_checkpoint import CheckpointConfig, checkpoint_ready, write_trtllm_checkpoint

    work = Path(args.work)
    merged, checkpoint, engines, ct2 = work / "merged", work / "trtllm_checkpoint", work / "engines", work / "ctranslate2"
    steps = [
        Step("merge", lambda: merge_outputs_ready(merged),
             lambda: run_merge(MergeConfig(base_dir=args.base, adapter_dir=args.adapter, output_dir=str(merged)))),
        Step("trtllm-checkpoint", lambda: checkpoint_ready(checkpoint),
             lambda: write_trtllm_checkpoint(merged / "openai", checkpoint,
                                             CheckpointConfig(dtype=args.dtype, weight_only_precision=args.weight_only))),
        Step("ctranslate2", lambda: ctranslate2_ready(ct2),
             lambda: export_ctranslate2(CT2ExportConfig(hf_dir=str(merged / "hf"), output_dir=str(ct2),
                                                        translate=args.translate))),
    ]
    if args.engines != "skip":
        def build() -> None:
            if args.engines == "auto" and shutil.which("trtllm-build") is None:
                from .engine_build import build_plan, resolve_build_config

                plan = build_plan(resolve_build_config(_build_config(args), checkpoint), checkpoint.absolute(), engines.absolute())
                logger.warning("trtllm-build is not here: engines not built. On a GPU machine with TensorRT-LLM run:\n%s"
                               "then: whisper-export build-engines --manifest-only --checkpoint %s --output %s --ctranslate2 %s",
                               plan.script(), checkpoint.absolute(), engines.absolute(), ct2.absolute())
                return
            build_engines(_build_config(args), checkpoint, engines, ctranslate2_dir=ct2, translate=args.translate)

        steps.append(Step("build-engines", lambda: engines_ready(engines), build))
    repo_ct2, repo_trt = work / "model_repo_ctranslate2", work / "model_repo_tensorrtllm"
    steps.append(Step("model-repo (ctranslate2)", lambda: model_repository_ready(repo_ct2),
                      lambda: write_model_repository(ModelRepoConfig(model_dir=str(ct2), output_dir=str(repo_ct2),
                                                                     max_batch_size=args.max_batch_size, n_mels=args.n_mels))))
    if args.engines != "skip":
        def trt_repo() -> None:
            if engines_ready(engines):
                # the engines' own build (manifest.json): batch size and n_mels as built
                write_model_repository(ModelRepoConfig(model_dir=str(engines), output_dir=str(repo_trt)))
            else:
                logger.warning("model-repo (tensorrtllm): no built engines in %s; run it after building them", engines)

        steps.append(Step("model-repo (tensorrtllm)", lambda: model_repository_ready(repo_trt), trt_repo))
    if args.uri:
        def upload() -> None:
            settings = TransferSettings(workers=args.workers)
            upload_directory(repo_ct2, f"{args.uri.rstrip('/')}/model_repo_ctranslate2", settings)
            if model_repository_ready(repo_trt):
                upload_directory(repo_trt, f"{args.uri.rstrip('/')}/model_repo_tensorrtllm", settings)

        steps.append(Step("upload", lambda: False, upload))  # cheap when nothing changed: unchanged files are skipped
    return steps


def cmd_all(args) -> None:
    from tqdm import tqdm

    steps = plan_all(args)
    with tqdm(steps, desc="export", unit="step") as bar:
        for step in bar:
            bar.set_postfix_str(step.name)
            if step.done():
                logger.info("%s: verified output exists, skipped", step.name)
                continue
            logger.info("%s: running", step.name)
            step.run()


# ---- parser ---------------------------------------------------------------------------------------
def _add_build_options(parser: argparse.ArgumentParser) -> None:
    defaults = BuildConfig()
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-beam-width", type=int, default=defaults.max_beam_width)
    parser.add_argument("--max-output-len", type=int, default=defaults.max_output_len,
                        help="new tokens at most (>= 448; prompt + new tokens share the decoder's 448 positions)")
    parser.add_argument("--max-prompt-len", type=int, default=defaults.max_prompt_len)
    parser.add_argument("--n-mels", type=int, default=None, choices=(80, 128),
                        help="checked against the checkpoint (default: the checkpoint's; 80 up to large-v2, 128 for large-v3/turbo)")


def _add_translate_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--translate", default="auto", choices=("auto", "yes", "no"),
                        help="can the model translate (whisper_model.json)? auto: no for English-only models and the "
                             "large-v3-turbo layout, yes for other multilingual models")


def _add_precision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--weight-only", default=None, choices=("int8", "int4"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-export", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hf-from-ct2", help="Hugging Face Whisper dir from a CTranslate2 model (default: bundled tiny.en)")
    p.add_argument("--ct2", default=None)
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_hf_from_ct2)

    p = sub.add_parser("merge", help="merge an optional LoRA adapter; write hf/ and openai/model.pt")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("trtllm-checkpoint", help="openai checkpoint -> TensorRT-LLM checkpoint")
    p.add_argument("--openai", required=True, help="openai/model.pt or its directory")
    p.add_argument("--output", required=True)
    _add_precision_options(p)
    p.set_defaults(func=cmd_trtllm_checkpoint)

    p = sub.add_parser("build-engines", help="run trtllm-build for encoder and decoder; write manifest.json")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--manifest-only", action="store_true", help="engines were built elsewhere: only write the manifest")
    p.add_argument("--ctranslate2", default=None,
                   help="the CTranslate2 export of the same merged model: its tokenizer and suppressed tokens are copied "
                        "beside the engines, the model itself into ctranslate2/ (word timestamps on the GPU)")
    _add_translate_option(p)
    _add_precision_options(p)
    _add_build_options(p)
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("ctranslate2", help="merged HF model -> CTranslate2 model for the CPU engine")
    p.add_argument("--hf", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--quantization", default="float16")
    _add_translate_option(p)
    p.set_defaults(func=cmd_ctranslate2)

    p = sub.add_parser("models", help="several LoRA adapters against one base in one step: one merged model per "
                       "adapter (and the base), and models.json for serve (WHISPER_TRITON_MODEL_MANIFEST)")
    p.add_argument("--base", required=True, help="the Hugging Face Whisper directory the adapters were trained on")
    p.add_argument("--adapter", action="append", default=[], metavar="[ID=]DIR",
                   help="a PEFT LoRA adapter directory (repeatable); its id defaults to the folder name")
    p.add_argument("--adapters", default=None, metavar="FOLDER", help="a folder whose subfolders are adapters")
    p.add_argument("--model", action="append", default=[], metavar="ID=DIR",
                   help="an already exported model directory to list in the manifest too (repeatable)")
    p.add_argument("--output", required=True)
    p.add_argument("--base-id", default="base", help="the base model's id (default: base)")
    p.add_argument("--no-base", action="store_true", help="do not export the base itself")
    p.add_argument("--default", default=None, help="the default model's id (default: the base, else the first)")
    p.add_argument("--quantization", default="float16")
    p.add_argument("--keep-merged", action="store_true", help="keep the merged Hugging Face checkpoints (.merged/)")
    _add_translate_option(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("model-repo", help="lay out a Triton model repository (config.pbtxt rendered) for engines or a CTranslate2 model")
    p.add_argument("--model-dir", required=True, help="engine directory (build-engines) or CTranslate2 model (ctranslate2)")
    p.add_argument("--output", required=True)
    p.add_argument("--engine", default=None, choices=("tensorrtllm", "ctranslate2"), help="default: detected from --model-dir")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="Triton max_batch_size (default: the engines' build; 8 for CTranslate2); never above the engines'")
    p.add_argument("--n-mels", type=int, default=None, choices=(80, 128), help="checked against the model (default: the model's)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda for TensorRT-LLM, cpu for CTranslate2")
    p.add_argument("--compute-type", default=None, help="CTranslate2 compute type (default: the server's setting)")
    p.add_argument("--cpu-threads", type=int, default=0)
    p.add_argument("--template", default=None, help="template repository (default: the project's model_repo_whisper_trtllm)")
    p.set_defaults(func=cmd_model_repo)

    for name, func in (("upload", cmd_upload), ("download", cmd_download)):
        p = sub.add_parser(name, help=f"{name} a directory {'to' if name == 'upload' else 'from'} s3://bucket/prefix")
        if name == "upload":
            p.add_argument("--source", required=True)
        else:
            p.add_argument("--output", required=True)
        p.add_argument("--uri", required=True)
        p.add_argument("--workers", type=int, default=8)
        p.set_defaults(func=func)

    p = sub.add_parser("all", help="every step in order; resumes after a failure")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--work", required=True, help="directory for every step's output")
    p.add_argument("--uri", default=None, help="s3://bucket/prefix to upload to (optional)")
    p.add_argument("--engines", default="auto", choices=("auto", "require", "skip"),
                   help="auto: build where trtllm-build exists, else log the commands")
    p.add_argument("--workers", type=int, default=8)
    _add_precision_options(p)
    _add_build_options(p)
    _add_translate_option(p)
    p.set_defaults(func=cmd_all)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except ExportError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
