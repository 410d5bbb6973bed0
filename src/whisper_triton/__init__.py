"""whisper-triton: Whisper served by NVIDIA Triton behind the SageMaker contract."""

__version__ = "0.1.0"
