"""The restricted reader on plain pickles: benign objects at every protocol are not unsafe."""

from __future__ import annotations

import argparse
import collections
import pickle

import pytest

from ckptkit.model import Opaque
from ckptkit.pickles.pickle_tree import Resolver
from ckptkit.pickles.unpickler import Findings, read_pickle


class Plain:
    def __init__(self) -> None:
        self.x = 3


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_benign_objects_are_recorded_not_flagged(protocol: int) -> None:
    data = pickle.dumps({"plain": Plain(), "ns": argparse.Namespace(q=1),
                         "od": collections.OrderedDict(a=1), "t": (1.5, "s", b"b", None)},
                        protocol=protocol)
    findings = Findings()
    tree = Resolver().resolve(read_pickle(data, findings))
    assert findings.unsafe == {}
    assert findings.objects == {f"{__name__}.Plain", "argparse.Namespace"}
    assert isinstance(tree["plain"], Opaque) and tree["plain"].state == {"x": 3}
    assert tree["od"] == {"a": 1} and tree["t"] == (1.5, "s", b"b", None)


def test_every_global_passes_through_the_one_gate() -> None:
    data = pickle.dumps([len, print], protocol=4)  # builtins: would be callable if resolved
    findings = Findings()
    tree = Resolver().resolve(read_pickle(data, findings))
    assert set(findings.unsafe) == {"builtins.len", "builtins.print"}
    assert all(isinstance(item, Opaque) for item in tree)  # inert stand-ins, not the builtins


def test_a_pickle_cut_short_says_so() -> None:
    import pickle

    from ckptkit.errors import IntegrityError
    from ckptkit.pickles.unpickler import Findings, read_pickle

    data = pickle.dumps({"weights": list(range(100))}, protocol=2)
    with pytest.raises(IntegrityError, match=r"corrupt pickle: EOFError: the data ends early$"):
        read_pickle(data[:-1], Findings())
