"""Helpers shared by the tests and the benchmarks (not part of the installed package):
espeak-ng speech, long recordings. Importable from the repository root (pytest's pythonpath, and
bench/_path.py for the benchmark scripts)."""
