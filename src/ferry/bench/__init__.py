"""Benchmarks: commands that print tables; they measure, they do not assert."""
