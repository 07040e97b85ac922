"""Benchmarks against baselines in the style of the original scripts (`make bench`)."""
