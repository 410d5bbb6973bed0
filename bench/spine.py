#!/usr/bin/env python3
"""Direct engine vs HTTP end to end, and throughput at concurrency 1 and 8 (see --help)."""
import sys

from whisper_triton.bench_spine import main

sys.exit(main())
