"""Benchmarks: one script per measured claim; results are recorded in BENCHMARKS.md."""
