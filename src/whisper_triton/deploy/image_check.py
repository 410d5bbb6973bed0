"""`python3 -m whisper_triton.deploy.image_check`: what the GPU image's build runs so that a broken
image fails at `docker build`, not on SageMaker.

It imports what `serve` and the Triton models will import at start-up (TensorRT-LLM's C++ executor
bindings and `ModelRunnerCpp`, the package's engines and HTTP proxy), checks TensorRT-LLM is the pinned
release, and loads every Triton model's `model.py` of the repository the way the Python backend
does (with `triton_python_backend_utils` importable). Each problem is printed with its cause; the
exit status is 1 when there is any. `pip check` runs beside it in the Dockerfile.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from ..contract.engine_manifest import same_release
from ..contract.release import TENSORRT_LLM_VERSION

logger = logging.getLogger(__name__)

GPU_MODULES = ("tensorrt_llm", "tensorrt_llm.bindings.executor")
PACKAGE_MODULES = ("whisper_triton.engines.tensorrtllm.engine", "whisper_triton.engines.ctranslate2_engine",
                   "whisper_triton.http.app", "whisper_triton.supervisor.serve", "whisper_triton.triton_models.whisper_model",
                   "whisper_triton.triton_models.window_model", "whisper_triton.triton_models.transcribe_model")
DEFAULT_BACKEND_DIR = Path("/opt/tritonserver/backends/python")  # where the image keeps triton_python_backend_utils


def check_modules(names: tuple[str, ...]) -> list[str]:
    problems = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is what this check is for
            problems.append(f"import {name} failed: {type(exc).__name__}: {exc}")
    return problems


def check_tensorrt_llm() -> list[str]:
    problems = check_modules(GPU_MODULES)
    if problems:
        return problems
    import tensorrt_llm
    from tensorrt_llm.runtime import ModelRunnerCpp  # the runtime the engine calls

    if not same_release(tensorrt_llm.__version__, TENSORRT_LLM_VERSION):
        problems.append(f"tensorrt_llm is {tensorrt_llm.__version__}, the project pins {TENSORRT_LLM_VERSION}: "
                        "use the pinned Triton image (release.TRITON_IMAGE)")
    if not hasattr(ModelRunnerCpp, "from_dir"):
        problems.append("tensorrt_llm.runtime.ModelRunnerCpp has no from_dir: not the pinned runtime")
    return problems


def check_triton_models(repository: Path, backend_dir: Path) -> list[str]:
    """Load each `<model>/1/model.py` as the Python backend would and find its TritonPythonModel."""
    problems = []
    if not (backend_dir / "triton_python_backend_utils.py").is_file():
        return [f"{backend_dir} has no triton_python_backend_utils.py: pass --backend-dir of the Triton install"]
    sys.path.insert(0, str(backend_dir))
    try:
        models = sorted(path for path in repository.glob("*/1/model.py"))
        if not models:
            problems.append(f"{repository} holds no */1/model.py: not a model repository")
        for path in models:
            spec = importlib.util.spec_from_file_location(f"_image_check_{path.parent.parent.name}", path)
            try:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{path} does not load: {type(exc).__name__}: {exc}")
                continue
            if not hasattr(module, "TritonPythonModel"):
                problems.append(f"{path} defines no TritonPythonModel")
    finally:
        sys.path.remove(str(backend_dir))
    return problems


def pip_check_problems(output: str, allowed: dict[str, str]) -> list[str]:
    """`pip check` lines not tolerated: every line but those reported by a package named in `allowed`
    (the base image's own breakages, each with its reason)."""
    problems = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        reporter = line.split()[0].lower().replace("_", "-")
        if reporter not in allowed:
            problems.append(f"pip check: {line}")
    return problems


def read_allowed(path: Path) -> dict[str, str]:
    """`<package> <reason>` per line, # comments: the pip-check breakages the base image ships."""
    allowed = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            if not reason.strip():
                raise ValueError(f"{path}: {name} needs a reason (why it is the base image's own breakage)")
            allowed[name.lower().replace("_", "-")] = reason.strip()
    return allowed


def run_pip_check(allowed_file: Path) -> list[str]:
    import subprocess

    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    return pip_check_problems(result.stdout + result.stderr, read_allowed(allowed_file))


def run_checks(repository: Path, backend_dir: Path, gpu: bool = True) -> list[str]:
    problems = check_tensorrt_llm() if gpu else []
    return problems + check_modules(PACKAGE_MODULES) + check_triton_models(repository, backend_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m whisper_triton.deploy.image_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="the image's model repository")
    parser.add_argument("--pip-check", type=Path, metavar="ALLOWED",
                        help="run `pip check` alone, tolerating only the packages named in this file")
    parser.add_argument("--backend-dir", type=Path, default=DEFAULT_BACKEND_DIR)
    parser.add_argument("--no-gpu-modules", action="store_true", help="skip TensorRT-LLM (CPU images, tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.pip_check is not None:
        problems = run_pip_check(args.pip_check)
        for problem in problems:
            logger.error("%s", problem)
        if not problems:
            logger.info("pip check passed (tolerating %s)", ", ".join(read_allowed(args.pip_check)) or "nothing")
        return 1 if problems else 0
    if args.repository is None:
        parser.error("--repository is required (or --pip-check)")
    problems = run_checks(args.repository, args.backend_dir, gpu=not args.no_gpu_modules)
    for problem in problems:
        logger.error("%s", problem)
    if not problems:
        logger.info("image check passed: %s", "TensorRT-LLM, " * (not args.no_gpu_modules) + "package, Triton models")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
