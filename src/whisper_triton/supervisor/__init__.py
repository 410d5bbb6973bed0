"""The process that runs an endpoint: `serve` (the container entrypoint), Triton's launcher and
environment, where the model comes from (S3, SageMaker's model dir). The top layer: may import any other."""
