"""pickles: see docs/architecture.md."""
