"""End-to-end experiments on the embedded default: `demo` and `reproduce` (runs, then reports read from their JSON)."""
