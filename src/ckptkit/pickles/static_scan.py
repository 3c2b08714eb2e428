"""Listing the globals a pickle names without interpreting it: the fallback for broken pickles
(everything after the break is still reported) and for pickles hidden where tensor bytes belong.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import TYPE_CHECKING, Any

from ckptkit.errors import BudgetError
from ckptkit.pickles import danger
from ckptkit.pickles.findings import Findings
from ckptkit.pickles.pickle_globals import ALLOWED
from ckptkit.storage import budget

if TYPE_CHECKING:
    from ckptkit.pickles.unpickler import PickleContext


def scan_globals(data: bytes, findings: Findings, context: PickleContext | None = None, *,
                 base: int = 0) -> None:
    """Statically list the globals a (possibly broken) pickle names, without interpreting it.

    Tracks string pushes and the memo so that ``STACK_GLOBAL`` operands fetched with
    ``BINGET`` are resolved too.
    """
    allowed = context.allowed if context else {}
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    meter = budget.OpcodeMeter(budget.current(), findings.location)  # as the machine is
    counts, left = meter.counts, meter.settle()
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            counts[ord(op.code)] += 1
            left -= 1
            if not left:
                left = meter.settle()
                del strings[:-2]  # only the last two are ever operands
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if (module, attr) not in allowed:
                    _note(findings, module, attr, name, base + (pos or 0))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                if (str(strings[-2]), str(strings[-1])) not in allowed:
                    _note(findings, str(strings[-2]), str(strings[-1]), name, base + (pos or 0))
            if isinstance(arg, str) and ("UNICODE" in name or name.endswith("STRING")):
                strings.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
            if name == "STOP":
                strings.clear()
    except BudgetError:
        raise
    except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
        pass
    meter.settle()


def _note(findings: Findings, module: str, name: str, via: str, offset: int) -> None:
    if (module, name) in ALLOWED:
        return
    if danger.is_dangerous(module, name):
        findings.flag(f"{module}.{name}", via, offset)
    else:
        findings.objects.add(f"{module}.{name}")
