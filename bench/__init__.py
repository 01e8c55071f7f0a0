"""Benchmarks of topkast-cli: accuracy vs sparsity of every method, step time and memory of
Top-KAST relative to dense. `python -m bench` (or `make bench`) writes bench/results/."""
