"""SageMaker's runtime on this machine: the endpoint routes boto3 calls (real-time, response
streams, async) in front of a local `serve`, and batch transform jobs run against it with the control
plane's view of them. May import `deploy/`, `clients/`, `pipeline/`, `contract/`."""
