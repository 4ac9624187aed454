"""Measurements: analytic FLOPs and KV bytes (`flops`), and timed benchmarks with device synchronisation."""
