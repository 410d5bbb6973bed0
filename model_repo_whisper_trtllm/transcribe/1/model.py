"""Triton Python-backend entry for `transcribe` (long-form, BLS); the logic lives in the package."""

import triton_python_backend_utils as pb_utils

from whisper_triton.triton_models.transcribe_model import TranscribeModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = TranscribeModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.close()
        self.model = None
