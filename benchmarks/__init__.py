"""The benchmarks: `python benchmarks/bench.py speed | loss | data | gpu | quality` (bench.py)."""
