"""Benchmarks (``fmlm bench ...``)."""
