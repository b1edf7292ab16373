"""Benchmarks for cgtree: the models they run, timing helpers and the benchmark scripts.

Scripts here are run as files (``python3 benchmarks/bench_inprocess.py``); the package exists so
that tests and other scripts can import ``benchmarks.models`` and ``benchmarks.timing``.
"""
