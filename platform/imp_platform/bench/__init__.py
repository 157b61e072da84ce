"""Benchmarks behind ``platform bench data|moe|train``: JSON results with in-run baselines."""
