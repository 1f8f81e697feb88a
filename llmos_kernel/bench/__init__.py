"""Benchmarks that print llmos beside a baseline measured in the same run."""
