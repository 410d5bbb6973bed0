"""CUDA forward compatibility for the Triton child, decided from fake driver files (no GPU here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from whisper_triton.supervisor import cuda_compat
from whisper_triton.supervisor.cuda_compat import DriverVersion, enable_forward_compatibility

# what /proc/driver/nvidia/version says on the drivers SageMaker hosts run
PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Tue Mar  5 22:20:25 UTC 2024\n"
               "GCC version:  gcc version 10.5.0 20230707 (Red Hat 10.5.0-1) (GCC)\n")
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  (dvs-builder@U16)  Thu Jan 16\n"


def _driver(tmp_path: Path, version: str, template: str = PROPRIETARY) -> Path:
    path = tmp_path / "proc-version"
    path.write_text(template.format(v=version))
    return path


def _compat(tmp_path: Path, version: str, subdir: str = "") -> Path:
    """An image's /usr/local/cuda/compat as the cuda-compat package lays it out (symlinks to the real file)."""
    root = tmp_path / "compat"
    lib = root / subdir if subdir else root
    lib.mkdir(parents=True)
    (lib / f"libcuda.so.{version}").write_bytes(b"\x7fELF")
    (lib / "libcuda.so.1").symlink_to(f"libcuda.so.{version}")
    (lib / "libcuda.so").symlink_to("libcuda.so.1")
    return root


@pytest.mark.parametrize("template", [PROPRIETARY, OPEN])
def test_the_host_driver_version_is_read_from_the_kernel_module_line(tmp_path, template):
    assert cuda_compat.host_driver_version(_driver(tmp_path, "550.54.15", template)) == DriverVersion((550, 54, 15))
    assert cuda_compat.host_driver_version(tmp_path / "missing") is None
    (tmp_path / "garbage").write_text("no version here")
    assert cuda_compat.host_driver_version(tmp_path / "garbage") is None


def test_versions_compare_by_numbers_not_text():
    assert DriverVersion.parse("470.256.02") < DriverVersion.parse("570.86.10")
    assert DriverVersion.parse("580.65.06") > DriverVersion.parse("570.86.10")
    assert DriverVersion.parse("535.183.01") < DriverVersion.parse("535.1000.1")  # "183" > "1000" as text


@pytest.mark.parametrize("subdir", ["", "lib"])
def test_an_older_driver_puts_the_compat_libraries_first_for_the_child(tmp_path, subdir):
    root = _compat(tmp_path, "570.86.10", subdir)
    environ = {"LD_LIBRARY_PATH": "/opt/tritonserver/lib:/usr/local/cuda/lib64"}
    decision = enable_forward_compatibility(environ, version_file=_driver(tmp_path, "470.256.02"), compat_root=root)
    library_dir = root / subdir if subdir else root
    assert decision.use_compat and decision.library_dir == library_dir
    assert (decision.host_driver, decision.compat_driver) == (DriverVersion((470, 256, 2)), DriverVersion((570, 86, 10)))
    assert environ["LD_LIBRARY_PATH"] == f"{library_dir}:/opt/tritonserver/lib:/usr/local/cuda/lib64"
    # twice (NVIDIA's entrypoint or a restart may have done it already): still listed once, first
    enable_forward_compatibility(environ, version_file=_driver(tmp_path, "470.256.02"), compat_root=root)
    assert environ["LD_LIBRARY_PATH"].split(os.pathsep).count(str(library_dir)) == 1
    assert environ["LD_LIBRARY_PATH"].startswith(str(library_dir))


@pytest.mark.parametrize("host", ["570.86.10", "580.65.06"])
def test_a_new_enough_driver_is_left_alone(tmp_path, host):
    root = _compat(tmp_path, "570.86.10")
    environ = {"LD_LIBRARY_PATH": "/opt/tritonserver/lib"}
    decision = enable_forward_compatibility(environ, version_file=_driver(tmp_path, host), compat_root=root)
    assert not decision.use_compat and "not needed" in decision.reason
    assert environ == {"LD_LIBRARY_PATH": "/opt/tritonserver/lib"}  # a compat libcuda must never shadow a newer driver


def test_no_gpu_or_no_compat_package_changes_nothing(tmp_path):
    environ: dict[str, str] = {}
    decision = enable_forward_compatibility(environ, version_file=tmp_path / "none", compat_root=_compat(tmp_path, "570.86.10"))
    assert not decision.use_compat and decision.host_driver is None and environ == {}
    decision = enable_forward_compatibility(environ, version_file=_driver(tmp_path, "470.256.02"),
                                            compat_root=tmp_path / "no-compat")
    assert not decision.use_compat and "no CUDA compat libraries" in decision.reason and environ == {}


def test_this_machine_has_no_nvidia_driver_so_serve_changes_nothing():
    """The real files of this CPU machine: no /proc/driver/nvidia/version, so no-op."""
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA driver")
    environ = {"LD_LIBRARY_PATH": "/x"}
    decision = enable_forward_compatibility(environ)
    assert not decision.use_compat and environ == {"LD_LIBRARY_PATH": "/x"}
