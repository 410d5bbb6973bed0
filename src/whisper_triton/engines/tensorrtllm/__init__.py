"""TensorRT-LLM Whisper engine (NVIDIA GPU), one module per concern: `requests` (runtime requests, limits,
output parsing), `compatibility` (engines vs. this server), `rules` (Whisper's rules as the runtime's logits
processor), `engine` (the engine and its runtime loop). May import what `engines/` may; nothing here imports
tensorrt_llm or torch at module import time."""
