"""espeak-ng speech in languages other than English. de, es, fr and it are the voices Whisper base
recognises on espeak's synthesis (its nl/pt/zh voices are called en/hu/th by faster-whisper too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from whisper_triton.pipeline.audio import decode_audio

from .synthetic_speech import speak

VOICES = {"de": "de", "es": "es", "fr": "fr-fr", "it": "it", "en": "en-us"}
# short sentences Whisper base recognises on espeak-ng's voices; single sentences are often
# mis-detected (French as en/th/ro), three in a row are detected reliably
SENTENCES = {
    "de": ("Guten Morgen, wie geht es Ihnen heute?", "Ich habe einen Hund und zwei Katzen.",
           "Das Wetter ist heute sehr schön und warm."),
    "es": ("Buenos días, ¿cómo está usted hoy?", "Tengo un perro y dos gatos en casa.",
           "El tiempo hoy es muy bueno y hace calor."),
    "fr": ("Je suis très content de vous voir ici.", "Je voudrais un café avec du lait, s'il vous plaît.",
           "J'ai un chien et deux chats à la maison."),
    "it": ("Buongiorno, come sta oggi?", "Ho un cane e due gatti a casa.", "Oggi il tempo è molto bello e fa caldo."),
    "en": ("Good morning, how are you today?", "I have a dog and two cats.", "The weather is very nice and warm today."),
}
WORDS_PER_MINUTE = 130
GAP_S = 0.5


def sentence(language: str, index: int, folder: Path) -> np.ndarray:
    """Sentence `index` of `language`, spoken by espeak-ng, as 16 kHz mono float32."""
    path = speak(SENTENCES[language][index], Path(folder) / f"{language}{index}.wav", voice=VOICES[language],
                 words_per_minute=WORDS_PER_MINUTE)
    return decode_audio(path.read_bytes())


def passage(language: str, folder: Path) -> tuple[np.ndarray, str]:
    """The language's sentences in a row, 0.5 s apart: (samples, reference text)."""
    gap = np.zeros(int(GAP_S * 16000), np.float32)
    parts = []
    for index in range(len(SENTENCES[language])):
        parts += [sentence(language, index, folder), gap]
    return np.concatenate(parts[:-1]), " ".join(SENTENCES[language])
