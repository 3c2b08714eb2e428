"""Torch files inside pickles: what ``torch.storage._load_from_bytes`` would load.

``pickle.dumps(tensor)`` stores the tensor's storage as a whole ``torch.save`` file (legacy
format) inside the pickle, and unpickling runs ``torch.load(io.BytesIO(data),
weights_only=False)`` on it.  Such a pickle is as safe as that embedded file: it is read with
the same restricted readers, and what it would construct or call is reported as found inside
the outer pickle.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ckptkit.errors import CkptkitError
from ckptkit.pickles.unpickler import Findings, UnsafePickleError


def read_embedded_torch_file(data: bytes, findings: Findings, where: str) -> str | None:
    """Read ``data`` (a torch file) as ``torch.load`` would and add its findings to
    ``findings``, placed ``where`` the outer pickle embeds it.

    Returns why the embedded bytes cannot be read, or None: the caller reports such a call as
    unsafe, since what ckptkit cannot read it cannot vouch for."""
    from ckptkit.formats import torch_legacy, torch_zip

    reader = torch_zip if data[:4] == b"PK\x03\x04" else torch_legacy
    inner = Findings()
    fd, name = tempfile.mkstemp(prefix="ckpt-embedded-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        try:
            raw = reader.read_info(Path(name))
        except UnsafePickleError as exc:
            inner = exc.findings
        except CkptkitError as exc:
            return exc.message.replace(name, "the embedded file")[:200]
        else:
            inner.objects |= set(raw.safety.objects)
            inner.pickles = raw.safety.pickles
            inner.unsafe = dict(raw.details.get("unsafe_via", {}))
            inner.where = dict(raw.details.get("unsafe_where", {}))
            inner.offset = dict(raw.details.get("unsafe_offset", {}))
    finally:
        os.unlink(name)
    findings.merge(inner, f"{where} > embedded torch file")
    return None
