"""`ckpt cleanup` deletes exactly what its plan shows as ``delete``, on random run directories.

Each example builds a directory from real files (a torch zip, a safetensors file and a
TensorFlow checkpoint from ``ckptkit/samples``): periodic checkpoints in every naming scheme,
complete or cut short, TF prefixes beside look-alikes (``ckpt-1.data-analysis/``,
``ckpt-1.data-00000-of-00001.sha256``), HF ``checkpoint-N/`` and Orbax step folders,
best/last files, symlinks and unrelated files and folders.  Then the set of paths that
disappear must equal the set the plan names for deletion (folders with all they hold), and
nothing the plan keeps may change.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ckptkit.runs.retention import plan_cleanup
from tests.conftest import SRC

SAMPLES = SRC / "ckptkit" / "samples"
TORCH_ZIP = SAMPLES / "redimnet_epoch_3.pt"
SAFETENSORS = SAMPLES / "model.safetensors"
TF = SAMPLES / "tf_ckpt"

FILE_NAMES = ("thinker_step_{}.pt", "step_{}.pt", "epoch_{}.pth", "model_{}.pt", "{}.pt",
              "model{}.pt", "ckpt_{}.safetensors", "iter_{}.ckpt", "epoch=1-step={}.ckpt",
              "resnet{}.pt")
TF_LOOKALIKES = ("ckpt-{}.data-analysis/plots.txt", "ckpt-{}.data-00000-of-00001.sha256",
                 "ckpt-{}.data-00000-of-00001.bak", "ckpt-{}.data-0-of-1", "ckpt-{}.indexes",
                 "ckpt-{}.data-00000-of-00001/", "ckpt-{}-notes.index.txt")
OTHERS = ("notes.txt", "tokenizer.model", "resnet50.pt", "config.json", "thinker_best.pt",
          "last.ckpt", "latest_step_3.pt", "logs/run.log", "2024/", "thinker.pt", "checkpoint")

counts = st.integers(min_value=1, max_value=5)
odd_one = st.one_of(st.none(), st.integers(min_value=1, max_value=5))  # a step cut short
places = st.sampled_from(["", "run2/"])
#: Each operation adds a run (steps 1..n, one of them possibly incomplete) or one other entry.
operations = st.one_of(
    st.tuples(st.just("file"), places, st.sampled_from(FILE_NAMES), counts, odd_one),
    st.tuples(st.just("tf"), places, st.sampled_from(["no shard", "short shard"]), counts,
              odd_one),
    st.tuples(st.just("lookalike"), places, st.sampled_from(TF_LOOKALIKES), counts),
    st.tuples(st.just("hf"), places, counts, odd_one),
    st.tuples(st.just("orbax"), places, counts, odd_one),
    st.tuples(st.just("other"), places, st.sampled_from(OTHERS)),
    st.tuples(st.just("link"), places, st.sampled_from(FILE_NAMES), counts),
)


def copy(source: Path, target: Path, complete: bool = True) -> None:
    if target.exists() or os.path.lexists(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data if complete else data[: len(data) // 2])


def build(root: Path, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    for op in ops:
        kind, place = op[0], root / op[1]
        place.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            _, _, name, n, bad = op
            for step in range(1, n + 1):
                copy(SAFETENSORS if name.endswith(".safetensors") else TORCH_ZIP,
                     place / name.format(step), step != bad)
        elif kind == "tf":
            _, _, damage, n, bad = op
            for step in range(1, n + 1):
                copy(TF / "ckpt-1.index", place / f"ckpt-{step}.index")
                if not (step == bad and damage == "no shard"):
                    copy(TF / "ckpt-1.data-00000-of-00001",
                         place / f"ckpt-{step}.data-00000-of-00001", step != bad)
        elif kind == "lookalike":
            for step in range(1, op[3] + 1):
                name = op[2].format(step)
                target = place / (name + "inside.txt" if name.endswith("/") else name)
                if not os.path.lexists(target) and not target.parent.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text("look-alike")
        elif kind == "hf":
            for step in range(1, op[2] + 1):
                folder = place / f"checkpoint-{step * 10}"
                copy(SAFETENSORS, folder / "model.safetensors")
                if step != op[3]:
                    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        elif kind == "orbax":
            for step in range(1, op[2] + 1):
                folder = place / str(step * 100)
                copy(TORCH_ZIP, folder / "default" / "data")
                if step != op[3]:
                    (folder / "commit_success.txt").write_text("ok")
        elif kind == "other":
            name = op[2]
            if name == "checkpoint":
                copy(TF / "checkpoint", place / name)
            elif name.endswith("/"):
                (place / name).mkdir(exist_ok=True)
            else:
                copy(TORCH_ZIP, place / name)
        elif kind == "link" and not os.path.lexists(place / "last.pt"):
            (place / "last.pt").symlink_to(op[2].format(op[3]))


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``root`` (links not followed) with its type and size."""
    found = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(base) / name
            st_ = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            found[str(path.relative_to(root))] = (kind, 0 if kind == "dir" else st_.st_size)
    return found


def below(root: Path, member: Path, before: dict[str, tuple[str, int]]) -> set[str]:
    rel = str(member.relative_to(root))
    return {p for p in before if p == rel or p.startswith(rel + "/")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operations, min_size=1, max_size=14), keep_last=st.integers(1, 3),
       keep_every=st.sampled_from([None, 2, 3]), recursive=st.booleans())
def test_the_set_deleted_is_the_set_the_plan_shows(ops: list[tuple],  # type: ignore[type-arg]
                                                   keep_last: int, keep_every: int | None,
                                                   recursive: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        root.mkdir()
        build(root, ops)
        before = tree(root)
        plan = plan_cleanup(root, keep_last=keep_last, keep_every=keep_every,
                            recursive=recursive)
        shown_delete = {p for i in plan.deleted for m in i.members for p in below(root, m, before)}
        shown_keep = {str(p.relative_to(root)) for i in plan.kept for p in (i.path, *i.members)}
        assert not shown_delete & shown_keep, "a path is shown both as keep and as delete"
        event(f"paths deleted: {'some' if shown_delete else 'none'}")  # about half of them
        plan.execute()
        after = tree(root)
        assert set(before) - set(after) == shown_delete
        assert {p: before[p] for p in after} == after, "a kept path changed"
