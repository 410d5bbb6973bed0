"""Bucket of audio -> bucket of transcripts: listing and filters, planning and cost, the runners
(batch transform, async endpoint, a local `serve`), outputs, the manifest and resume; the
`whisper-transcribe-bucket` command. May import `clients/`, `deploy/`, `export/`, `pipeline/`, `contract/`."""
