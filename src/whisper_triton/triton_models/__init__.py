"""Logic of the Triton Python-backend models; the files in model_repo_whisper_trtllm/ only import these.
May import `engines/`, `speakers/`, `pipeline/`, `contract/`, `errors`, `settings`."""
