"""The contracts between the layers, each defined once and used by both sides of its boundary.

Import-light on purpose (pydantic and the standard library only; no numpy, PyAV or tokenizers), so
the HTTP proxy can parse and check a request without loading the pipeline:
- `options`: every user option of a transcription (type, range, alias, default), nested groups;
- `capabilities`: what an engine (and the model it runs) can do, declared, never guessed;
- `tensors`: the inputs and outputs of each Triton model, for both the model and its clients;
- `results`: the transcription result (segments, words, the `info` block);
- `models`: model ids (checked before they name anything), engine model names, the `models.json` manifest.
"""
