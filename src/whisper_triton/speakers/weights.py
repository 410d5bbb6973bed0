"""The speaker encoder's weights: resemblyzer 0.1.4's pretrained GE2E voice encoder, converted once
(at install or image build: `python -m whisper_triton.speakers.weights`) from the wheel's
`resemblyzer/pretrained.pt` into a numpy `.npz` that the serving path loads. Never downloaded at run
time, and no torch anywhere: the file is read with a restricted unpickler that understands torch's
legacy serialization (a pickled dict whose tensors point at storages stored after it) and accepts
nothing else (no arbitrary classes), so a tampered file cannot run code.

The wheel is installed `--no-deps` (only its weights are used; its torch, librosa and webrtcvad
requirements are not needed here) and located without importing it, as vad.py finds silero-vad's model.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import logging
import os
import pickle
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

RESEMBLYZER_VERSION = "0.1.4"
SOURCE_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"  # resemblyzer 0.1.4 pretrained.pt
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
EXPECTED_SHAPES = {
    **{f"lstm.weight_ih_l{i}": (1024, 40 if i == 0 else 256) for i in range(3)},
    **{f"lstm.weight_hh_l{i}": (1024, 256) for i in range(3)},
    **{f"lstm.bias_ih_l{i}": (1024,) for i in range(3)},
    **{f"lstm.bias_hh_l{i}": (1024,) for i in range(3)},
    "linear.weight": (256, 256),
    "linear.bias": (256,),
}
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "LongStorage": np.int64,
                   "IntStorage": np.int32, "HalfStorage": np.float16, "ByteStorage": np.uint8}


def resemblyzer_weights_path() -> Path:
    """`pretrained.pt` inside the installed resemblyzer wheel (not imported: its __init__ needs torch)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The speaker encoder's weights come from the resemblyzer wheel: install it with "
                           f"`pip install --no-deps resemblyzer=={RESEMBLYZER_VERSION}` (scripts/install.sh does).")
    return Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"


def default_encoder_path() -> Path:
    """Where the converted weights go unless WHISPER_TRITON_SPEAKER_ENCODER says otherwise (settings.py)."""
    from ..settings import load_settings

    return load_settings().resolved_speaker_encoder()


class _Storage:
    def __init__(self, dtype, key: str, size: int):
        self.dtype, self.key, self.size = dtype, key, size
        self.data: np.ndarray | None = None


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def array(self) -> np.ndarray:
        base = self.storage.data
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.shape,
                                               strides=tuple(s * itemsize for s in self.stride))
        return np.array(view)  # a copy, contiguous


def _rebuild_tensor(storage, offset, shape, stride, *_):
    return _Tensor(storage, offset, shape, stride)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Unpickler(pickle.Unpickler):
    """Only what torch's legacy format of a state dict needs; anything else is refused."""

    def __init__(self, handle, storages: dict):
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a torch state dict: refused")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, size = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid[:2]!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGE_DTYPES[storage_type.name], key, int(size))
        return self.storages[key]


def read_legacy_state(path: Path) -> dict:
    """The checkpoint of a torch (< 1.6, non-zip) file: its tensors as numpy arrays, nested dicts as dicts."""
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as handle:
        magic = pickle.load(handle)
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path} is not a legacy torch file (magic {magic!r})")
        pickle.load(handle)  # protocol version
        pickle.load(handle)  # system info (endianness, type sizes)
        checkpoint = _Unpickler(handle, storages).load()
        keys = pickle.load(handle)
        for key in keys:
            storage = storages[key]
            count = int.from_bytes(handle.read(8), "little")
            if count != storage.size:
                raise ValueError(f"storage {key}: {count} elements on disk, {storage.size} declared")
            storage.data = np.frombuffer(handle.read(count * np.dtype(storage.dtype).itemsize), dtype=storage.dtype)
    return _arrays(checkpoint)


def _arrays(value):
    if isinstance(value, _Tensor):
        return value.array()
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_arrays(v) for v in value)
    return value


def convert(source: Path | None = None, target: Path | None = None) -> Path:
    """resemblyzer's pretrained.pt -> the encoder's .npz (float32), checked against the pinned sha256 and shapes."""
    source = Path(source) if source else resemblyzer_weights_path()
    target = Path(target) if target else default_encoder_path()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise RuntimeError(f"{source} has sha256 {digest}, not resemblyzer {RESEMBLYZER_VERSION}'s "
                           f"{SOURCE_SHA256}: reinstall resemblyzer=={RESEMBLYZER_VERSION}.")
    state = read_legacy_state(source)["model_state"]
    weights = {name: np.asarray(state[name], dtype=np.float32) for name in EXPECTED_SHAPES}
    for name, shape in EXPECTED_SHAPES.items():
        if weights[name].shape != shape:
            raise RuntimeError(f"{name} has shape {weights[name].shape}, expected {shape}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.stem}.tmp-{os.getpid()}.npz")
    np.savez(staging, source_sha256=np.array(digest), **{k.replace(".", "/"): v for k, v in weights.items()})
    staging.replace(target)
    logger.info("speaker encoder weights converted: %s -> %s", source, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert resemblyzer's voice encoder weights for serving (no torch).")
    parser.add_argument("--source", type=Path, default=None, help="pretrained.pt (default: the installed wheel's)")
    parser.add_argument("--target", type=Path, default=None,
                        help=f"the .npz to write (default: {default_encoder_path()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(convert(args.source, args.target))


if __name__ == "__main__":
    main()
