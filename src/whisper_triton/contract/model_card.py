"""`whisper_model.json`: what the exported model is, written by the export beside the weights of
every model directory it makes (CTranslate2 model, TensorRT-LLM engine directory) and so also in
`whisper/1/engine/` of a rendered repository. The engines' capability declarations read it.

    {"format": 1, "layout": "large-v3-turbo", "n_mels": 128, "n_audio_layer": 32, "n_text_layer": 4,
     "n_vocab": 51866, "multilingual": true, "translate": false}

`translate`: whether the model was trained to translate into English. English-only models were not,
and neither was large-v3-turbo (OpenAI fine-tuned its 4-layer decoder on transcription data only). The
export decides it from the layout unless told (`--translate yes|no`); the server refuses
`task=translate` where it is false.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL_CARD = "whisper_model.json"
FORMAT = 1


class ModelCardError(ValueError):
    """A model card that cannot be read; the message says which file and the fix."""


@dataclass(frozen=True)
class ModelCard:
    n_mels: int
    n_audio_layer: int
    n_text_layer: int
    n_vocab: int
    multilingual: bool
    translate: bool
    layout: str = ""
    format: int = FORMAT

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MODEL_CARD
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ModelCard | None":
        path = Path(directory) / MODEL_CARD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        except (ValueError, TypeError) as exc:
            raise ModelCardError(f"{path} is not a valid model card ({exc}); export the model again.") from exc
