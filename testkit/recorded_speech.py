"""Recorded speech with its text for tests and benchmarks: the Asterisk PBX prompts in Debian
(`asterisk-core-sounds-en-g722`: 16 kHz G.722 recordings of one speaker, Allison Smith; the texts in
`asterisk-core-sounds-en`'s `core-sounds-en.txt.gz`). espeak-ng flatters every system; these do not.

A minimal fetcher of this task's own (issue 22): `apt-get download` of the two pinned packages,
sha256-checked against the values below, unpacked with `dpkg-deb -x` into `.work/speech/`, once.
`python -m testkit.recorded_speech` fetches them (scripts/install.sh --test runs it).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".work" / "speech"
VERSION = "1.6.1-1"
PACKAGES = {  # Debian bookworm's pool; sha256 of each .deb
    "asterisk-core-sounds-en-g722": "38c5261820b406dcb0ecb37675720da2b0864850690690352ca52707eb623806",
    "asterisk-core-sounds-en": "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50",
}
TARGET = WORK / f"asterisk-core-sounds-en-{VERSION}"
SOUNDS = TARGET / "usr/share/asterisk/sounds/en_US_f_Allison"
TEXTS = TARGET / "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"

# prompts of 6 to 12 words that are plain sentences (no digits spoken as numbers, no "..." fragments)
SENTENCES = (
    "agent-pass", "cannot-complete-as-dialed", "check-number-dial-again", "conf-leaderhasleft",
    "conf-now-recording", "conf-onlyperson", "conf-placeintoconf", "conf-waitforleader", "confbridge-removed",
    "demo-echodone", "dir-nomatch", "enter-num-blacklist", "feature-not-avail-line", "please-try-call-later",
    "pls-hold-while-try", "privacy-unident", "speed-dial-empty", "transfer", "tt-weasels", "tt-monkeysintro",
    "conf-roll-callcomplete", "confbridge-lock-no-join", "dir-nomore", "privacy-prompt",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(package: str, folder: Path) -> None:
    """`apt-get download`, after one `apt-get update` when the package lists do not know it yet."""
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", package], cwd=folder, timeout=300, capture_output=True)
        if done.returncode == 0:
            return
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], timeout=300, capture_output=True)
    raise RuntimeError(f"apt-get download {package} failed: {done.stderr.decode(errors='replace')[-300:]}")


def fetch() -> Path:
    """The unpacked packages (downloaded and checked once); RuntimeError says how to get them."""
    if SOUNDS.is_dir() and TEXTS.is_file():
        return TARGET
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("Recorded speech needs Debian's apt-get and dpkg-deb (asterisk-core-sounds-en-g722).")
    with tempfile.TemporaryDirectory(dir=WORK.parent if WORK.parent.exists() else None) as tmp:
        folder = Path(tmp)
        for name, sha256 in PACKAGES.items():
            _download(f"{name}={VERSION}", folder)
            deb = next(folder.glob(f"{name}_*.deb"))
            if _sha256(deb) != sha256:
                raise RuntimeError(f"{deb.name} does not have the pinned sha256 {sha256}: refusing to use it.")
        unpacked = folder / "unpacked"
        for deb in folder.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, timeout=120)
        WORK.mkdir(parents=True, exist_ok=True)
        if TARGET.exists():
            shutil.rmtree(TARGET)
        unpacked.rename(TARGET)
    logger.info("recorded speech unpacked into %s", TARGET)
    return TARGET


@lru_cache(maxsize=1)
def texts() -> dict[str, str]:
    """prompt name -> its text, from the package's list."""
    fetch()
    result = {}
    for line in gzip.decompress(TEXTS.read_bytes()).decode("utf-8", "replace").splitlines():
        name, sep, text = line.partition(":")
        if sep and not line.lstrip().startswith(";"):
            result[name.strip()] = " ".join(text.split())
    return result


def samples(name: str) -> np.ndarray:
    """One prompt as 16 kHz mono float32 (G.722 decoded by PyAV/FFmpeg)."""
    import av

    fetch()
    with av.open(str(SOUNDS / f"{name}.g722"), format="g722") as container:
        frames = [frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)]
    audio = np.concatenate(frames)
    return (audio.astype(np.float32) / 32768.0) if audio.dtype == np.int16 else audio.astype(np.float32)


def sentences(count: int | None = None, offset: int = 0) -> list[tuple[np.ndarray, str]]:
    """(samples, text) of the plain-sentence prompts, `count` of them from `offset` (cycling)."""
    names = SENTENCES[offset:] + SENTENCES[:offset]
    if count is not None:
        names = tuple(names[i % len(names)] for i in range(count))
    table = texts()
    return [(samples(name), table[name]) for name in names]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(fetch())
