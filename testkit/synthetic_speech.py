"""Real speech without recordings: espeak-ng speaks English sentences (for tests and benchmarks).

Needs Debian's `espeak-ng` (`apt-get install espeak-ng`; `scripts/install.sh --test` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from whisper_triton.pipeline.audio import SAMPLE_RATE, decode_audio

# sentences tiny.en transcribes word for word (numbers are avoided: "7" vs "seven")
SENTENCES = (
    "Please send me the report before the meeting on Monday morning.",
    "My favorite color is blue and I like to read books.",
    "Open the window because it is very warm in this room.",
    "We need to buy milk, bread and eggs from the store.",
    "Thank you for calling, how can I help you today?",
    "The cat is sleeping on the sofa next to the fire.",
    "The children played in the garden after lunch.",
    "Our flight to London was delayed by two hours.",
)
PAUSES = (0.8, 1.2, 1.6, 2.0, 2.5)  # seconds between sentences in a long recording


def speak(text: str, path: Path, voice: str = "en-us", words_per_minute: int = 150) -> Path:
    """Write `text` spoken by espeak-ng to the WAV file `path`."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng (scripts/install.sh --test does it)")
    subprocess.run([binary, "-v", voice, "-s", str(words_per_minute), "-w", str(path), text],
                   check=True, timeout=60, capture_output=True)
    return path


def long_recording(clips: list[np.ndarray], texts: list[str], repeats: int = 40):
    """Sentences joined by pauses of known length: (samples, reference text, [(pause_start, pause_end)])."""
    parts, reference, pauses, t = [], [], [], 0.0
    for k in range(repeats):
        clip = clips[k % len(clips)]
        parts.append(clip)
        reference.append(texts[k % len(texts)])
        t += clip.size / SAMPLE_RATE
        pause = PAUSES[k % len(PAUSES)]
        pauses.append((t, t + pause))
        parts.append(np.zeros(int(pause * SAMPLE_RATE), dtype=np.float32))
        t += pause
    return np.concatenate(parts), " ".join(reference), pauses[:-1]


def spoken_sentences(folder: Path, texts=SENTENCES) -> list[np.ndarray]:
    """Each sentence spoken and decoded to 16 kHz mono float32."""
    return [decode_audio(speak(text, Path(folder) / f"sentence{i}.wav").read_bytes()) for i, text in enumerate(texts)]
