"""scan: see docs/architecture.md."""
