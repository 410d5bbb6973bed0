"""The export's side of the model card (`contract/model_card.py`, `whisper_model.json`): the layout
label and whether the model can translate, decided from the checkpoint's dimensions."""

from __future__ import annotations

from ..contract.model_card import FORMAT, MODEL_CARD, ModelCard, ModelCardError
from .common import ExportError
from .openai_model import ModelDimensions

__all__ = ["FORMAT", "MODEL_CARD", "ModelCard", "ModelCardError", "can_translate", "dims_from_hf_config_json",
           "layout_name", "model_card"]

# (n_mels, n_audio_layer, n_text_layer, multilingual) of OpenAI's released models, for the `layout` label
_LAYOUTS = {
    (128, 32, 4, True): "large-v3-turbo",
    (128, 32, 32, True): "large-v3",
    (80, 32, 32, True): "large-v2",
}
TRANSLATE_CHOICES = ("auto", "yes", "no")


def layout_name(dims: ModelDimensions) -> str:
    return _LAYOUTS.get((dims.n_mels, dims.n_audio_layer, dims.n_text_layer, dims.is_multilingual), "")


def can_translate(dims: ModelDimensions, translate: str = "auto") -> bool:
    """`auto`: no for English-only models and the large-v3-turbo layout (4 decoder layers behind a
    32-layer, 128-mel encoder), yes for every other multilingual model; `yes` / `no` decide it."""
    if translate not in TRANSLATE_CHOICES:
        raise ExportError(f"translate must be one of {', '.join(TRANSLATE_CHOICES)}, got {translate!r}.")
    if translate != "auto":
        if translate == "yes" and not dims.is_multilingual:
            raise ExportError("An English-only model cannot translate (it has no <|translate|> task); drop --translate yes.")
        return translate == "yes"
    return dims.is_multilingual and layout_name(dims) != "large-v3-turbo"


def model_card(dims: ModelDimensions, translate: str = "auto") -> ModelCard:
    return ModelCard(n_mels=dims.n_mels, n_audio_layer=dims.n_audio_layer, n_text_layer=dims.n_text_layer,
                     n_vocab=dims.n_vocab, multilingual=dims.is_multilingual, translate=can_translate(dims, translate),
                     layout=layout_name(dims))


def dims_from_hf_config_json(config: dict) -> ModelDimensions:
    """ModelDimensions from a Hugging Face Whisper config.json (as a dict)."""
    try:
        return ModelDimensions(
            n_mels=int(config["num_mel_bins"]), n_audio_ctx=int(config["max_source_positions"]),
            n_audio_state=int(config["d_model"]), n_audio_head=int(config["encoder_attention_heads"]),
            n_audio_layer=int(config["encoder_layers"]), n_vocab=int(config["vocab_size"]),
            n_text_ctx=int(config["max_target_positions"]), n_text_state=int(config["d_model"]),
            n_text_head=int(config["decoder_attention_heads"]), n_text_layer=int(config["decoder_layers"]))
    except KeyError as exc:
        raise ExportError(f"The Hugging Face config.json lacks {exc}: is it a Whisper model?") from exc
