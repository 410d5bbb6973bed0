"""CTranslate2 Whisper engine: CPU (int8/float32) and CUDA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..contract.capabilities import EngineCapabilities, SpecialTokens
from .base import DecodeOptions, Hypothesis, TokenTimings, check_batch

logger = logging.getLogger(__name__)

_POSITIONS = 448  # decoder positions: prompt + generated tokens must fit
MULTILINGUAL_VOCABULARY = 51865  # English-only Whisper vocabularies have 51,864 tokens
_SECONDS_PER_FRAME = 0.02  # one encoder output frame (two mel frames)
ENCODED_FRAMES = 1500  # encoder output frames of a 30 s window


class CTranslate2Engine:
    name = "ctranslate2"

    def __init__(
        self,
        model_dir: str | Path,
        tokens: SpecialTokens,
        device: str = "cpu",
        compute_type: str = "float32",
        cpu_threads: int = 0,
        max_batch_size: int = 8,
        model=None,
    ):
        """`tokens`: the model's special tokens (from its tokenizer); `model`: an already loaded
        `ctranslate2.models.Whisper` of `model_dir` to share."""
        import ctranslate2

        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").is_file():
            raise FileNotFoundError(
                f"{model_dir} is not a CTranslate2 Whisper model directory (no model.bin). Convert one with "
                "ct2-transformers-converter or the project's export command."
            )
        self.model_dir = model_dir
        self.model = model or ctranslate2.models.Whisper(
            str(model_dir), device=device, compute_type=compute_type, intra_threads=cpu_threads, inter_threads=1
        )
        self.n_mels = int(self.model.n_mels)
        # the vocabulary size tells the layouts apart (CTranslate2 4.8's is_multilingual reads False for all)
        self.is_multilingual = _vocabulary_size(model_dir) >= MULTILINGUAL_VOCABULARY
        self.max_batch_size = max_batch_size
        self._suppress_tokens = _suppress_tokens(model_dir)
        self.tokens = tokens
        self.sot = tokens.sot
        self.capabilities = EngineCapabilities(
            word_timestamps=True, encoder_reuse=True, multilingual=self.is_multilingual,
            translate=self.is_multilingual and _model_config(model_dir).get("translate", True) is not False,
            n_mels=self.n_mels, engine=self.name,
        )
        logger.info(
            "CTranslate2 Whisper loaded from %s (device=%s, compute_type=%s, n_mels=%d, multilingual=%s)",
            model_dir, device, compute_type, self.n_mels, self.is_multilingual,
        )

    def _storage(self, features: np.ndarray):
        """Log-mel [B, n_mels, frames] or encoder output [B, 1500, width]: CTranslate2 takes either."""
        import ctranslate2

        keep = features.dtype in (np.float16, np.float32)  # encoder output stays in the model's dtype
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=None if keep else np.float32))

    def encode(self, features: np.ndarray) -> np.ndarray:
        """One encoder pass, [B, 1500, width] on the host, for generate / detect / align to reuse."""
        check_batch(features, [[self.sot]] * features.shape[0], self.n_mels)
        return np.asarray(self.model.encode(self._storage(features.astype(np.float32)), to_cpu=True))

    def _check(self, inputs: np.ndarray, prompts: list[list[int]]) -> None:
        """Log-mel [B, n_mels, frames], or this engine's encoder output [B, 1500, width]."""
        encoded = inputs.ndim == 3 and inputs.shape[1] == ENCODED_FRAMES
        check_batch(inputs, prompts, ENCODED_FRAMES if encoded else self.n_mels)

    def generate(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Hypothesis]:
        self._check(features, prompts)
        options.check_beam(self.capabilities.max_beam_size)
        results: list[Hypothesis | None] = [None] * len(prompts)
        # CTranslate2 batches only prompts with <|startoftranscript|> at the same position
        for indices in self._prompt_groups(prompts).values():
            group = self._generate_group(features[indices], [prompts[i] for i in indices], options)
            for index, hypothesis in zip(indices, group):
                results[index] = hypothesis
        return results  # type: ignore[return-value]

    def _prompt_groups(self, prompts: list[list[int]]) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, prompt in enumerate(prompts):
            sot_at = prompt.index(self.sot) if self.sot in prompt else 0
            groups.setdefault((sot_at, len(prompt)), []).append(index)
        return groups

    def _generate_group(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Hypothesis]:
        prompt_length = len(prompts[0])
        new_tokens = max(1, min(options.max_new_tokens, _POSITIONS - prompt_length))
        sampling = options.temperature > 0
        results = self.model.generate(
            self._storage(features),
            prompts,
            beam_size=1 if sampling else options.beam_size,
            patience=options.patience,
            length_penalty=options.length_penalty,
            repetition_penalty=options.repetition_penalty,
            max_length=_ct2_max_length(new_tokens, prompt_length),
            return_scores=True,
            return_no_speech_prob=True,
            sampling_topk=0 if sampling else 1,
            sampling_temperature=options.temperature if sampling else 1.0,
            suppress_blank=options.suppress_blank,
            suppress_tokens=self._suppress_tokens,
        )
        return [_hypothesis(result, options.length_penalty, new_tokens) for result in results]

    def align(self, features: np.ndarray, start_sequence: list[int], text_tokens: list[list[int]],
              num_frames: list[int]) -> list[TokenTimings]:
        """Per-token start/end (seconds) and probability from cross-attention alignment."""
        self._check(features, [start_sequence] * features.shape[0])
        results = self.model.align(self._storage(features), start_sequence, text_tokens, num_frames,
                                   median_filter_width=7)
        return [_token_timings(result, len(tokens)) for result, tokens in zip(results, text_tokens)]

    def detect_language(self, features: np.ndarray) -> list[dict[str, float]]:
        self._check(features, [[self.sot]] * features.shape[0])
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in range(features.shape[0])]
        if not self.model.is_multilingual:
            # CTranslate2 4.7+ calls some multilingual vocabularies English-only and refuses
            return self._detect_from_logits(features)
        results = self.model.detect_language(self._storage(features))
        return [{token.strip("<|>"): float(prob) for token, prob in result} for result in results]

    def _detect_from_logits(self, features: np.ndarray) -> list[dict[str, float]]:
        """A softmax over the language tokens only, at the first step after <|startoftranscript|>."""
        codes = list(self.tokens.language_ids)
        ids = np.array([self.tokens.language_ids[code] for code in codes])
        results = self.model.generate(self._storage(features), [[self.sot]] * features.shape[0],
                                      max_length=2, beam_size=1, return_logits_vocab=True)
        detected = []
        for result in results:
            logits = np.asarray(result.logits[0], dtype=np.float64).reshape(-1)[ids]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            detected.append({codes[i]: float(probs[i]) for i in order})
        return detected


def _ct2_max_length(new_tokens: int, prompt_length: int) -> int:
    # CTranslate2 decodes min(max_length // 2, max_length - prompt_length) new tokens
    # (OpenNMT/CTranslate2#1856); this asks for exactly `new_tokens`
    return max(2 * new_tokens, new_tokens + prompt_length)


def _token_timings(result, n_tokens: int) -> TokenTimings:
    pairs = np.asarray(result.alignments, dtype=np.int64).reshape(-1, 2)
    starts = np.zeros(n_tokens)
    ends = np.zeros(n_tokens)
    if pairs.size:
        token_index, frame = pairs[:, 0], pairs[:, 1]
        for k in range(n_tokens):
            frames = frame[token_index == k]
            if frames.size:
                starts[k], ends[k] = frames.min(), frames.max() + 1
        ends = np.maximum.accumulate(ends)
        starts = np.minimum(np.maximum.accumulate(starts), ends)
    probabilities = [float(p) for p in list(result.text_token_probs)[:n_tokens]]
    probabilities += [0.0] * (n_tokens - len(probabilities))
    return TokenTimings(starts=(starts * _SECONDS_PER_FRAME).tolist(), ends=(ends * _SECONDS_PER_FRAME).tolist(),
                        probabilities=probabilities)


def _hypothesis(result, length_penalty: float, new_tokens: int) -> Hypothesis:
    tokens = list(result.sequences_ids[0])[:new_tokens]
    score = float(result.scores[0]) if result.scores else None
    sum_logprob = avg_logprob = None
    if score is not None:
        # CTranslate2 reports the length-normalised score; undo it as faster-whisper does
        sum_logprob = score * (len(tokens) ** length_penalty)
        avg_logprob = sum_logprob / (len(tokens) + 1)
    return Hypothesis(tokens=tokens, sum_logprob=sum_logprob, avg_logprob=avg_logprob,
                      no_speech_prob=float(result.no_speech_prob))


def _vocabulary_size(model_dir: Path) -> int:
    if (model_dir / "vocabulary.json").is_file():
        return len(json.loads((model_dir / "vocabulary.json").read_text()))
    if (model_dir / "vocabulary.txt").is_file():
        return sum(1 for _ in (model_dir / "vocabulary.txt").open(encoding="utf-8"))
    raise FileNotFoundError(f"{model_dir} has no vocabulary.json or vocabulary.txt beside model.bin.")


def _model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _suppress_tokens(model_dir: Path) -> list[int]:
    # -1 asks CTranslate2 for the model's own suppress list (from config.json)
    config = model_dir / "config.json"
    if config.is_file() and "suppress_ids" in json.loads(config.read_text()):
        return [-1]
    return []
