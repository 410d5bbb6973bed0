"""Recorded human speech with reference texts, fetched from package registries (tests and benchmarks).

espeak-ng is synthetic and flatters every system; these are real recordings:

- Debian's `asterisk-core-sounds-{en,es,fr,it,ru}` telephony prompts (one professional speaker per
  language): the `-g722` packages hold them as G.722 (16 kHz), the `-gsm` packages as GSM 06.10
  (8 kHz, telephone quality); the texts are in the plain package's `core-sounds-XX.txt.gz`
  (`name: text` lines). Debian has no other languages of this set (no nl, de, pt).
- The LibriVox audiobook clips (Jane Austen, 16 kHz WAV) in the `pocketsphinx==5.1.1` source
  distribution, `test/data/librivox/`, with their `.txt` transcripts.

Everything is pinned (version and SHA-256 of each archive), downloaded with the ordinary clients
(`apt-get download`, `pip download`), unpacked once under `.work/real-speech/` and reused.

Which prompts count as speech with a usable reference (decided here, once):
- skipped: `digits/`, `letters/`, `phonetic/` (single numbers, letters and spelling words: a test of
  number formatting, not of recognition) and texts holding `*`, `#` (spoken as "star"/"pound" or
  the language's word: the reference does not say which) or an annotation in brackets inside the
  text ("Sus saludos [temporales]", "Pour (emphase)": the text does not say what is heard);
- non-speech: a text that is only a bracketed description (`[ascending tones]`, `(beep)`,
  `<beep ascending>`, `[ grabacion de monos gritando ]`) and `silence/*`: no word may be written on them;
- everything else is speech, numbers written as digits in a few texts are scored through the
  normaliser (`testkit/scoring.py`: numbers as words).

    python -m testkit.real_speech --fixture   # what the tests use (scripts/install.sh --test runs it)
    python -m testkit.real_speech --all       # everything the benchmark uses
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("WHISPER_TRITON_REAL_SPEECH_DIR", ROOT / ".work" / "real-speech"))
LANGUAGES = ("en", "es", "fr", "it", "ru")
CODECS = {"g722": 16_000, "gsm": 8_000}  # codec -> sample rate of the recordings
DEBIAN_VERSION = "1.6.1-1"
# package -> SHA-256 of its .deb at DEBIAN_VERSION (Debian 12 bookworm main)
DEBS = {
    "asterisk-core-sounds-en": "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50",
    "asterisk-core-sounds-en-g722": "38c5261820b406dcb0ecb37675720da2b0864850690690352ca52707eb623806",
    "asterisk-core-sounds-en-gsm": "ddc33205a56aebf54c73a0fb95c3a0d8131087878d74857a4e54bcab2b0d72ae",
    "asterisk-core-sounds-es": "9afdab7f559f036649fb406e625899306ca1004df8ebe39c30bfbd5912d66f74",
    "asterisk-core-sounds-es-g722": "e4e3b4281057d3b81b779298fd6be705f57411513955c518eed1bcaabbd615b8",
    "asterisk-core-sounds-es-gsm": "533b4c29e232cae99f89a6933b5fc0af5341514e513924df401c683e222614b7",
    "asterisk-core-sounds-fr": "04c82c78c570c43a7136cbc5e2488d0c470b775468dff9fbce4a131b18cf1056",
    "asterisk-core-sounds-fr-g722": "7add61d5e42279ecff1bbdf842a5a946ac3644fac9a0fe44384731aa7270c8e0",
    "asterisk-core-sounds-fr-gsm": "97bd8bebb7ef775046802a5a466d8f89916f54f437e158a1ec537cef814d44fd",
    "asterisk-core-sounds-it": "3884d9457e12f21caa018c18f0d587df5d53ebea14b673d8453a134c5941ab3b",
    "asterisk-core-sounds-it-g722": "46b4cf7afc508a5fcfc051b7ea233251c0d195dd4ef83cc4b7facb4c6429b016",
    "asterisk-core-sounds-it-gsm": "fb6d6ce94502894714f00240c372a291bcaa4cd3e05fdf278780a4dd9edfabab",
    "asterisk-core-sounds-ru": "28a61616bb0cd3345a7ea532dec4df9f071e5d0fa9f8c1a563ea9669002f39ab",
    "asterisk-core-sounds-ru-g722": "673b4238a6b8269960f055d868c6a11083f7a0d00979167cb01554046b48ed9b",
    "asterisk-core-sounds-ru-gsm": "19770f5c211e8c3a1dc8eefd703382570da7edf00c52db069ebc2a64d5dda4bd",
}
POCKETSPHINX = ("pocketsphinx", "5.1.1", "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355")
LIBRIVOX_DIR = "pocketsphinx-5.1.1/test/data/librivox"
SKIPPED_DIRS = ("digits/", "letters/", "phonetic/")
SPEAKERS = {"en": "en_US_f_Allison", "es": "es_MX_f_Allison", "fr": "fr_CA_f_June", "it": "it_IT_m_Carlo",
            "ru": "ru_RU_f_IvrvoiceRU"}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recording:
    """One recorded clip and what is said in it (`text` is empty for non-speech)."""

    name: str  # e.g. "es/g722/vm-goodbye"
    language: str
    text: str
    path: Path
    codec: str  # g722 | gsm | wav
    speech: bool = True

    @property
    def rate(self) -> int:
        return CODECS.get(self.codec, 16_000)

    def samples(self, rate: int = 16_000) -> np.ndarray:
        """Mono float32 at `rate`."""
        return decode_file(self.path, self.codec, rate)

    def native(self) -> np.ndarray:
        """Mono float32 at the recording's own rate (8 kHz for GSM): what a telephony client sends."""
        return decode_file(self.path, self.codec, self.rate)


class FetchError(RuntimeError):
    pass


# ---- fetching -------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked(path: Path, expected: str) -> Path:
    actual = sha256_of(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise FetchError(f"{path.name}: SHA-256 {actual} is not the pinned {expected}; the file was removed. "
                         "Retry; if it persists, the registry serves another build: update the pin in "
                         "testkit/ after checking the new archive.")
    return path


def download_deb(package: str, version: str, sha256: str, folder: Path) -> Path:
    """`package=version`'s .deb downloaded into `folder` with `apt-get download` (the package lists read
    once on a fresh machine) and checked against `sha256`: the one Debian downloader of testkit/."""
    if shutil.which("apt-get") is None:
        raise FetchError(f"apt-get is needed to fetch {package} (Debian/Ubuntu); place its .deb in {folder} by hand.")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        os.chmod(staging, 0o755)  # apt's sandbox user may write there
        result = _apt_download(f"{package}={version}", staging)
        if result.returncode != 0 and os.geteuid() == 0:  # no package lists yet (a fresh machine): read them once
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
            result = _apt_download(f"{package}={version}", staging)
        found = list(Path(staging).glob(f"{package}_*.deb"))
        if result.returncode != 0 or not found:
            raise FetchError(f"apt-get download {package}={version} failed ({result.stderr.strip()[-300:]}). "
                             "Run `apt-get update` once (as root) and retry.")
        target = folder / found[0].name.replace("%3a", "_")
        found[0].rename(target)
    return _checked(target, sha256)


def _apt_download(spec: str, folder: str) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", "-q", spec], cwd=folder, capture_output=True, text=True,
                          timeout=600)


def download_sdist(name: str, version: str, sha256: str, folder: Path) -> Path:
    """`name==version`'s source distribution downloaded into `folder` with `pip download`, checked."""
    archive = folder / f"{name}-{version}.tar.gz"
    if not archive.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", f"{name}=={version}", "-d", str(folder)],
                       check=True, timeout=900)
    return _checked(archive, sha256)


def fetch_deb(package: str, cache: Path = CACHE) -> Path:
    """The package's .deb at DEBIAN_VERSION, checked, under `cache/debs/`."""
    target = cache / "debs" / f"{package}_{DEBIAN_VERSION}_all.deb"
    if target.is_file():
        return _checked(target, DEBS[package])
    return download_deb(package, DEBIAN_VERSION, DEBS[package], cache / "debs")


def unpack_deb(package: str, cache: Path = CACHE) -> Path:
    """The package unpacked (`dpkg-deb -x`) into `cache/tree/`; once (a marker file records it)."""
    tree = cache / "tree"
    marker = cache / "unpacked" / package
    if not marker.is_file():
        deb = fetch_deb(package, cache)
        tree.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=600, capture_output=True)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(DEBS[package] + "\n")
    return tree


def fetch_librivox(cache: Path = CACHE) -> Path:
    """The folder of the LibriVox clips from the pinned pocketsphinx sdist."""
    name, version, sha = POCKETSPHINX
    folder = cache / LIBRIVOX_DIR
    if (folder / "transcription").is_file():
        return folder
    archive = download_sdist(name, version, sha, cache / "sdists")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(LIBRIVOX_DIR + "/") and m.isfile()]
        tar.extractall(cache, members=members, filter="data")
    return folder


# ---- reading --------------------------------------------------------------------------------------
def decode_file(path: Path, codec: str, rate: int = 16_000) -> np.ndarray:
    """A raw G.722/GSM file (no header: the format is named) or a WAV, as mono float32 at `rate`."""
    import av

    container = av.open(str(path), format=None if codec == "wav" else codec)
    with container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        parts = []
        for frame in container.decode(audio=0):
            parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """16-bit mono WAV in memory: what a client sends."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


_ONLY_ANNOTATION = re.compile(r"^\s*[\[(<][^\])>]*[\])>]\s*$")
_ANNOTATION = re.compile(r"[\[\]()<>]")


def classify(name: str, text: str) -> str:
    """'speech', 'non-speech' or 'skip' for one prompt of core-sounds-XX.txt (rules: module docstring)."""
    if name.startswith("silence/") or _ONLY_ANNOTATION.match(text):
        return "non-speech"
    if name.startswith(SKIPPED_DIRS) or not text.strip() or "*" in text or "#" in text or _ANNOTATION.search(text):
        return "skip"
    return "speech"


def parse_texts(data: str) -> dict[str, str]:
    """`name: text` lines of core-sounds-XX.txt (comments start with ';')."""
    texts = {}
    for line in data.lstrip("\ufeff").splitlines():
        if not line.strip() or line.lstrip().startswith(";") or ":" not in line:
            continue
        name, text = line.split(":", 1)
        texts[name.strip()] = " ".join(text.split())
    return texts


@lru_cache(maxsize=None)
def _texts(language: str, cache: Path) -> dict[str, str]:
    tree = unpack_deb(f"asterisk-core-sounds-{language}", cache)
    path = tree / "usr" / "share" / "doc" / f"asterisk-core-sounds-{language}" / f"core-sounds-{language}.txt.gz"
    return parse_texts(gzip.decompress(path.read_bytes()).decode("utf-8"))


def prompts(language: str, codec: str = "g722", cache: Path = CACHE, kind: str = "speech") -> list[Recording]:
    """The language's prompts of `kind` ('speech' or 'non-speech') in `codec`, sorted by name."""
    if language not in LANGUAGES or codec not in CODECS:
        raise ValueError(f"language must be one of {LANGUAGES} and codec one of {tuple(CODECS)}")
    tree = unpack_deb(f"asterisk-core-sounds-{language}-{codec}", cache)
    folder = tree / "usr" / "share" / "asterisk" / "sounds" / SPEAKERS[language]
    found = []
    for name, text in sorted(_texts(language, cache).items()):
        path = folder / f"{name}.{codec}"
        if path.is_file() and classify(name, text) == kind:
            found.append(Recording(f"{language}/{codec}/{name}", language, text if kind == "speech" else "", path,
                                   codec, speech=kind == "speech"))
    return found


# prompts of 6 to 12 words that are plain sentences (no digits spoken as numbers, no "..." fragments)
PLAIN_SENTENCES = (  # English (en/g722)
    "agent-pass", "cannot-complete-as-dialed", "check-number-dial-again", "conf-leaderhasleft",
    "conf-now-recording", "conf-onlyperson", "conf-placeintoconf", "conf-waitforleader", "confbridge-removed",
    "demo-echodone", "dir-nomatch", "enter-num-blacklist", "feature-not-avail-line", "please-try-call-later",
    "pls-hold-while-try", "privacy-unident", "speed-dial-empty", "transfer", "tt-weasels", "tt-monkeysintro",
    "conf-roll-callcomplete", "confbridge-lock-no-join", "dir-nomore", "privacy-prompt",
)


def sentences(count: int | None = None, offset: int = 0, cache: Path = CACHE) -> list[tuple[np.ndarray, str]]:
    """(16 kHz samples, text) of English plain-sentence prompts (live sessions, long files of turns),
    `count` of them from `offset`, cycling."""
    by_name = {r.name.rsplit("/", 1)[1]: r for r in prompts("en", "g722", cache)}
    names = PLAIN_SENTENCES[offset:] + PLAIN_SENTENCES[:offset]
    if count is not None:
        names = tuple(names[i % len(names)] for i in range(count))
    return [(by_name[name].samples(), by_name[name].text) for name in names]


def librivox(cache: Path = CACHE) -> list[Recording]:
    folder = fetch_librivox(cache)
    ids = (folder / "fileids").read_text().split()
    return [Recording(f"en/librivox/{i[-4:]}", "en", " ".join((folder / f"{i}.txt").read_text().split()),
                      folder / f"{i}.wav", "wav") for i in ids]


def draw(recordings: list[Recording], count: int, offset: int = 0, min_words: int = 1,
         max_seconds: float | None = None) -> list[Recording]:
    """`count` recordings spread evenly over the sorted list (deterministic), starting at `offset`
    (another offset gives another, mostly disjoint, draw), of at least `min_words` words."""
    pool = [r for r in recordings if len(r.text.split()) >= min_words]
    if max_seconds is not None:
        pool = [r for r in pool if _seconds(r) <= max_seconds]
    if count >= len(pool):
        return pool
    step = len(pool) / count
    return [pool[(int(i * step) + offset) % len(pool)] for i in range(count)]


def _seconds(recording: Recording) -> float:
    # G.722 at 64 kbit/s: 8,000 bytes a second; GSM 06.10: 33 bytes per 20 ms frame
    size = recording.path.stat().st_size
    return {"g722": size / 8000, "gsm": size / 33 * 0.02}.get(recording.codec, size / 32000)


# ---- long files built from prompts ------------------------------------------------------------------
@dataclass
class LongFile:
    name: str
    language: str
    samples: np.ndarray  # at `rate`
    rate: int
    reference: str
    speech_spans: list[tuple[float, float]]  # seconds, where each prompt lies
    pauses: list[float]

    @property
    def seconds(self) -> float:
        return self.samples.size / self.rate


def long_file(name: str, recordings: list[Recording], pauses: list[float], rate: int = 16_000,
              noise_dbfs: float | None = -70.0, seed: int = 0) -> LongFile:
    """The recordings back to back with the given pauses between them (cycled), over faint room noise
    (`noise_dbfs`; None: digital silence), at `rate`."""
    rng = np.random.default_rng(seed)
    parts, spans, t = [], [], 0.0
    for index, recording in enumerate(recordings):
        clip = recording.samples(rate)
        parts.append(clip)
        spans.append((t, t + clip.size / rate))
        t += clip.size / rate
        if index < len(recordings) - 1:
            pause = pauses[index % len(pauses)]
            parts.append(np.zeros(int(pause * rate), np.float32))
            t += pause
    samples = np.concatenate(parts)
    if noise_dbfs is not None:
        samples = samples + (rng.standard_normal(samples.size) * 10 ** (noise_dbfs / 20)).astype(np.float32)
    reference = " ".join(r.text for r in recordings)
    return LongFile(name, recordings[0].language, samples.astype(np.float32), rate, reference, spans,
                    [pauses[i % len(pauses)] for i in range(len(recordings) - 1)])


ORDINARY_PAUSES = [0.35, 0.6, 0.9, 0.45, 1.2, 0.7]  # seconds: speech between prompts, as in a conversation
LONG_PAUSES = [4.0, 9.0, 2.5, 14.0, 6.0]  # a caller who stops, a hold, a silence longer than a window


# ---- the test fixture --------------------------------------------------------------------------------
FIXTURE_PACKAGES = [f"asterisk-core-sounds-{language}{suffix}" for language in LANGUAGES for suffix in ("", "-g722")]
ALL_PACKAGES = list(DEBS)


def fetch(packages: list[str], librivox_too: bool = False, cache: Path = CACHE) -> None:
    for package in packages:
        unpack_deb(package, cache)
    if librivox_too:
        fetch_librivox(cache)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--fixture", action="store_true", help="the G.722 prompts and texts of every language (tests)")
    group.add_argument("--all", action="store_true", help="also the 8 kHz GSM prompts and the LibriVox clips (bench)")
    args = parser.parse_args(argv)
    try:
        fetch(ALL_PACKAGES if args.all else FIXTURE_PACKAGES, librivox_too=args.all)
    except (FetchError, subprocess.SubprocessError) as exc:
        logger.error("%s", exc)
        return 1
    for language in LANGUAGES:
        logger.info("%s: %d speech prompts, %d non-speech (g722)", language, len(prompts(language)),
                    len(prompts(language, kind="non-speech")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
