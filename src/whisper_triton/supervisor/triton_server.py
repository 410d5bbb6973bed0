"""Find, prepare, start, watch and stop a real `tritonserver` process.

Two places hold a server: NVIDIA's container (/opt/tritonserver) and the `nvidia-pytriton` wheel
(CPU machines, CI, laptops). The wheel's server needs a prepared backend directory and environment;
see the README's "Triton on CPU" notes for why each step is there.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cuda_compat import enable_forward_compatibility

logger = logging.getLogger(__name__)

NVIDIA_CONTAINER_HOME = Path("/opt/tritonserver")
_SHM_GLOB = "/dev/shm/triton_python_backend_shm_region_*"


class TritonStartError(RuntimeError):
    pass


@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path  # holds python/ (libtriton_python.so, utils, stub)
    cache_dir: Path | None
    library_dirs: list[Path] = field(default_factory=list)
    needs_prepared_backend: bool = False  # the wheel ships stubs apart from the backend
    stub_dir: Path | None = None


def find_triton(triton_home: str = "") -> TritonInstall:
    """The configured home, else NVIDIA's container, else the nvidia-pytriton wheel."""
    if triton_home:
        return _install_at(Path(triton_home))
    if (NVIDIA_CONTAINER_HOME / "bin" / "tritonserver").is_file():
        return _install_at(NVIDIA_CONTAINER_HOME)
    try:
        import pytriton  # noqa: F401  (located, not used)
    except ImportError as exc:
        raise TritonStartError(
            "No tritonserver found: not in /opt/tritonserver (NVIDIA's container) and the "
            "'nvidia-pytriton' wheel is not installed. Install it (pip install nvidia-pytriton==0.7.0) "
            "or set WHISPER_TRITON_TRITON_HOME to a Triton installation."
        ) from exc
    home = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    stub_dir = home / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (stub_dir / "triton_python_backend_stub").is_file():
        raise TritonStartError(f"nvidia-pytriton ships no Python backend stub for Python {sys.version_info[:2]}.")
    return TritonInstall(
        binary=home / "bin" / "tritonserver",
        backend_dir=home / "backends",
        cache_dir=home / "caches",
        library_dirs=[libs],
        needs_prepared_backend=True,
        stub_dir=stub_dir,
    )


def _install_at(home: Path) -> TritonInstall:
    binary = home / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonStartError(f"{binary} does not exist: WHISPER_TRITON_TRITON_HOME must point at a Triton install.")
    caches = home / "caches"
    return TritonInstall(binary=binary, backend_dir=home / "backends", cache_dir=caches if caches.is_dir() else None)


def prepare_backend_dir(install: TritonInstall, workdir: Path) -> Path:
    """A backend directory the wheel's server accepts: real copies (symlinks 'escape' it) plus the stub."""
    if not install.needs_prepared_backend:
        return install.backend_dir
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    source = install.backend_dir / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy_if_changed(source / name, target / name)
    assert install.stub_dir is not None
    _copy_if_changed(install.stub_dir / "triton_python_backend_stub", target / "triton_python_backend_stub")
    return target.parent


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return
    shutil.copy2(source, target)


# Least privilege for the Python-backend stubs, which parse untrusted media: Triton and its stubs get
# an explicit environment, never serve's whole one (the API key, AWS credentials and whatever else the
# platform injects stay with serve). What passes: the process basics below, the runtime tuning
# families (CUDA, NVIDIA, OpenMP and BLAS threads, CTranslate2, TensorRT-LLM and the MPI it starts,
# glibc malloc, Hugging Face offline flags), and the WHISPER_TRITON_* variables of non-secret settings
# (the models apply `resolve_settings` themselves).
CHILD_ENV_NAMES = frozenset({
    "PATH", "LD_LIBRARY_PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH",
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONHASHSEED", "TOKENIZERS_PARALLELISM",
})
CHILD_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "TRITON_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "CT2_",
                      "TRTLLM_", "TLLM_", "TRT_", "TENSORRT_", "NCCL_", "UCX_", "OMPI_", "OPAL_", "PMIX_", "HWLOC_",
                      "TORCH_", "PYTORCH_", "MALLOC_", "ORT_", "XDG_", "HF_", "TRANSFORMERS_")
# never passed, whatever the lists above say (HF_TOKEN, a key or credential under an allowed family)
CHILD_ENV_DENIED = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|^AWS_", re.I)


def child_setting_names() -> frozenset[str]:
    """WHISPER_TRITON_<FIELD> of every setting but the secret ones (SecretStr: the API key)."""
    from pydantic import SecretStr

    from ..settings import Settings

    return frozenset(f"WHISPER_TRITON_{name}".upper() for name, info in Settings.model_fields.items()
                     if info.annotation is not SecretStr)


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """The part of `environ` Triton and its stubs may see (the allowlist above)."""
    settings = child_setting_names()
    kept = {}
    for name, value in environ.items():
        upper = name.upper()
        # a name listed by name is known to hold no secret (TOKENIZERS_PARALLELISM matches TOKEN)
        families = name.startswith(CHILD_ENV_PREFIXES) or upper in settings
        if name in CHILD_ENV_NAMES or (families and not CHILD_ENV_DENIED.search(name)):
            kept[name] = value
    return kept


def server_environment(install: TritonInstall) -> dict[str, str]:
    """The stub runs Python isolated and finds site-packages via `python3` on PATH."""
    env = child_environment(dict(os.environ))
    python_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([python_bin, env.get("PATH", "") or os.defpath])
    # the stub must load this interpreter's libpython, and the wheel's own libraries
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", *map(str, install.library_dirs)]
    existing = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + ([existing] if existing else []))
    # CUDA forward compatibility for the child only (a no-op without an NVIDIA driver): compat libs first
    enable_forward_compatibility(env)
    return env


# Triton's gRPC protocols that only serve itself may call, with CONTROL_HEADER: the model repository
# (the registry loads and unloads engine models; a load may carry model files, so it is code execution),
# shared memory (maps regions into the server), logging and trace settings. Inference, health, metadata,
# model config and statistics stay open on loopback (the proxy and the tests read them; none writes).
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "logging", "trace")
CONTROL_HEADER = "whisper-triton-control"
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton expects the key's metadata under this prefix


@dataclass
class TritonPorts:
    http: int = 8000  # unused: Triton's HTTP endpoint is off (everything goes through gRPC)
    grpc: int = 8001
    metrics: int = 8002


class TritonServer:
    """One tritonserver child process bound to 127.0.0.1."""

    def __init__(
        self,
        model_repository: Path,
        workdir: Path,
        ports: TritonPorts = TritonPorts(),
        triton_home: str = "",
        log_verbose: int = 0,
        extra_args: list[str] | None = None,
    ):
        self.model_repository = Path(model_repository)
        self.workdir = Path(workdir)
        self.ports = ports
        self.install = find_triton(triton_home)
        self.log_verbose = log_verbose
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self._shm_before: set[str] = set()
        # a new secret per start: only this process (and the registry it hands it to) can pass the header
        self.control_key = secrets.token_urlsafe(32)

    def control_headers(self) -> dict[str, str]:
        """The gRPC metadata that opens Triton's restricted protocols (RESTRICTED_PROTOCOLS)."""
        return {GRPC_RESTRICTED_PREFIX + CONTROL_HEADER: self.control_key}

    def command(self, backend_dir: Path) -> list[str]:
        args = [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            # HTTP off: the proxy, the registry and the readiness wait speak gRPC only
            "--allow-http=false",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--grpc-port={self.ports.grpc}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_PROTOCOLS)}:{CONTROL_HEADER}={self.control_key}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=5",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.install.needs_prepared_backend:
            # no GPU: no pinned host memory, and a small first shared-memory region that grows
            args += ["--pinned-memory-pool-byte-size=0", "--backend-config=python,shm-default-byte-size=4194304"]
        if self.install.cache_dir is not None:
            args.append(f"--cache-directory={self.install.cache_dir}")
        return args + self.extra_args

    def start(self) -> "TritonServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        backend_dir = prepare_backend_dir(self.install, self.workdir)
        self._shm_before = set(glob.glob(_SHM_GLOB))
        cmd = self.command(backend_dir)
        logger.info("starting tritonserver: %s", " ".join(cmd).replace(self.control_key, "<secret>"))
        self.process = subprocess.Popen(cmd, env=server_environment(self.install), start_new_session=True)
        return self

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stub_processes(self) -> dict[int, str]:
        """pid -> model of each Python-backend stub this server runs (Linux /proc; empty elsewhere)."""
        if self.process is None:
            return {}
        stubs = {}
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != self.process.pid:
                    continue
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 1:
                stubs[int(entry.name)] = Path(args[1].decode(errors="replace")).parent.parent.name
        return stubs

    def wait_ready(self, models: list[str], timeout_s: float) -> None:
        """Block until the server and `models` are ready; raise with the reason after `timeout_s`."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        with grpcclient.InferenceServerClient(f"127.0.0.1:{self.ports.grpc}") as client:
            while time.monotonic() < deadline:
                if not self.is_running():
                    code = self.process.returncode if self.process else None
                    raise TritonStartError(
                        f"tritonserver exited with code {code} before it was ready; its log above says why "
                        "(a model that failed to load, a port in use, a missing backend)."
                    )
                if _ready(client, models):
                    logger.info("tritonserver ready on 127.0.0.1 (grpc %d)", self.ports.grpc)
                    return
                time.sleep(0.25)
        self.stop()
        raise TritonStartError(
            f"tritonserver was not ready within {timeout_s:.0f} s (models: {', '.join(models)}). Raise "
            "WHISPER_TRITON_TRITON_STARTUP_TIMEOUT_S if the model is large, or read the log above."
        )

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop within %.0f s: killing it", timeout_s)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
                self._remove_leaked_shm()
        return self.process.returncode

    def _remove_leaked_shm(self) -> None:
        # a killed server leaves its Python-backend shared memory behind
        for path in set(glob.glob(_SHM_GLOB)) - self._shm_before:
            try:
                os.unlink(path)
            except OSError:
                pass


def _ready(client, models: list[str]) -> bool:
    """Triton and each of `models` ready (gRPC health; any failure to answer is "not yet")."""
    try:
        return bool(client.is_server_ready(client_timeout=2)) and all(
            client.is_model_ready(name, client_timeout=2) for name in models)
    except Exception:  # noqa: BLE001 - not listening yet, or starting: keep waiting
        return False
