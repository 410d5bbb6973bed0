#!/usr/bin/env python3
"""Our long-form pipeline vs faster-whisper's BatchedInferencePipeline (see --help)."""
import sys

from whisper_triton.bench_longform import main

sys.exit(main())
