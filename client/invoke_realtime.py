#!/usr/bin/env python3
"""Transcribe audio files through a real-time SageMaker endpoint: see `--help`.

    AWS_DEFAULT_REGION=us-east-1 client/invoke_realtime.py whisper clip.wav --format srt --write
"""

import sys

from whisper_triton.clients.realtime import main

if __name__ == "__main__":
    sys.exit(main())
