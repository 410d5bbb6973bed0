"""Triton Python-backend entry for `whisper_window` (the engine); the logic lives in the package."""

import triton_python_backend_utils as pb_utils

from whisper_triton.triton_models.window_model import WindowModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = WindowModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        if self.model is not None:
            self.model.close()
        self.model = None
