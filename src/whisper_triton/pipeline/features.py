"""Whisper's log-mel spectrogram (the openai-whisper definition), in numpy."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * 16_000  # one encoder window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
SUPPORTED_N_MELS = (80, 128)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """The [n_mels, 201] filter bank shipped in this package (OpenAI's mel_filters.npz)."""
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"n_mels must be one of {SUPPORTED_N_MELS}, got {n_mels}")
    with resources.files("whisper_triton.assets").joinpath("mel_filters.npz").open("rb") as handle:
        with np.load(handle) as data:
            return data[f"mel_{n_mels}"].astype(np.float32)


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    # periodic Hann, as torch.hann_window(400) computes it
    n = np.arange(N_FFT, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)


def _power_spectrum(audio: np.ndarray) -> np.ndarray:
    """|STFT|^2 with centre reflect padding, without the last frame (as Whisper drops it)."""
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")
    n_frames = 1 + (padded.size - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP_LENGTH, padded.strides[0])
    )
    spectrum = np.fft.rfft(frames * _hann_window(), axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return power[:-1].T  # [201, frames]


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, n_samples: int = N_SAMPLES) -> np.ndarray:
    """[n_mels, n_samples // 160] log-mel features of `audio` (cut to `n_samples`), as openai-whisper and
    faster-whisper feed a window to the encoder: the spectrogram of the audio itself (with one hop of
    zeros after it), normalised over the audio's own frames, then padded with zeros to 3000 frames.

    Padding the features, not the audio, matters: a window shorter than 30 s padded with digital
    silence before the spectrogram gives the encoder frames it never saw in `transcribe()` of either
    reference, and measurably other text on speech the model handles poorly."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:n_samples]
    n_frames = n_samples // HOP_LENGTH
    frames = min(n_frames, max(1, audio.size // HOP_LENGTH))
    mel = mel_filters(n_mels) @ _power_spectrum(np.pad(audio, (0, HOP_LENGTH)))[:, :frames]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    features = np.zeros((n_mels, n_frames), dtype=np.float32)
    features[:, :frames] = (log_spec + 4.0) / 4.0
    return features


def batch_log_mel(audios: list[np.ndarray], n_mels: int = 80) -> np.ndarray:
    """[B, n_mels, 3000] features for a batch of clips of at most 30 s each."""
    if not audios:
        return np.zeros((0, n_mels, N_FRAMES), dtype=np.float32)
    return np.stack([log_mel_spectrogram(audio, n_mels) for audio in audios])
