"""The HTTP side of `serve`, in layers: `parsing` (request -> audio bytes + options, through the
one request model), `triton_client` (the async gRPC client to Triton's models), `app` (the routes:
the SageMaker contract and the APIs users already have clients for). Routes only: may import
`live/` (the capability behind the realtime routes), `registry/` (which model a request names, held
while it runs), `pipeline/`, `contract/`, `errors`, `settings`; decoding happens behind Triton,
reached over gRPC."""
