"""The image's build-time check, run here on the CPU install: it passes on the project's repository
and fails, naming the cause, on what would break the image at start-up."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from whisper_triton.deploy import image_check

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repo_whisper_trtllm"


@pytest.fixture(scope="module")
def backend_dir() -> Path:
    """triton_python_backend_utils of the Triton install here (the nvidia-pytriton wheel)."""
    import pytriton

    path = Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python"
    assert (path / "triton_python_backend_utils.py").is_file()
    return path


def test_the_project_repository_and_package_pass(backend_dir):
    result = subprocess.run([sys.executable, "-m", "whisper_triton.deploy.image_check", "--repository", str(REPOSITORY),
                             "--backend-dir", str(backend_dir), "--no-gpu-modules"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "image check passed" in result.stderr


def test_without_tensorrt_llm_the_gpu_check_fails_with_the_cause():
    if importlib_available("tensorrt_llm"):
        pytest.skip("tensorrt_llm is installed here")
    problems = image_check.check_tensorrt_llm()
    assert problems and problems[0].startswith("import tensorrt_llm failed: ModuleNotFoundError")


def test_a_model_that_does_not_import_fails_the_check(backend_dir, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repository)
    model = repository / "transcribe" / "1" / "model.py"
    model.write_text(model.read_text().replace("whisper_triton.triton_models.transcribe_model",
                                               "whisper_triton.triton_models.no_such_module"))
    (repository / "whisper" / "1" / "model.py").write_text("import triton_python_backend_utils\n")
    problems = image_check.check_triton_models(repository, backend_dir)
    assert len(problems) == 2
    assert "transcribe/1/model.py does not load: ModuleNotFoundError" in problems[0]
    assert "whisper/1/model.py defines no TritonPythonModel" in problems[1]
    assert image_check.main(["--repository", str(repository), "--backend-dir", str(backend_dir), "--no-gpu-modules"]) == 1
    assert image_check.check_triton_models(repository, tmp_path)[0].endswith("pass --backend-dir of the Triton install")


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
