"""Live audio -> utterances: audio formats of a live stream, turn detection on it (Silero VAD), the
utterance state machine, partial text by local agreement and the final decode with the pipeline's
guards. Uses `pipeline/` and `contract/` (the realtime events); knows no HTTP and no Triton (the
window decoder is handed in)."""
