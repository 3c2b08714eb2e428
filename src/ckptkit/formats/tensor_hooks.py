"""Readers that :mod:`ckptkit.formats.tensor_io` calls without importing them.

A tensor stored in chunks (:attr:`~ckptkit.model.TensorRef.chunks`, PyTorch DCP) is gathered
by the reader of its format, which imports tensor_io itself: tensor_io importing it back would
be a cycle.  So that reader registers here when it is imported, which it is whenever such a
TensorRef exists.  This module imports nothing, so registering costs no numpy import (sniffing
a directory must stay cheap).
"""

from __future__ import annotations

from typing import Any, Callable

#: ``chunk_reader(ref) -> numpy.ndarray``: the global tensor of a chunked ``ref``.
chunk_reader: Callable[[Any], Any] | None = None
