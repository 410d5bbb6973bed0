#!/usr/bin/env python3
"""Transcribe a folder of audio files through an asynchronous SageMaker endpoint: see `--help`.

    client/invoke_async.py whisper-async recordings/ --bucket my-bucket --format vtt
"""

import sys

from whisper_triton.clients.asynchronous import main

if __name__ == "__main__":
    sys.exit(main())
