"""TorchScript archives (``torch.jit.save``): parameters and constants, code never run.

The outer layout is a torch zip plus ``constants.pkl`` and a ``code/`` folder of TorchScript
sources.  ``data.pkl`` holds the module tree as ``__torch__.*`` objects whose state carries the
parameters; those classes are recorded, not constructed, and the code is only counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptkit.storage.budget import metered
from ckptkit.storage.location import Location, locate
from ckptkit.formats import ziparchive
from ckptkit.formats.torch_zip import TorchArchive, find_prefix, is_torchscript
from ckptkit.model import RawCheckpoint
from ckptkit.pickles.pickle_globals import allowed
from ckptkit.tree import iter_tensors, join
from ckptkit.pickles.unpickler import PickleContext

FORMAT = "torchscript"

#: TorchScript's own type tags and typed lists (data/pickle_allowlist.toml, [torchscript]);
#: ``__torch__.*`` are the archive's module classes, recorded as state, not reported.
CONTEXT = PickleContext(allowed=allowed("torchscript"), known_prefixes=("__torch__",))


def sniff(path: Path | Location) -> bool:
    path = locate(path)
    if not ziparchive.is_zip(path):
        return False
    try:
        with ziparchive.zip_of(path) as archive:
            names = archive.namelist()
    except (*ziparchive.ZIP_ERRORS, ValueError):
        return False
    prefix = find_prefix(names)
    return prefix is not None and is_torchscript(names, prefix)


@metered
def read_info(path: Path | Location) -> RawCheckpoint:
    with TorchArchive(path, "TorchScript archive") as archive:
        module = archive.read_object("data.pkl", "data", CONTEXT)
        constants: Any = ()
        if f"{archive.prefix}/constants.pkl" in archive.names:
            constants = archive.read_object("constants.pkl", "constants", CONTEXT)
        tree = {"module": module, "constants": list(constants) if constants else []}
        # One module tree, like a bare state dict: names such as 'proj.weight' form one group.
        tensors = tuple(((join(p),), ref) for p, ref in iter_tensors(module))
        tensors += tuple((("constants",) + p[1:], ref)
                         for p, ref in iter_tensors({"c": tree["constants"]}))
        code = [n for n in archive.names if n.startswith(f"{archive.prefix}/code/")
                and n.endswith(".py")]
        details = archive.details()
        details.update(module_class=getattr(module, "qualname", None), code_files=len(code),
                       code_executed=False, **archive.findings.details())
        return RawCheckpoint(FORMAT, tree, tensors, archive.safety(), details)


@metered
def load(path: Path, framework: str, *, unsafe: bool = False) -> Any:
    from ckptkit.formats import torch_common

    return torch_common.load(path, framework, unsafe=unsafe, reader=read_info)
