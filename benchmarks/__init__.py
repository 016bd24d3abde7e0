"""Measurement: perplexity now; latency, memory and the benchmark runner as they land."""
