#!/usr/bin/env python3
"""Benchmark Triton's `whisper` or `transcribe` model over gRPC on a folder of audio (see --help).

    client/grpc_benchmark.py my_clips/ --model whisper --concurrency 1 2 4 8 16
"""

import sys

from whisper_triton.clients.grpc_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
