"""Benchmarks for dynamo_lite: reproducible measurements, one command each (see benchmarks/README.md)."""
