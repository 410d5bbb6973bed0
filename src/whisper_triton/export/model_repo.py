"""Lay out a Triton model repository for one exported model (TensorRT-LLM engines or CTranslate2).

The repository is a copy of every model folder of the template `model_repo_whisper_trtllm/`
(`whisper`, and whatever else it holds), with the model itself stored inside it at
`whisper/1/engine/` and `whisper/config.pbtxt` rendered from the template's:

- `max_batch_size` from the build config, never above what the engine was built for;
- parameters `engine`, `model_dir` (the repository-relative path `whisper/1/engine`), `device`,
  `compute_type`, `cpu_threads`; any other model of the template that declares a `model_dir`
  parameter gets the same relative path, so every model reads the same tokenizer and engine;
- one instance on the GPU (`KIND_GPU`) for TensorRT-LLM, on the CPU (`KIND_CPU`) for CTranslate2.

The config is edited structurally: parsed with Triton's `ModelConfig` protobuf, fields changed,
printed back. `repository_manifest.json` at the root records every file's size and sha256, the
pinned versions and the build config. The repository relocates as a whole (S3, /opt/ml/model):
`resolve_model_dir_parameter` turns the relative `model_dir` into an absolute path at load.

Heavy imports (protobuf, ctranslate2) stay inside functions: the Triton model imports this module
for `resolve_model_dir_parameter` alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..contract.release import TENSORRT_LLM_VERSION, TRITON_CONTAINER_RELEASE, TRITON_IMAGE, TRITON_SERVER_VERSION
from .common import ExportError, atomic_output_dir, file_table, is_complete, list_files, mark_complete
from ..contract.engine_manifest import MANIFEST_NAME, BuildConfig, EngineManifest
from ..contract.tensors import WHISPER_WINDOW
from ..settings import MODEL_DIR_PARAMETER, resolve_model_dir_parameter  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

STEP = "model-repo"
WHISPER_MODEL = "whisper"  # the front every repository has (NVIDIA's I/O)
ENGINE_MODEL = WHISPER_WINDOW  # the model that runs the engine: its config gets the engine's values
CONFIG_NAME = "config.pbtxt"
ENGINE_SUBDIR = f"{WHISPER_MODEL}/1/engine"  # where the model lives, relative to the repository root
REPOSITORY_MANIFEST = "repository_manifest.json"
ENGINES = ("tensorrtllm", "ctranslate2")
_SKIPPED_NAMES = {"__pycache__", ".ipynb_checkpoints"}


def default_template_dir() -> Path:
    """The repository template: WHISPER_TRITON_MODEL_REPOSITORY (`./serve` and the image set it), else
    ./model_repo_whisper_trtllm in the working directory (the project root)."""
    from ..settings import load_settings

    configured = load_settings().model_repository
    return Path(configured) if configured else Path.cwd() / "model_repo_whisper_trtllm"


# ---- load-time resolution (called by the Triton models) --------------------------------------------
# ---- configuration --------------------------------------------------------------------------------
@dataclass
class ModelRepoConfig:
    model_dir: str  # TensorRT-LLM engine directory (manifest.json, encoder/, decoder/) or CTranslate2 model
    output_dir: str
    engine: str = ""  # "tensorrtllm" | "ctranslate2"; empty: detected from model_dir
    build: BuildConfig | None = None  # the build config to render from; None: the engines' own (TRT-LLM), defaults (CT2)
    max_batch_size: int | None = None  # overrides build.max_batch_size (None: the build's, else the template's)
    n_mels: int | None = None  # overrides build.n_mels (None: the build's, else the model's)
    template_dir: str = ""  # empty: the project's model_repo_whisper_trtllm
    device: str = ""  # empty: cuda for TensorRT-LLM, cpu for CTranslate2
    compute_type: str = ""  # CTranslate2 compute type; empty: the server's setting
    cpu_threads: int = 0  # 0: the server's setting
    instance_count: int = 1


@dataclass
class ModelFacts:
    """What the exported model itself says."""

    engine: str
    n_mels: int
    max_batch_size: int | None  # None: no build limit (CTranslate2)
    build: BuildConfig | None = None  # the engines' build config (TensorRT-LLM)
    extra: dict = field(default_factory=dict)


@dataclass
class RenderValues:
    """Everything that goes into the rendered whisper/config.pbtxt."""

    max_batch_size: int
    engine: str
    model_dir: str
    device: str
    compute_type: str = ""
    cpu_threads: int = 0
    instance_count: int = 1

    @property
    def instance_kind(self) -> str:
        return "KIND_GPU" if self.device == "cuda" else "KIND_CPU"


# ---- reading the model ----------------------------------------------------------------------------
def detect_engine(model_dir: Path) -> str:
    if (model_dir / MANIFEST_NAME).is_file() and (model_dir / "decoder").is_dir():
        return "tensorrtllm"
    if (model_dir / "model.bin").is_file():
        return "ctranslate2"
    raise ExportError(
        f"{model_dir} is neither a TensorRT-LLM engine directory (manifest.json, encoder/, decoder/) nor a "
        "CTranslate2 Whisper model (model.bin): pass the output of `whisper-export build-engines` or "
        "`whisper-export ctranslate2`."
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); export the engines again.") from exc


def tensorrtllm_facts(model_dir: Path) -> ModelFacts:
    from ..engines.tensorrtllm.requests import engine_limits  # no tensorrt_llm import: limits only

    try:
        manifest = EngineManifest.load(model_dir)
    except (FileNotFoundError, TypeError, ValueError) as exc:
        raise ExportError(f"Cannot read the engine manifest in {model_dir}: {exc}") from exc
    limits = engine_limits(manifest, _read_json(model_dir / "decoder" / "config.json"),
                           _read_json(model_dir / "encoder" / "config.json"))
    model_mels = (manifest.model or {}).get("n_mels")
    if model_mels is not None and int(model_mels) != limits.n_mels:
        raise ExportError(
            f"{model_dir / MANIFEST_NAME} is inconsistent: the build says n_mels={limits.n_mels}, the model "
            f"n_mels={model_mels}. Build the engines again with --n-mels {model_mels}."
        )
    return ModelFacts("tensorrtllm", limits.n_mels, limits.max_batch_size, manifest.build,
                      {"tensorrt_llm_version": manifest.tensorrt_llm_version, "gpu_arch": manifest.gpu_arch,
                       "gpu_name": manifest.gpu_name, "model": manifest.model})


def ctranslate2_facts(model_dir: Path) -> ModelFacts:
    import ctranslate2

    try:
        model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="int8")
    except (RuntimeError, ValueError, OSError) as exc:
        raise ExportError(f"CTranslate2 cannot load {model_dir} as a Whisper model ({exc}); export it again.") from exc
    facts = ModelFacts("ctranslate2", int(model.n_mels), None,
                       extra={"ctranslate2_version": ctranslate2.__version__, "is_multilingual": bool(model.is_multilingual)})
    del model
    return facts


def read_model_facts(model_dir: Path, engine: str = "") -> ModelFacts:
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir} does not exist or is not a directory; export the model first.")
    engine = engine or detect_engine(model_dir)
    if engine not in ENGINES:
        raise ExportError(f"Unknown engine {engine!r}: choose one of {', '.join(ENGINES)}.")
    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; both engines read it. Copy the model's tokenizer.json there.")
    return tensorrtllm_facts(model_dir) if engine == "tensorrtllm" else ctranslate2_facts(model_dir)


# ---- the values to render -------------------------------------------------------------------------
def check_build(build: BuildConfig, facts: ModelFacts) -> None:
    """Refuse a Triton max_batch_size above the engine's build, and an n_mels the model does not have."""
    if build.max_batch_size < 1:
        raise ExportError(f"max_batch_size must be at least 1, got {build.max_batch_size}.")
    if facts.max_batch_size is not None and build.max_batch_size > facts.max_batch_size:
        raise ExportError(
            f"max_batch_size {build.max_batch_size} is above the engine's build limit of {facts.max_batch_size}: Triton "
            f"would send batches the engine cannot run. Use --max-batch-size {facts.max_batch_size} or less, or build "
            "the engines again with a larger --max-batch-size."
        )
    if build.n_mels != facts.n_mels:
        raise ExportError(
            f"The build config says n_mels={build.n_mels} but the model has n_mels={facts.n_mels} (80 up to large-v2, "
            f"128 for large-v3): use --n-mels {facts.n_mels}."
        )


def effective_build(config: ModelRepoConfig, facts: ModelFacts, template_batch: int) -> BuildConfig:
    """The build config to render: the given one, else the engines' own, else the template's batch size
    and the model's n_mels; then the explicit overrides. Checked against the model (`check_build`)."""
    build = config.build or facts.build or BuildConfig(max_batch_size=template_batch, n_mels=facts.n_mels)
    if config.max_batch_size is not None:
        build = replace(build, max_batch_size=config.max_batch_size)
    if config.n_mels is not None:
        build = replace(build, n_mels=config.n_mels)
    elif build.n_mels is None:  # a build config that leaves n_mels to the model
        build = replace(build, n_mels=facts.n_mels)
    check_build(build, facts)
    return build


def render_values(config: ModelRepoConfig, facts: ModelFacts, build: BuildConfig) -> RenderValues:
    device = config.device or ("cuda" if facts.engine == "tensorrtllm" else "cpu")
    if facts.engine == "tensorrtllm" and device not in ("cuda", "auto"):
        raise ExportError(f"TensorRT-LLM engines run on the GPU only, but device={device!r}: leave --device empty or use cuda.")
    if device == "auto":
        device = "cuda"
    return RenderValues(max_batch_size=build.max_batch_size, engine=facts.engine, model_dir=ENGINE_SUBDIR, device=device,
                        compute_type=config.compute_type, cpu_threads=config.cpu_threads, instance_count=config.instance_count)


# ---- config.pbtxt, structurally -------------------------------------------------------------------
def parse_config(text: str, source: str = CONFIG_NAME):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ExportError(f"{source} is not a valid Triton model config: {exc}") from exc


def format_config(config, header: str = "") -> str:
    from google.protobuf import text_format

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + text_format.MessageToString(config)


def _set_parameter(config, key: str, value: str) -> None:
    config.parameters[key].string_value = value


def render_whisper_config(template_text: str, values: RenderValues, source: str = CONFIG_NAME) -> str:
    """The template's whisper/config.pbtxt with batch size, parameters and instance group set."""
    from tritonclient.grpc import model_config_pb2

    config = parse_config(template_text, source)
    config.max_batch_size = values.max_batch_size
    _set_parameter(config, "engine", values.engine)
    _set_parameter(config, MODEL_DIR_PARAMETER, values.model_dir)
    _set_parameter(config, "device", values.device)
    _set_parameter(config, "compute_type", values.compute_type)
    _set_parameter(config, "cpu_threads", str(values.cpu_threads) if values.cpu_threads else "")
    del config.instance_group[:]
    # KIND_GPU without `gpus`: Triton makes `count` instances on EACH visible GPU and hands each its
    # args["model_instance_device_id"], so ml.g5.12xlarge (4 A10G) runs 4 engines, one per GPU
    group = config.instance_group.add()
    group.count = values.instance_count
    group.kind = model_config_pb2.ModelInstanceGroup.Kind.Value(values.instance_kind)
    header = (f"Rendered by `whisper-export model-repo` from the template's {source}: engine {values.engine}, "
              f"model in {values.model_dir} (relative to the repository root).")
    return format_config(config, header)


def render_batch_size_only(template_text: str, max_batch_size: int, source: str) -> str:
    config = parse_config(template_text, source)
    config.max_batch_size = max_batch_size
    return format_config(config, f"Rendered by `whisper-export model-repo` from the template's {source}.")


def render_model_dir_only(template_text: str, model_dir: str, source: str) -> str:
    """Another model's config with its declared `model_dir` parameter pointed at the shared model."""
    config = parse_config(template_text, source)
    _set_parameter(config, MODEL_DIR_PARAMETER, model_dir)
    return format_config(config, f"Rendered by `whisper-export model-repo` from the template's {source}.")


# ---- copying ----------------------------------------------------------------------------------------
def template_models(template_dir: Path) -> list[Path]:
    """Model folders of the template (folders holding a config.pbtxt); `whisper` must be one of them."""
    models = sorted(path for path in template_dir.iterdir() if path.is_dir() and (path / CONFIG_NAME).is_file())
    if WHISPER_MODEL not in {path.name for path in models}:
        raise ExportError(f"{template_dir} is not a Whisper model repository template (no {WHISPER_MODEL}/{CONFIG_NAME}).")
    return models


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*_SKIPPED_NAMES, "*.pyc"))


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link where possible (engines are GBs and never modified in place), else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_model_files(model_dir: Path, target: Path) -> None:
    for rel in list_files(model_dir):
        _link_or_copy(model_dir / rel, target / rel)


def write_model_configs(template_dir: Path, staging: Path, values: RenderValues) -> list[str]:
    models = []
    for model in template_models(template_dir):
        _copy_tree(model, staging / model.name)
        source = f"{model.name}/{CONFIG_NAME}"
        text = (model / CONFIG_NAME).read_text()
        if model.name == ENGINE_MODEL:
            rendered = render_whisper_config(text, values, source)
        elif model.name == WHISPER_MODEL:  # the front never sends more rows than the engine takes
            rendered = render_batch_size_only(text, values.max_batch_size, source)
        elif MODEL_DIR_PARAMETER in parse_config(text, source).parameters:
            rendered = render_model_dir_only(text, values.model_dir, source)
        else:
            rendered = None
        if rendered is not None:
            (staging / model.name / CONFIG_NAME).write_text(rendered)
        models.append(model.name)
    return models


# ---- manifest -------------------------------------------------------------------------------------
def versions() -> dict:
    from importlib import metadata

    try:
        package = metadata.version("whisper-triton")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return {"whisper_triton": package, "triton_container_release": TRITON_CONTAINER_RELEASE, "triton_image": TRITON_IMAGE,
            "triton_server": TRITON_SERVER_VERSION, "tensorrt_llm": TENSORRT_LLM_VERSION}


def write_repository_manifest(staging: Path, values: RenderValues, build: BuildConfig, facts: ModelFacts,
                              models: list[str], source: Path) -> dict:
    files = {rel: info for rel, info in file_table(staging).items() if rel != REPOSITORY_MANIFEST}
    manifest = {"format": 1, "models": models, "engine": values.engine, "model_dir": values.model_dir,
                "source_model_dir": str(source), "n_mels": facts.n_mels, "max_batch_size": values.max_batch_size,
                "instance_kind": values.instance_kind, "build": asdict(build), "model": facts.extra,
                "versions": versions(), "files": files}
    (staging / REPOSITORY_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---- the step ---------------------------------------------------------------------------------------
def write_model_repository(config: ModelRepoConfig) -> Path:
    """Lay out the repository in `config.output_dir` (atomically; nothing half-written on error)."""
    model_dir = Path(config.model_dir).absolute()
    template_dir = Path(config.template_dir) if config.template_dir else default_template_dir()
    whisper_template = template_dir / ENGINE_MODEL / CONFIG_NAME
    if not whisper_template.is_file():
        raise ExportError(f"{template_dir} is not a Whisper model repository template (no {ENGINE_MODEL}/{CONFIG_NAME}).")
    facts = read_model_facts(model_dir, config.engine)
    build = effective_build(config, facts, parse_config(whisper_template.read_text(), str(whisper_template)).max_batch_size)
    values = render_values(config, facts, build)
    output = Path(config.output_dir).absolute()
    if output == model_dir or model_dir in output.parents:
        raise ExportError(f"The repository {output} cannot be inside the model directory {model_dir}; choose another output.")
    with atomic_output_dir(output) as staging:
        models = write_model_configs(template_dir, staging, values)
        copy_model_files(model_dir, staging / ENGINE_SUBDIR)
        write_repository_manifest(staging, values, build, facts, models, model_dir)
        mark_complete(staging, STEP, {"engine": values.engine, "max_batch_size": values.max_batch_size})
    logger.info("Model repository for %s (%s, max_batch_size %d, %s) written to %s", model_dir, values.engine,
                values.max_batch_size, values.instance_kind, output)
    return output


def model_repository_ready(output_dir: str | Path) -> bool:
    return is_complete(output_dir, STEP)



def check_model_repository(repository: str | Path) -> None:
    """Refuse, before Triton starts, a repository without whisper/config.pbtxt or whose relative
    `model_dir` points at nothing (e.g. an incomplete copy)."""
    repository = Path(repository)
    config_path = repository / ENGINE_MODEL / CONFIG_NAME
    if not config_path.is_file():
        raise ExportError(f"{repository} is not a Whisper model repository (no {ENGINE_MODEL}/{CONFIG_NAME}); "
                          "lay one out with `whisper-export model-repo`.")
    config = parse_config(config_path.read_text(), str(config_path))
    value = config.parameters[MODEL_DIR_PARAMETER].string_value if MODEL_DIR_PARAMETER in config.parameters else ""
    if value and not Path(value).is_absolute() and not (repository / value).is_dir():
        raise ExportError(f"{config_path} points model_dir at {value}, but {repository / value} does not exist: the "
                          "repository is incomplete. Lay it out again with `whisper-export model-repo`.")
