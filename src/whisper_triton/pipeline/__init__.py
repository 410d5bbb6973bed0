"""Audio -> text, engine-agnostic: decoding audio, features, tokenizer, VAD, windowing, decoding
rules and fallback, the long-form loop, output formats. May import `contract/`, `errors`, `settings` only."""
