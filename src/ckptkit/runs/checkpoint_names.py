"""Which names are periodic checkpoints of a run, and finding them in a directory.

:func:`parse_name` reads one name against the naming schemes below; :func:`scan` applies them
to a directory and groups what it finds into runs.  A name counts on its own when the step
number follows a word that says so (``step``, ``epoch``, Lightning's ``epoch=E-step=S``) or an
underscore (``model_100.pt``, ``iter_3000.pt``); a number without one (``model100.pt``,
``100.pt``, ``resnet50.pt``) counts only when at least two files of one directory share the
pattern, so a lone ``resnet50.pt`` is never taken for step 50 of a run.  Names with best,
last or latest as a word and the shards of a sharded save (``-00001-of-00003``) never count.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from ckptkit.runs import integrity
from ckptkit.errors import NotFoundError, UsageError
from ckptkit.storage.atomic import TEMP_NAME

Kind = Literal["file", "dir", "tf"]
#: (pattern, prefix, step, epoch): what :func:`parse_name` says about a name.
Parsed = tuple[str, str, int, "int | None"]

_EXT = r"(?P<ext>\.pt|\.pth|\.pth\.tar|\.ckpt|\.bin|\.safetensors)"


@dataclass(frozen=True)
class NamingScheme:
    """One way runs name their checkpoint files; ``label`` builds the run's pattern."""

    regex: re.Pattern[str]
    label: Callable[[str, str], str]  # (prefix, extension) -> "thinker_step_{N}.pt"
    alone: bool  # False: the name counts only in a run of two or more


#: Tried in order; the first match wins.  DOTALL: a name may hold any character, newlines too.
SCHEMES: tuple[NamingScheme, ...] = (
    # Lightning: epoch=E-step=S[-anything].ckpt; the step orders, the epoch is informative.
    NamingScheme(re.compile(r"(?P<prefix>.*?)epoch=(?P<epoch>\d+)-step=(?P<step>\d+)"
                            r"(?:[-_].*)?(?P<ext>\.ckpt)", re.DOTALL),
                 lambda p, e: f"{p}epoch={{E}}-step={{N}}.ckpt", True),
    # step_1000.pt, μOmni thinker_step_200.pt / thinker_step200.pt, Jukebox
    # checkpoint_step_N.pth.tar.
    NamingScheme(re.compile(r"(?:(?P<prefix>.+?)_)?step_?(?P<step>\d+)" + _EXT, re.DOTALL),
                 lambda p, e: f"{p}_step_{{N}}{e}" if p else f"step_{{N}}{e}", True),
    # epoch_3.pt, epoch3.pt, model_epoch_3.pt (the epoch is the step).
    NamingScheme(re.compile(r"(?P<prefix>.*?)epoch_?(?P<step>\d+)" + _EXT, re.DOTALL),
                 lambda p, e: f"{p}epoch_{{N}}{e}", True),
    # model_100.pt, checkpoint_5.pt, ckpt_5.pt, iter_3000.pth: an underscore before the number.
    NamingScheme(re.compile(r"(?P<prefix>.+?)_(?P<step>\d+)" + _EXT, re.DOTALL),
                 lambda p, e: f"{p}_{{N}}{e}", True),
    # 100.pt, model100.pt, model-100.pt: only as a run, since resnet50.pt looks the same.
    NamingScheme(re.compile(r"(?P<prefix>(?:.*\D)?)(?P<step>\d+)" + _EXT, re.DOTALL),
                 lambda p, e: f"{p}{{N}}{e}", False),
)
_HF_DIR = re.compile(r"checkpoint-(?P<step>\d+)")
#: Step directories of sharded and distributed saves: torchtitan ``step-N/``, DeepSpeed
#: ``global_stepN/``, torchtune ``epoch_N/`` (with an optional ``{prefix}_`` or ``{prefix}-``).
_STEP_DIR = re.compile(r"(?P<prefix>[A-Za-z][\w.]*?[-_])??(?P<word>global_step|step|epoch)"
                       r"(?P<sep>[-_]?)(?P<step>\d+)")
_ORBAX_DIR = re.compile(r"(?:(?P<prefix>[A-Za-z][\w]*?)_)?(?P<step>0|[1-9]\d*)")
_TF_INDEX = re.compile(r"(?P<prefix>.+)-(?P<step>\d+)\.index", re.DOTALL)
#: What TensorFlow names the data shards of checkpoint PREFIX (``%s.data-%05d-of-%05d``).
_TF_SHARD = r"\.data-\d{5,}-of-\d{5,}"
#: best/last/latest anywhere as a word: such files are pinned, whatever else the name says.
PINNED = re.compile(r"(?:^|[^a-z])(best|last|latest)(?:$|[^a-z])", re.IGNORECASE)
#: One shard of a sharded save (model-00001-of-00003.safetensors), never a step of a run.
_SHARD_OF = re.compile(r"\d+-of-\d+")
#: A temporary file of an atomic write in progress (``ckptkit.save``, convert, strip).
SAVE_TEMP_NAME = TEMP_NAME


@dataclass(frozen=True)
class Checkpoint:
    """One periodic checkpoint: a file, a directory, or a TF index with its data shards."""

    path: Path
    group: str
    prefix: str
    step: int
    kind: Kind
    members: tuple[Path, ...]
    epoch: int | None = None

    @property
    def name(self) -> str:
        return self.path.name


def _match(name: str) -> tuple[Parsed, bool] | None:
    """The file name's reading and whether it counts on its own."""
    m = _TF_INDEX.fullmatch(name)
    if m:
        return (f"{m['prefix']}-{{N}}.index", m["prefix"], int(m["step"]), None), True
    if _SHARD_OF.search(name):
        return None
    for scheme in SCHEMES:
        m = scheme.regex.fullmatch(name)
        if m:
            prefix = m["prefix"] or ""
            epoch = int(m["epoch"]) if m.groupdict().get("epoch") else None
            return ((scheme.label(prefix, m["ext"]), prefix, int(m["step"]), epoch),
                    scheme.alone)
    return None


def parse_name(name: str, is_dir: bool = False, in_run: bool = False) -> Parsed | None:
    """``(pattern, prefix, step, epoch)`` if ``name`` is a periodic checkpoint name, else None.

    Names with ``best``, ``last`` or ``latest`` as a word are never periodic (they are pinned).
    Names without a word or underscore before the number (``model100.pt``, ``100.pt``) count
    only in a run of two files sharing the pattern: they are parsed only with ``in_run``.
    """
    if PINNED.search(name):
        return None
    if is_dir:
        m = _HF_DIR.fullmatch(name)
        if m:
            return "checkpoint-{N}/", "checkpoint", int(m["step"]), None
        m = _STEP_DIR.fullmatch(name)
        if m:
            prefix = (m["prefix"] or "") + m["word"]
            return f"{prefix}{m['sep']}{{N}}/", prefix, int(m["step"]), None
        m = _ORBAX_DIR.fullmatch(name)
        if m:
            prefix = m["prefix"] or ""
            return f"{prefix + '_' if prefix else ''}{{N}}/", prefix, int(m["step"]), None
        return None
    found = _match(name)
    if found is None or not (found[1] or in_run):
        return None
    return found[0]


def is_orbax_dir(path: Path) -> bool:
    return any((path / m).exists() for m in integrity.ORBAX_MARKERS)


def entries(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of ``directory``, sorted by name; one-line errors when it is missing."""
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        raise NotFoundError(f"{directory}: no such directory",
                            hint="Pass the run directory that holds the checkpoints",
                            path=str(directory)) from None
    except NotADirectoryError:
        raise UsageError(f"{directory}: not a directory",
                         hint="Pass the run directory that holds the checkpoints") from None


@dataclass(frozen=True)
class Listed:
    """One entry of a run directory, local (``path`` a Path) or remote (a location)."""

    name: str
    path: Any
    is_dir: bool
    is_file: bool
    is_link: bool = False


def listing(directory: Any) -> list[Listed]:
    """The entries of ``directory`` (a Path, or a remote location), sorted by name."""
    if isinstance(directory, Path):
        return [Listed(e.name, Path(e.path), e.is_dir(follow_symlinks=False),
                       e.is_file(follow_symlinks=False), e.is_symlink())
                for e in entries(directory)]
    if not directory.is_dir():
        raise NotFoundError(f"{directory}: no such directory or prefix",
                            hint="Pass the run directory (prefix) that holds the checkpoints",
                            path=str(directory))
    return [Listed(e.name, directory.child(e.name), e.is_dir, not e.is_dir)
            for e in directory.list()]


def _tf_shards(stem: str, listed: list[Listed]) -> tuple[Any, ...]:
    """Exactly ``STEM.data-NNNNN-of-NNNNN`` regular files: a folder or a ``.sha256`` beside
    them that merely starts the same way is not part of the checkpoint."""
    shard = re.compile(re.escape(stem) + _TF_SHARD, re.DOTALL)
    return tuple(e.path for e in listed if shard.fullmatch(e.name) and e.is_file)


def _relative(directory: Any, root: Any) -> str:
    """``directory`` below ``root`` as ``"a/b/"`` (``""`` for the root itself)."""
    if directory == root:
        return ""
    if isinstance(directory, Path):
        return f"{directory.relative_to(root)}/"
    return str(directory).rstrip("/")[len(str(root).rstrip("/")) + 1:] + "/"


def _scan_one(directory: Any, root: Any) -> tuple[list[Checkpoint], list[Any]]:
    """Checkpoints directly in ``directory`` and the subdirectories that are not checkpoints."""
    listed = listing(directory)
    found: list[Checkpoint] = []
    subdirs: list[Any] = []
    orbax_candidates: list[tuple[Any, Parsed]] = []
    in_runs: dict[str, list[Checkpoint]] = {}
    # Group names are relative to the scanned root: "thinker_step_{N}.pt", "vision_tiny/...".
    rel = _relative(directory, root)
    for e in listed:
        path = e.path
        if e.is_link:
            continue  # links are pinned (and never followed)
        if e.is_dir:
            parsed = parse_name(e.name, is_dir=True)
            if parsed and parsed[0] == "checkpoint-{N}/":
                found.append(Checkpoint(path, f"{rel}{parsed[0]}", parsed[1], parsed[2], "dir",
                                        (path,)))
            elif parsed and _STEP_DIR.fullmatch(e.name):
                # A step-N/ folder is a checkpoint only if it holds one (DCP, Orbax, HF
                # weights, DeepSpeed ranks): an empty or unrelated folder is never deleted.
                if integrity.directory_layout(path) is not None:
                    found.append(Checkpoint(path, f"{rel}{parsed[0]}", parsed[1], parsed[2],
                                            "dir", (path,)))
                elif not e.name.startswith("."):
                    subdirs.append(path)
            elif parsed:
                orbax_candidates.append((path, parsed))
            elif not e.name.startswith("."):
                subdirs.append(path)
            continue
        match = None if PINNED.search(e.name) else _match(e.name)
        if match is None:
            continue
        (pattern, prefix, step, epoch), alone = match
        if pattern.endswith(".index"):
            # The index goes first: a TF checkpoint without it reads as absent, not as broken.
            stem = e.name[: -len(".index")]
            found.append(Checkpoint(path, f"{rel}{pattern}", prefix, step, "tf",
                                    (path, *_tf_shards(stem, listed))))
            continue
        ckpt = Checkpoint(path, f"{rel}{pattern}", prefix, step, "file", (path,), epoch)
        if alone:
            found.append(ckpt)
        else:
            in_runs.setdefault(pattern, []).append(ckpt)
    found.extend(c for run in in_runs.values() if len(run) >= 2 for c in run)
    # Numeric directories count as Orbax steps only if one of their group carries an Orbax
    # marker: a folder named "2024" beside the checkpoints is not a checkpoint.
    by_pattern: dict[str, list[tuple[Any, Parsed]]] = {}
    for path, parsed in orbax_candidates:
        by_pattern.setdefault(parsed[0], []).append((path, parsed))
    for pattern, members in by_pattern.items():
        if any(is_orbax_dir(p) for p, _ in members):
            found.extend(Checkpoint(p, f"{rel}{pattern}", parsed[1], parsed[2], "dir", (p,))
                         for p, parsed in members)
        else:
            subdirs.extend(p for p, _ in members)
    return found, sorted(subdirs, key=str)


def run_root(directory: str | os.PathLike[str] | Any) -> Any:
    """The run directory a command names: a Path, or a remote location for a URL (read
    through its file system's listing)."""
    from ckptkit.storage.location import LocalLocation, is_url, locate

    if isinstance(directory, (str, os.PathLike)) and not is_url(directory):
        return Path(directory)
    found = locate(directory)
    if isinstance(found, LocalLocation):
        return found.path
    # One spelling per prefix ("s3://b/run" and "s3://b/run/" name the same run), so that
    # the checkpoints' parent() compares equal to the root.
    return locate(str(getattr(found, "url", directory)).rstrip("/") + "/")


def scan(directory: str | os.PathLike[str], recursive: bool = False) -> list[Checkpoint]:
    """Periodic checkpoints in ``directory`` (and its run subdirectories if ``recursive``).

    Recognised (docs/cleanup.md has the table): ``[prefix_]step_{N}`` / ``step{N}``,
    ``[prefix]epoch_{N}`` / ``epoch{N}``, ``{prefix}_{N}`` (``model_100``, ``iter_3000``) with
    .pt, .pth, .pth.tar, .ckpt, .bin or .safetensors; ``{N}.pt``, ``{prefix}{N}.pt`` only as
    a run of two or more; Lightning ``epoch={E}-step={S}[-...].ckpt``; HF ``checkpoint-{N}/``;
    step directories ``[prefix_]step-{N}/``, ``global_step{N}/``, ``epoch_{N}/`` that hold a
    DCP, Orbax, Hugging Face or DeepSpeed checkpoint;
    Orbax ``{N}/`` or ``{prefix}_{N}/`` (when a marker file shows the group is Orbax's); TF
    ``{prefix}-{N}.index`` with exactly its ``.data-NNNNN-of-NNNNN`` shards.  Symlinks are
    never followed and, like names containing best/last/latest, never periodic.  Sorted by
    group, then step.
    """
    root = run_root(directory)
    found, subdirs = _scan_one(root, root)
    while recursive and subdirs:
        sub = subdirs.pop(0)
        more, deeper = _scan_one(sub, root)
        found.extend(more)
        subdirs.extend(deeper)
    return sorted(found, key=lambda c: (c.group, c.step, c.name))


__all__ = ["Checkpoint", "Listed", "NamingScheme", "PINNED", "SAVE_TEMP_NAME", "SCHEMES",
           "entries", "listing", "parse_name", "run_root", "scan"]
