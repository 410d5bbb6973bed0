"""Export: LoRA merge -> TensorRT-LLM checkpoint -> engines -> Triton model repository -> S3.
May import `engines/`, `pipeline/`, `contract/`, `errors`, `settings`."""
