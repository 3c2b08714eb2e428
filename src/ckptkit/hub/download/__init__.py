"""download: see docs/architecture.md."""
