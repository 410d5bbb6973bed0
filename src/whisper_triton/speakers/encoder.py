"""The speaker encoder in numpy: resemblyzer's GE2E voice encoder (a 3-layer LSTM over 40-band mel
power frames, 256-dimensional L2-normed embeddings), on the weights `weights.py` converted once.

It reproduces resemblyzer 0.1.4 step by step, without torch or librosa on the serving path:
- features: `resemblyzer.audio.wav_to_mel_spectrogram` = librosa's `melspectrogram` (25 ms Hann
  window, 10 ms hop, centred frames zero-padded at the edges, power 2, Slaney-style mel filters,
  0-8 kHz); not a log-mel;
- the network: `VoiceEncoder.forward` = the last layer's final hidden state -> linear -> ReLU -> L2 norm.
`tests/test_speakers_encoder.py` holds both equal to resemblyzer's own (torch, librosa) output within
1e-4 on recorded speech.

The LSTM runs a batch of windows at once: the input projection of every frame in one matrix product
per layer, then one (batch x 256) x (256 x 1024) product per frame; numpy's BLAS releases the GIL, so
it overlaps with the rest of the pipeline.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms: 100 frames per second
N_MELS = 40
FRAMES_PER_SECOND = SAMPLE_RATE // HOP
PARTIAL_FRAMES = 160  # the 1.6 s partial utterances resemblyzer embeds
TARGET_DBFS = -30.0  # resemblyzer normalises utterances to this level before the mel spectrogram
LAYERS = 3
HIDDEN = 256


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """[40, 201] triangular filters, each normalised to unit area (Slaney), as librosa.filters.mel builds them."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def mel_spectrogram(audio: np.ndarray) -> np.ndarray:
    """[frames, 40] mel power spectrogram of 16 kHz audio: frame i is centred on sample i * 160."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    padded = np.pad(audio, N_FFT // 2)  # centred frames, zeros beyond the edges (librosa's pad_mode="constant")
    count = 1 + (padded.size - N_FFT) // HOP if padded.size >= N_FFT else 0
    if count == 0:
        return np.zeros((0, N_MELS), np.float32)
    frames = np.lib.stride_tricks.as_strided(padded, shape=(count, N_FFT),
                                             strides=(padded.strides[0] * HOP, padded.strides[0]))
    power = np.abs(np.fft.rfft(frames * _window(), axis=1)) ** 2
    return (power.astype(np.float32) @ mel_filters().T).astype(np.float32)


def level_gain(audio: np.ndarray, target_dbfs: float = TARGET_DBFS) -> float:
    """The gain resemblyzer's `normalize_volume(increase_only=True)` applies to bring audio to -30 dBFS."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    if rms <= 0:
        return 1.0
    change_db = target_dbfs - 20 * np.log10(rms)
    return float(10 ** (change_db / 20)) if change_db > 0 else 1.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class VoiceEncoder:
    """Embeddings of mel windows: `embed(mels [batch, frames, 40]) -> [batch, 256]`, L2-normed."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w_ih = [np.ascontiguousarray(weights[f"lstm/weight_ih_l{i}"].T, dtype=np.float32) for i in range(LAYERS)]
        self.w_hh = [np.ascontiguousarray(weights[f"lstm/weight_hh_l{i}"].T, dtype=np.float32) for i in range(LAYERS)]
        self.bias = [(weights[f"lstm/bias_ih_l{i}"] + weights[f"lstm/bias_hh_l{i}"]).astype(np.float32)
                     for i in range(LAYERS)]
        self.linear_w = np.ascontiguousarray(weights["linear/weight"].T, dtype=np.float32)
        self.linear_b = weights["linear/bias"].astype(np.float32)

    @classmethod
    def load(cls, path: Path | str) -> "VoiceEncoder":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"The speaker encoder's weights are missing ({path}): convert them once with "
                "`python -m whisper_triton.speakers.weights` (scripts/install.sh does), or set "
                "WHISPER_TRITON_SPEAKER_ENCODER to the converted .npz.")
        with np.load(path) as data:
            return cls({key: data[key] for key in data.files if key != "source_sha256"})

    def _layer(self, inputs: np.ndarray, layer: int) -> np.ndarray:
        """One LSTM layer over [batch, frames, features] -> its hidden states [batch, frames, 256]."""
        batch, frames, _ = inputs.shape
        projected = (inputs.reshape(batch * frames, -1) @ self.w_ih[layer] + self.bias[layer]).reshape(batch, frames, -1)
        h = np.zeros((batch, HIDDEN), np.float32)
        c = np.zeros((batch, HIDDEN), np.float32)
        out = np.empty((batch, frames, HIDDEN), np.float32)
        w_hh = self.w_hh[layer]
        for t in range(frames):
            gates = projected[:, t] + h @ w_hh
            i = _sigmoid(gates[:, :HIDDEN])
            f = _sigmoid(gates[:, HIDDEN : 2 * HIDDEN])
            g = np.tanh(gates[:, 2 * HIDDEN : 3 * HIDDEN])
            o = _sigmoid(gates[:, 3 * HIDDEN :])
            c = f * c + i * g
            h = o * np.tanh(c)
            out[:, t] = h
        return out

    def embed(self, mels: np.ndarray) -> np.ndarray:
        """[batch, frames, 40] mel windows (all of one length) -> [batch, 256] embeddings."""
        x = np.asarray(mels, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        for layer in range(LAYERS):
            x = self._layer(x, layer)
        raw = np.maximum(x[:, -1] @ self.linear_w + self.linear_b, 0.0)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        return (raw / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed_utterance(self, audio: np.ndarray, rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
        """One embedding of a whole utterance, as resemblyzer's `embed_utterance` computes it on audio
        `preprocess_wav` already normalised: the L2-normed mean of its 1.6 s partials' embeddings."""
        samples = np.asarray(audio, dtype=np.float32)
        n_frames = int(np.ceil((samples.size + 1) / HOP))
        step = max(1, int(np.round((SAMPLE_RATE / rate) / HOP)))
        starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
        coverage = (samples.size - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
        if coverage < min_coverage and len(starts) > 1:
            starts = starts[:-1]
        needed = (starts[-1] + PARTIAL_FRAMES) * HOP
        if needed >= samples.size:
            samples = np.pad(samples, (0, needed - samples.size))
        mel = mel_spectrogram(samples)
        partials = self.embed(np.stack([mel[s : s + PARTIAL_FRAMES] for s in starts]))
        mean = partials.mean(axis=0)
        return (mean / np.linalg.norm(mean)).astype(np.float32)


@lru_cache(maxsize=4)
def load_encoder(path: str) -> VoiceEncoder:
    """The encoder of `path`, loaded once per process."""
    encoder = VoiceEncoder.load(path)
    logger.info("speaker encoder loaded from %s", path)
    return encoder
