"""Who spoke when, from audio alone: speech regions (the VAD the pipeline already ran) -> voice
embeddings on sliding windows -> clustering -> speaker turns.

1. Regions: Silero's frame probabilities (`pipeline/vad.py`, computed once for the transcription)
   turned into tight spans (short pauses split them; little padding), so most regions hold one voice.
2. Windows of 1.5 s every 0.5 s inside each region (a shorter region is one window of its own length),
   each brought to -30 dBFS as resemblyzer's utterances are, embedded by `encoder.VoiceEncoder`.
3. Clustering (scikit-learn, cosine, average linkage) into `num_speakers` when given; otherwise the
   count is estimated: the tree cut where clusters are further apart than one voice's windows are
   (`SPLIT_DISTANCE`), small clusters not counted, held within `min_speakers`..`max_speakers`.
4. Each 10 ms frame of speech goes to the speaker whose centroid the windows covering it resemble
   most; runs of frames are the turns, runs shorter than `MIN_TURN_S` join their neighbours, and a
   pause of up to `BRIDGE_S` between two turns of one speaker belongs to the turn (a breath, a
   quiet word the VAD let go).
Overlapped speech gets one speaker: the other voice of an overlap counts as missed speech.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..contract.options import VadOptions
from ..pipeline.vad import spans_from_probabilities
from .encoder import FRAMES_PER_SECOND, HOP, VoiceEncoder, level_gain, mel_spectrogram

logger = logging.getLogger(__name__)

WINDOW_FRAMES = 150  # 1.5 s
STEP_FRAMES = 75  # 0.75 s
MIN_WINDOW_FRAMES = 40  # a region shorter than 0.4 s is not embedded (its frames take the nearest speaker)
MIN_TURN_S = 0.5
BRIDGE_S = 0.5  # a pause this short between two turns of one speaker is part of the turn
# count estimation, chosen on bench/diarization.py's development voices (a grid of both; the held-out set was
# printed beside it, so for these two numbers it is not strictly unseen; 0.36-0.39 x 0.05-0.10 were all >= 15/16 on both):
SPLIT_DISTANCE = 0.36  # average cosine distance between clusters above which they are different voices
MIN_CLUSTER_SHARE = 0.08  # of the windows: a smaller cluster is not a speaker of its own
MIN_CLUSTER_WINDOWS = 3
REGION_VAD = VadOptions(threshold=0.5, min_speech_ms=200, min_silence_ms=150, speech_pad_ms=60, end_pad_ms=60)


@dataclass(frozen=True)
class SpeakerTurn:
    start: float
    end: float
    speaker: int  # cluster index: 0, 1, ... in order of first appearance


@dataclass
class Diarization:
    turns: list[SpeakerTurn]
    centroids: np.ndarray  # [speakers, 256], row i is speaker i's mean embedding (L2-normed)
    count: int
    estimated: bool = False  # the count was estimated (not given)
    windows: int = 0
    details: dict = field(default_factory=dict)

    def speaking_time(self) -> list[float]:
        totals = [0.0] * self.count
        for turn in self.turns:
            totals[turn.speaker] += turn.end - turn.start
        return totals

    def speaker_between(self, start: float, end: float) -> int | None:
        """The speaker who holds most of [start, end], or None when nobody speaks there; a zero-length
        span (a word without duration) takes the nearest turn."""
        shares = np.zeros(self.count)
        for turn in self.turns:
            shares[turn.speaker] += max(0.0, min(end, turn.end) - max(start, turn.start))
        if shares.max() > 0:
            return int(shares.argmax())
        if not self.turns:
            return None
        middle = (start + end) / 2
        nearest = min(self.turns, key=lambda t: 0.0 if t.start <= middle <= t.end else min(abs(t.start - middle),
                                                                                            abs(t.end - middle)))
        return nearest.speaker


@dataclass(frozen=True)
class _Window:
    first: int  # mel frame
    frames: int


def regions(probabilities: np.ndarray, n_samples: int) -> list[tuple[int, int]]:
    """Tight speech regions (in 10 ms mel frames) from Silero's 32 ms frame probabilities."""
    spans = spans_from_probabilities(probabilities, n_samples, REGION_VAD)
    return [(span.start // HOP, max(span.start // HOP + 1, span.end // HOP)) for span in spans]


def _windows(regions_: list[tuple[int, int]]) -> list[_Window]:
    windows = []
    for first, last in regions_:
        length = last - first
        if length < MIN_WINDOW_FRAMES:
            continue
        if length <= WINDOW_FRAMES:
            windows.append(_Window(first, length))
            continue
        starts = list(range(first, last - WINDOW_FRAMES + 1, STEP_FRAMES))
        if starts[-1] + WINDOW_FRAMES < last:
            starts.append(last - WINDOW_FRAMES)
        windows += [_Window(start, WINDOW_FRAMES) for start in starts]
    return windows


def embed_windows(encoder: VoiceEncoder, audio: np.ndarray, mel: np.ndarray, windows: list[_Window]) -> np.ndarray:
    """[windows, 256]: each window's mel frames at -30 dBFS (gain applied to the power spectrum), batched by length."""
    embeddings = np.zeros((len(windows), 256), np.float32)
    by_length: dict[int, list[int]] = {}
    for index, window in enumerate(windows):
        by_length.setdefault(window.frames, []).append(index)
    for frames, indices in by_length.items():
        batch = np.empty((len(indices), frames, mel.shape[1]), np.float32)
        for row, index in enumerate(indices):
            window = windows[index]
            samples = audio[window.first * HOP : (window.first + window.frames) * HOP]
            batch[row] = mel[window.first : window.first + frames] * level_gain(samples) ** 2
        embeddings[indices] = encoder.embed(batch)
    return embeddings


def _normed(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _cluster(embeddings: np.ndarray, count: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    if count <= 1 or len(embeddings) <= 1:
        return np.zeros(len(embeddings), int)
    count = min(count, len(embeddings))
    return AgglomerativeClustering(n_clusters=count, metric="cosine", linkage="average").fit_predict(embeddings)


def _centroids(embeddings: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    return _normed(np.stack([embeddings[labels == k].mean(axis=0) if np.any(labels == k) else np.zeros(256)
                             for k in range(count)]))


def estimate_count(embeddings: np.ndarray, low: int, high: int) -> tuple[int, np.ndarray, dict]:
    """(count, labels, details): cut the average-linkage tree (cosine) at SPLIT_DISTANCE; clusters
    holding at least MIN_CLUSTER_SHARE of the windows are speakers, the windows of smaller ones (a
    cough, a laugh, a stretch of noise) join the nearest speaker. The count is then held within
    [low, high] by clustering to the bound instead."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(embeddings)
    if n < 2:
        return 1, np.zeros(n, int), {}
    tree = linkage(embeddings, method="average", metric="cosine")
    cut = fcluster(tree, SPLIT_DISTANCE, criterion="distance") - 1
    sizes = np.bincount(cut)
    big = np.flatnonzero(sizes >= max(MIN_CLUSTER_WINDOWS, MIN_CLUSTER_SHARE * n))
    details = {"merge_distances": [round(float(d), 3) for d in tree[-4:, 2][::-1]], "clusters": len(sizes),
               "speaker_clusters": int(big.size)}
    count = max(1, int(big.size))
    if not low <= count <= high:
        count = min(max(count, low), high, n)
        return count, _cluster(embeddings, count), details
    if count == 1:
        return 1, np.zeros(n, int), details
    centroids = _normed(np.stack([embeddings[cut == k].mean(axis=0) for k in big]))
    labels = np.argmax(embeddings @ centroids.T, axis=1)
    return count, labels, details


def _frame_speakers(n_frames: int, windows: list[_Window], embeddings: np.ndarray, centroids: np.ndarray,
                    regions_: list[tuple[int, int]]) -> np.ndarray:
    """Speaker per 10 ms frame (-1: no speech): the centroid the covering windows resemble most."""
    count = len(centroids)
    scores = np.zeros((n_frames, count), np.float32)
    cover = np.zeros(n_frames, np.float32)
    similarity = embeddings @ centroids.T  # [windows, speakers]
    for window, row in zip(windows, similarity):
        scores[window.first : window.first + window.frames] += row
        cover[window.first : window.first + window.frames] += 1
    speakers = np.full(n_frames, -1, int)
    for first, last in regions_:
        covered = cover[first:last] > 0
        if not covered.any():
            continue
        local = np.where(covered[:, None], scores[first:last] / np.maximum(cover[first:last, None], 1), np.nan)
        best = np.full(last - first, -1, int)
        best[covered] = np.nanargmax(local[covered], axis=1)
        # uncovered frames of a region (its short tail) take the nearest covered frame's speaker
        index = np.where(covered, np.arange(last - first), -1)
        forward = np.maximum.accumulate(index)
        best[~covered] = best[np.where(forward[~covered] >= 0, forward[~covered], np.flatnonzero(covered)[0])]
        speakers[first:last] = best
    for first, last in regions_:  # regions with no window at all: the nearest frame with a speaker
        if (speakers[first:last] >= 0).any():
            continue
        known = np.flatnonzero(speakers >= 0)
        if known.size:
            nearest = known[np.argmin(np.abs(known - (first + last) // 2))]
            speakers[first:last] = speakers[nearest]
    return speakers


def _turns(speakers: np.ndarray) -> list[SpeakerTurn]:
    """Runs of one speaker; a run shorter than MIN_TURN_S inside speech joins the longer neighbour."""
    runs: list[list[int]] = []  # [first, last, speaker]
    for index, speaker in enumerate(speakers.tolist()):
        if runs and runs[-1][2] == speaker and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1, speaker])
    minimum = int(MIN_TURN_S * FRAMES_PER_SECOND)
    changed = True
    while changed:
        changed = False
        for i, (first, last, speaker) in enumerate(runs):
            if speaker < 0 or last - first >= minimum:
                continue
            before = runs[i - 1] if i > 0 and runs[i - 1][1] == first and runs[i - 1][2] >= 0 else None
            after = runs[i + 1] if i + 1 < len(runs) and runs[i + 1][0] == last and runs[i + 1][2] >= 0 else None
            neighbours = [n for n in (before, after) if n is not None]
            if not neighbours:
                continue
            runs[i][2] = max(neighbours, key=lambda n: n[1] - n[0])[2]
            merged: list[list[int]] = []
            for run in runs:
                if merged and merged[-1][2] == run[2] and merged[-1][1] == run[0]:
                    merged[-1][1] = run[1]
                else:
                    merged.append(list(run))
            runs = merged
            changed = True
            break
    turns: list[SpeakerTurn] = []
    for first, last, speaker in runs:
        if speaker < 0:
            continue
        start, end = round(first / FRAMES_PER_SECOND, 3), round(last / FRAMES_PER_SECOND, 3)
        if turns and turns[-1].speaker == speaker and start - turns[-1].end <= BRIDGE_S:
            turns[-1] = SpeakerTurn(turns[-1].start, end, speaker)
        else:
            turns.append(SpeakerTurn(start, end, speaker))
    return turns


def _first_appearance(turns: list[SpeakerTurn], count: int) -> list[int]:
    order: list[int] = []
    for turn in turns:
        if turn.speaker not in order:
            order.append(turn.speaker)
    return order + [k for k in range(count) if k not in order]


def diarize(encoder: VoiceEncoder, audio: np.ndarray, probabilities: np.ndarray, num_speakers: int | None = None,
            min_speakers: int = 1, max_speakers: int = 8) -> Diarization:
    """Speaker turns of 16 kHz `audio` whose VAD frame probabilities are `probabilities`."""
    audio = np.asarray(audio, dtype=np.float32)
    speech = regions(probabilities, audio.size)
    windows = _windows(speech)
    if not windows:
        return Diarization([], np.zeros((0, 256), np.float32), 0, num_speakers is None)
    mel = mel_spectrogram(audio)
    embeddings = embed_windows(encoder, audio, mel, windows)
    details: dict = {}
    if num_speakers is not None:
        count, labels = min(num_speakers, len(windows)), _cluster(embeddings, num_speakers)
    else:
        count, labels, details["scores"] = estimate_count(embeddings, min_speakers, max_speakers)
    centroids = _centroids(embeddings, labels, count)
    speakers = _frame_speakers(mel.shape[0], windows, embeddings, centroids, speech)
    turns = _turns(speakers)
    order = _first_appearance(turns, count)
    rank = {old: new for new, old in enumerate(order)}
    turns = [SpeakerTurn(t.start, t.end, rank[t.speaker]) for t in turns]
    centroids = centroids[order]
    # a speaker that lost every frame to the others is not a speaker of this file
    present = sorted({t.speaker for t in turns})
    if len(present) < count:
        keep = {old: new for new, old in enumerate(present)}
        turns = [SpeakerTurn(t.start, t.end, keep[t.speaker]) for t in turns]
        centroids, count = centroids[present], len(present)
    return Diarization(turns, centroids, count, num_speakers is None, len(windows), details)
