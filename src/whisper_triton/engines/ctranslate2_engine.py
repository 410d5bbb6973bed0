"""CTranslate2 Whisper engine: CPU (int8/float32) and CUDA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .base import MAX_NEW_TOKENS, DecodeOptions, Hypothesis, check_batch

logger = logging.getLogger(__name__)

_POSITIONS = 448  # decoder positions: prompt + generated tokens must fit


class CTranslate2Engine:
    name = "ctranslate2"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        compute_type: str = "float32",
        cpu_threads: int = 0,
        max_batch_size: int = 8,
    ):
        import ctranslate2

        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").is_file():
            raise FileNotFoundError(
                f"{model_dir} is not a CTranslate2 Whisper model directory (no model.bin). Convert one with "
                "ct2-transformers-converter or the project's export command."
            )
        self.model_dir = model_dir
        self.model = ctranslate2.models.Whisper(
            str(model_dir), device=device, compute_type=compute_type, intra_threads=cpu_threads, inter_threads=1
        )
        self.n_mels = int(self.model.n_mels)
        self.is_multilingual = bool(self.model.is_multilingual)
        self.max_batch_size = max_batch_size
        self._suppress_tokens = _suppress_tokens(model_dir)
        logger.info(
            "CTranslate2 Whisper loaded from %s (device=%s, compute_type=%s, n_mels=%d, multilingual=%s)",
            model_dir, device, compute_type, self.n_mels, self.is_multilingual,
        )

    def _storage(self, features: np.ndarray):
        import ctranslate2

        return ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))

    def generate(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Hypothesis]:
        check_batch(features, prompts, self.n_mels)
        if features.shape[0] == 0:
            return []
        # CTranslate2's max_length includes forced prompt tokens: add them so max_new_tokens holds
        max_length = min(_POSITIONS, options.max_new_tokens + max(len(prompt) for prompt in prompts))
        sampling = options.temperature > 0
        results = self.model.generate(
            self._storage(features),
            prompts,
            beam_size=1 if sampling else options.beam_size,
            patience=options.patience,
            length_penalty=options.length_penalty,
            repetition_penalty=options.repetition_penalty,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            sampling_topk=0 if sampling else 1,
            sampling_temperature=options.temperature if sampling else 1.0,
            suppress_blank=options.suppress_blank,
            suppress_tokens=self._suppress_tokens,
        )
        return [_hypothesis(result, options.length_penalty) for result in results]

    def detect_language(self, features: np.ndarray) -> list[dict[str, float]]:
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in range(features.shape[0])]
        results = self.model.detect_language(self._storage(features))
        return [{token.strip("<|>"): float(prob) for token, prob in result} for result in results]


def _hypothesis(result, length_penalty: float) -> Hypothesis:
    tokens = list(result.sequences_ids[0])
    score = float(result.scores[0]) if result.scores else None
    sum_logprob = avg_logprob = None
    if score is not None:
        # CTranslate2 reports the length-normalised score; undo it as faster-whisper does
        sum_logprob = score * (len(tokens) ** length_penalty)
        avg_logprob = sum_logprob / (len(tokens) + 1)
    return Hypothesis(tokens=tokens, sum_logprob=sum_logprob, avg_logprob=avg_logprob,
                      no_speech_prob=float(result.no_speech_prob))


def _suppress_tokens(model_dir: Path) -> list[int]:
    # -1 asks CTranslate2 for the model's own suppress list (from config.json)
    config = model_dir / "config.json"
    if config.is_file() and "suppress_ids" in json.loads(config.read_text()):
        return [-1]
    return []
