"""Export: LoRA merge -> TensorRT-LLM checkpoint -> engines -> Triton model repository -> S3."""
