"""Plain pickles and joblib files (``params.pkl`` from a JAX project, ``pickle.dump`` of a
dict of arrays, ``joblib.dump`` compressed or not), read without running them.

Every pickle in the file is interpreted by the restricted machine ``ckpt scan`` uses
(:mod:`ckptkit.pickles.plain_pickle`): nothing is imported or called.  numpy arrays are
recorded, never constructed, and their bytes are located where they already sit:

- ``pickle.dump`` of an array stores its bytes as one bytes value inside the pickle
  (``_reconstruct`` + ``BUILD`` below protocol 5, ``_frombuffer`` of a ``BYTEARRAY8`` at 5);
  the byte span of that value is the tensor's span;
- ``joblib.dump`` writes each array's bytes straight after its ``NumpyArrayWrapper``; the span
  is where they start.  For a compressed joblib file spans count inflated bytes, and reading
  a tensor inflates the stream up to it (charged to the reading budget).

``torch.save`` files in the legacy format are pickles too; they are claimed by the
torch-legacy reader first (its magic number), so a plain pickle never takes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptkit.errors import UnsafeContentError, UsageError, naming
from ckptkit.formats.tensor_io import materialise
from ckptkit.model import ByteSpan, RawCheckpoint, SafetyReport
from ckptkit.pickles import plain_pickle
from ckptkit.pickles.pickle_tree import Resolver
from ckptkit.storage.budget import metered
from ckptkit.tree import iter_tensors

FORMAT = "pickle"


def sniff(path: Path) -> bool:
    return path.is_file() and plain_pickle.sniff(path)


@metered
def read_info(path: Path) -> RawCheckpoint:
    with naming(path):
        read = plain_pickle.read_stream(path, record=True)
    compression = read.compression or None

    def payload_span(raw: Any) -> ByteSpan | None:
        found = read.payloads.get(id(raw))
        if found is None or found[0] is not raw:
            return None
        return ByteSpan(str(path), found[1], found[2], compression=compression)

    resolver = Resolver(payload_span=payload_span)
    with naming(path):
        values = [resolver.resolve(v) for v in read.values]
    # pickle.load reads the first pickle; later ones (rare) are shown beside it, numbered.
    tree = values[0] if len(values) == 1 else {f"pickle {i + 1}": v
                                                for i, v in enumerate(values)}
    findings = read.findings
    joblib = any(o.qualname == plain_pickle.WRAPPER for o, _s, _l in read.payloads.values()
                 if hasattr(o, "qualname"))
    container = " ".join(p for p in (read.compression, "joblib" if joblib else "pickle") if p)
    details: dict[str, Any] = {"pickles": findings.pickles, **findings.details()}
    if container != "pickle":  # joblib, or a compressed stream: say which
        details["container"] = container
    safety = SafetyReport(tuple(sorted(findings.objects)), tuple(sorted(findings.unsafe)),
                          findings.pickles)
    return RawCheckpoint(FORMAT, tree, tuple(iter_tensors(tree)), safety, details)


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    """``numpy`` (or ``jax``/``flax``, whose params are numpy trees too): the first pickle's
    object with numpy arrays read from their recorded bytes; other objects stay records.
    Nothing in the file runs, so ``unsafe`` is never needed; a file that names dangerous
    callables is still refused unless ``unsafe=True``."""
    raw = read_info(path)
    if raw.safety.unsafe and not unsafe:
        raise UnsafeContentError(
            f"{path}: refusing to load, the file calls {', '.join(raw.safety.unsafe)}",
            unsafe=list(raw.safety.unsafe), path=str(path),
            hint="Run `ckpt scan` on it; nothing was run")
    if framework not in ("numpy", "jax", "flax"):
        raise UsageError(f"{path}: cannot load a pickle as {framework!r}",
                         hint="Use framework='numpy'")
    with naming(path):
        return materialise(raw.tree)
