"""Triton Python-backend entry for `whisper` (NVIDIA's I/O, a front that routes rows); the logic
lives in the whisper_triton package."""

import triton_python_backend_utils as pb_utils

from whisper_triton.triton_models.whisper_model import WhisperModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = WhisperModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model = None
