"""SageMaker's runtime on this machine: the endpoint routes boto3 calls (real-time, response
streams, async) in front of a local `serve`. May import `deploy/`, `clients/`, `pipeline/`, `contract/`."""
