"""The scan corpus: hostile files (one per technique and container, each payload harmless:
it creates a marker file or opens a connection to 127.0.0.1) and benign checkpoints written
by the real libraries.  ``scripts/scan_corpus.py`` writes it; tests and ``scripts/bench/scan``
use it."""
