"""A multilingual-layout Whisper tokenizer.json built from the English-only one, for code-path tests.

Multilingual vocabularies put <|endoftext|> one id later (50257) and add language and task tokens
after it; the BPE part stays the byte-level GPT-2 style. Good enough to exercise every branch that
depends on the layout; not a real multilingual vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

EXTRA_LANGUAGE = "yue"  # large-v3 has 100 languages, one more than the English vocabulary lists


def multilingual_tokenizer_json(english_tokenizer: Path, target_dir: Path) -> Path:
    data = json.loads(Path(english_tokenizer).read_text())
    vocab = data["model"]["vocab"]
    old_eot = vocab.pop("<|endoftext|>")
    vocab["<|placeholder|>"] = old_eot  # the multilingual vocabulary has a regular token here
    old_specials = [token["content"] for token in data["added_tokens"]]
    languages = [t for t in old_specials if t not in (
        "<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
        "<|startofprev|>", "<|nocaptions|>", "<|nospeech|>", "<|notimestamps|>")]
    names = (["<|endoftext|>", "<|startoftranscript|>"] + languages + [f"<|{EXTRA_LANGUAGE}|>"]
             + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                "<|notimestamps|>"])
    template = data["added_tokens"][0]
    data["added_tokens"] = [dict(template, id=50257 + i, content=name) for i, name in enumerate(names)]
    data["post_processor"] = None
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path
