"""The one pinned NVIDIA pairing that the GPU image, the export and the docs all read.

Engines only run with the TensorRT-LLM version and GPU architecture that built them, so the
export (checkpoint layout, trtllm-build flags) and the serving image must agree on this.
"""

TRITON_CONTAINER_RELEASE = "25.01"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_CONTAINER_RELEASE}-trtllm-python-py3"
TENSORRT_LLM_VERSION = "0.17.0"
TRITON_SERVER_VERSION = "2.54.0"
