"""Benchmark scripts of secondorder (race vs AdamW, step time, ...); see benchmarks/README.md."""
