"""CUDA forward compatibility for the Triton child, set up by `serve` when the host's driver is too old.

The serving image (Triton 25.01) is built on CUDA 12.8, whose driver is the R570 branch. On an
older data-center driver (SageMaker's default on ml.g5 is 470; the `al2-ami-sagemaker-inference-gpu-2-1`
and `-3-1` AMIs give 535 and 550) CUDA 12.8 still runs through the CUDA forward-compatibility
libraries the image ships in `/usr/local/cuda/compat`: a newer `libcuda.so` that works on top of
the older kernel module. Since NVIDIA Container Toolkit 1.17.4 those libraries are no longer mounted
into the container automatically, and the SageMaker AMIs named "with disabled CUDA-compat mounting"
leave it to the container (AWS: "Updating inference containers to comply with the NVIDIA Container
Toolkit"). So `serve` does it for its Triton child: when the host driver (from
`/proc/driver/nvidia/version`) is older than the driver the compat `libcuda.so.<version>` was cut
from, the compat directory goes first on the child's `LD_LIBRARY_PATH`; with a new enough driver
nothing changes (the compat library must not shadow a newer driver).

Forward compatibility works on data-center GPUs only (A10G, T4, L4, A100, H100: every SageMaker GPU
instance). Everything here is pure logic over files, unit-tested with fake driver files.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
COMPAT_ROOT = Path("/usr/local/cuda/compat")
# "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 ..." or, for the open
# kernel modules, "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build ..."
_KERNEL_MODULE_RE = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)")
_LIBCUDA_RE = re.compile(r"^libcuda\.so\.(\d+\.\d+(?:\.\d+)*)$")


@dataclass(frozen=True, order=True)
class DriverVersion:
    parts: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "DriverVersion":
        return cls(tuple(int(part) for part in text.strip().split(".")))

    def __str__(self) -> str:
        return ".".join(str(part) for part in self.parts)


@dataclass(frozen=True)
class CompatDecision:
    use_compat: bool
    reason: str
    host_driver: DriverVersion | None = None
    compat_driver: DriverVersion | None = None
    library_dir: Path | None = None


def host_driver_version(version_file: Path = DRIVER_VERSION_FILE) -> DriverVersion | None:
    """The loaded kernel module's version, or None where there is no NVIDIA driver (CPU machines)."""
    try:
        text = Path(version_file).read_text(errors="replace")
    except OSError:
        return None
    match = _KERNEL_MODULE_RE.search(text)
    return DriverVersion.parse(match.group(1)) if match else None


def compat_library_dir(compat_root: Path = COMPAT_ROOT) -> Path | None:
    """The directory holding the compat `libcuda.so.1` (NGC images have it in compat/ or compat/lib)."""
    for candidate in (compat_root, compat_root / "lib", compat_root / "lib.real"):
        if (candidate / "libcuda.so.1").exists() or _versioned_libcuda(candidate):
            return candidate
    return None


def _versioned_libcuda(directory: Path) -> list[Path]:
    try:
        return sorted(path for path in directory.iterdir() if _LIBCUDA_RE.match(path.name))
    except OSError:
        return []


def compat_driver_version(library_dir: Path) -> DriverVersion | None:
    """The driver the compat libcuda comes from: `libcuda.so.1` -> `libcuda.so.570.86.10`."""
    link = library_dir / "libcuda.so.1"
    names = []
    if link.is_symlink():
        names.append(os.readlink(link))
    names += [path.name for path in _versioned_libcuda(library_dir)]
    for name in names:
        match = _LIBCUDA_RE.match(Path(name).name)
        if match:
            return DriverVersion.parse(match.group(1))
    return None


def decide(host: DriverVersion | None, compat: DriverVersion | None, library_dir: Path | None) -> CompatDecision:
    if host is None:
        return CompatDecision(False, "no NVIDIA driver here (no GPU): nothing to set up")
    if library_dir is None or compat is None:
        return CompatDecision(False, f"NVIDIA driver {host}; the image ships no CUDA compat libraries", host)
    if host >= compat:
        return CompatDecision(False, f"NVIDIA driver {host} is not older than the image's CUDA (compat driver "
                                     f"{compat}): forward compatibility not needed", host, compat, library_dir)
    return CompatDecision(True, f"NVIDIA driver {host} is older than the image's CUDA needs (compat driver {compat}): "
                                f"using the forward-compatibility libraries in {library_dir}", host, compat, library_dir)


def prepend_library_dir(existing: str, library_dir: Path) -> str:
    """`LD_LIBRARY_PATH` with `library_dir` first (moved there if it was already listed)."""
    entries = [entry for entry in existing.split(os.pathsep) if entry and entry != str(library_dir)]
    return os.pathsep.join([str(library_dir), *entries])


def enable_forward_compatibility(environ: MutableMapping[str, str] | None = None, *,
                                 version_file: Path = DRIVER_VERSION_FILE, compat_root: Path = COMPAT_ROOT) -> CompatDecision:
    """Put the compat libraries first on `environ["LD_LIBRARY_PATH"]` when the driver needs them.

    `environ`: the Triton child's environment (`triton_server.server_environment` passes it; the
    default is this process's own). The dynamic loader's search path is not a setting of the project,
    so it does not go through settings.py; serve itself loads no CUDA library.
    """
    if environ is None:
        environ = os.environ
    library_dir = compat_library_dir(compat_root)
    decision = decide(host_driver_version(version_file), compat_driver_version(library_dir) if library_dir else None,
                      library_dir)
    if decision.use_compat and decision.library_dir is not None:
        environ["LD_LIBRARY_PATH"] = prepend_library_dir(environ.get("LD_LIBRARY_PATH", ""), decision.library_dir)
        logger.info("CUDA forward compatibility: %s", decision.reason)
    elif decision.host_driver is None:
        logger.debug("CUDA forward compatibility: %s", decision.reason)
    else:
        logger.info("CUDA forward compatibility: %s", decision.reason)
    return decision


def main(argv: list[str] | None = None) -> int:
    """`python3 -m whisper_triton.supervisor.cuda_compat --library-dir`: the compat directory this module would
    use (compat/, compat/lib or compat/lib.real), for the image's build-time import check."""
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m whisper_triton.supervisor.cuda_compat")
    parser.add_argument("--library-dir", action="store_true", help="print the compat libcuda directory")
    parser.add_argument("--compat-root", type=Path, default=COMPAT_ROOT)
    args = parser.parse_args(argv)
    library_dir = compat_library_dir(args.compat_root)
    if library_dir is None:
        logger.error("no CUDA compat libcuda under %s (compat/, compat/lib, compat/lib.real)", args.compat_root)
        return 1
    print(library_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
