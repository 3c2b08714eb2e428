"""The real ``huggingface_hub`` client against the Hub stand-in (ckptkit.testing.hf_hub): each
test runs the client in a fresh interpreter whose HF_ENDPOINT points at the stand-in and whose
HF_HOME/HF_HUB_CACHE are in tmp, as a user's process would, and checks what it got and what
the stand-in saw."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptkit.testing.hf_hub import Fault, HfHubStandIn
from tests.hf_content import CONFIG, NOTES, TOKEN, WEIGHTS, safetensors_bytes
from tests.testing.test_testing_hf_hub import git_blob_id

pytest.importorskip("huggingface_hub")

SHA256 = hashlib.sha256(WEIGHTS).hexdigest()
PRELUDE = """\
import json, sys
import huggingface_hub as hf

def out(value):
    print(json.dumps(value))

def error_of(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except Exception as exc:
        return type(exc).__name__
    return None

"""


def run_client(hub: HfHubStandIn, home: Path, code: str, *, token: str | None = None,
               offline: bool = False) -> Any:
    """Run ``code`` (after :data:`PRELUDE`) with the client pointed at ``hub``; returns the
    JSON its last ``out(...)`` printed."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True,
                          env=hub.client_env(home, token=token, offline=offline), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def repo_cache(home: Path, repo: str = "org/tiny", kind: str = "models") -> Path:
    return home / "hub" / f"{kind}--{repo.replace('/', '--')}"


def test_snapshot_download_builds_a_byte_identical_cache(hub: HfHubStandIn, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    got = run_client(hub, home, """
snapshot = hf.snapshot_download("org/tiny")
again = hf.hf_hub_download("org/tiny", "model.safetensors")
out([snapshot, again])
""")
    commit = hub.repo("org/tiny").branches["main"]
    cache = repo_cache(home)
    snapshot = cache / "snapshots" / commit
    assert got == [str(snapshot), str(snapshot / "model.safetensors")]
    files = {p.relative_to(snapshot).as_posix(): p.read_bytes()
             for p in snapshot.rglob("*") if p.is_file()}
    assert files == {"config.json": CONFIG, "model.safetensors": WEIGHTS,
                     "docs/notes.txt": NOTES}
    # Blobs named by the ETags the stand-in gave: sha256 for LFS, Git's blob id otherwise.
    assert sorted(p.name for p in (cache / "blobs").iterdir()) == sorted(
        [SHA256, git_blob_id(CONFIG), git_blob_id(NOTES)])
    assert (cache / "refs" / "main").read_text() == commit
    assert (snapshot / "model.safetensors").readlink().as_posix() == f"../../blobs/{SHA256}"
    assert not (home / "hub" / "blobs").exists()  # no Xet shared store: plain HTTP was used
    # The weights crossed the CDN once; the Hub only redirected them.
    route = hub.cdn_route("org/tiny", "model.safetensors")
    assert hub.cdn.bytes_sent(route) == len(WEIGHTS)
    resolve = hub.resolve_route("org/tiny", "model.safetensors", commit)
    assert {r.status for r in hub.hub.hits(resolve)} == {302}


def test_snapshot_download_with_allow_patterns_fetches_only_matches(
        hub: HfHubStandIn, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    snapshot = Path(run_client(hub, home, """
out(hf.snapshot_download("org/tiny", allow_patterns=["*.json", "docs/*"]))
"""))
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                  if p.is_file()) == ["config.json", "docs/notes.txt"]
    assert hub.cdn.hits() == []
    assert not [r for r in hub.hub.hits() if r.route.endswith("/model.safetensors")]


def test_api_describes_files_refs_and_revisions(hub: HfHubStandIn, tmp_path: Path) -> None:
    first = hub.tag("org/tiny", "v1.0")
    second = hub.commit("org/tiny", {"extra.txt": b"x\n"}, branch="dev")
    got = run_client(hub, tmp_path / "hf", """
api = hf.HfApi()
info = api.model_info("org/tiny", files_metadata=True)
refs = api.list_repo_refs("org/tiny")
out({"sha": info.sha, "gated": info.gated, "siblings": [
    [s.rfilename, s.size, s.blob_id, s.lfs and [s.lfs.sha256, s.lfs.size]]
    for s in info.siblings],
    "refs": [sorted((b.name, b.target_commit) for b in refs.branches),
             [(t.name, t.target_commit) for t in refs.tags]],
    "dev": api.resolve_revision("org/tiny", revision="dev").resolved,
    "exists": [api.file_exists("org/tiny", "extra.txt", revision="dev"),
               api.file_exists("org/tiny", "extra.txt"), api.repo_exists("org/absent")]})
""")
    assert got["sha"] == first and got["gated"] is False
    assert got["refs"] == [[["dev", second], ["main", first]], [["v1.0", first]]]
    assert got["dev"] == second and got["exists"] == [True, False, False]
    siblings = {name: rest for name, *rest in got["siblings"]}
    assert siblings["config.json"] == [len(CONFIG), git_blob_id(CONFIG), None]
    assert siblings["docs/notes.txt"] == [len(NOTES), git_blob_id(NOTES), None]
    size, _, lfs = siblings["model.safetensors"]
    assert size == len(WEIGHTS) and lfs == [SHA256, len(WEIGHTS)]


def test_get_safetensors_metadata_reads_the_header_by_range(hub: HfHubStandIn,
                                                           tmp_path: Path) -> None:
    big = safetensors_bytes(rows=400)  # ~200 KiB: more than the client's first 100 kB read
    hub.add_repo("org/big", {"model.safetensors": big})
    got = run_client(hub, tmp_path / "hf", """
meta = hf.get_safetensors_metadata("org/big")
file = meta.files_metadata["model.safetensors"]
out({"sharded": meta.sharded, "metadata": file.metadata,
     "tensors": {k: [t.dtype, t.shape] for k, t in file.tensors.items()}})
""")
    assert got == {"sharded": False, "metadata": {"format": "np"},
                   "tensors": {"encoder.weight": ["F32", [400, 128]],
                               "encoder.bias": ["F32", [128]], "step": ["I64", [1]]}}
    route = hub.cdn_route("org/big", "model.safetensors")
    assert [r.status for r in hub.cdn.hits(route)] == [206]
    assert hub.cdn.bytes_sent(route) == 100_001 < len(big)


def test_hf_file_system_lists_and_reads_ranges(hub: HfHubStandIn, tmp_path: Path) -> None:
    hub.tag("org/tiny", "v1.0")
    hub.commit("org/tiny", {"config.json": b'{"v": 2}\n'})
    hub.add_repo("org/data", {"README.md": b"# data\n", "train/part-0.parquet": WEIGHTS},
                 repo_type="dataset")
    got = run_client(hub, tmp_path / "hf", """
fs = hf.HfFileSystem()
info = fs.info("hf://org/tiny/model.safetensors")
with fs.open("hf://org/tiny/model.safetensors", "rb", block_size=4096) as f:
    f.seek(1000)
    part = f.read(100)
out({"ls": fs.ls("org/tiny", detail=False), "find": fs.find("hf://org/tiny"),
     "info": [info["type"], info["size"], info["lfs"]["sha256"]],
     "part": part.hex(), "old": fs.cat("hf://org/tiny@v1.0/config.json").decode(),
     "new": fs.cat("hf://org/tiny/config.json").decode(),
     "dataset": fs.ls("hf://datasets/org/data", detail=False),
     "readme": fs.cat("hf://datasets/org/data/README.md").decode()})
""")
    assert got["ls"] == ["org/tiny/docs", "org/tiny/config.json", "org/tiny/model.safetensors"]
    assert got["find"] == ["org/tiny/config.json", "org/tiny/docs/notes.txt",
                           "org/tiny/model.safetensors"]
    assert got["info"] == ["file", len(WEIGHTS), SHA256]
    assert bytes.fromhex(got["part"]) == WEIGHTS[1000:1100]
    assert (got["old"], got["new"]) == (CONFIG.decode(), '{"v": 2}\n')
    assert got["dataset"] == ["datasets/org/data/train", "datasets/org/data/README.md"]
    assert got["readme"] == "# data\n"
    route = hub.cdn_route("org/tiny", "model.safetensors")
    assert {r.status for r in hub.cdn.hits(route)} == {206}
    assert hub.cdn.bytes_sent(route) < len(WEIGHTS)  # the read took a block, not the file


def test_gated_repo_needs_the_token_and_it_never_reaches_the_cdn(hub: HfHubStandIn,
                                                                 tmp_path: Path) -> None:
    hub.add_repo("org/secret", {"config.json": CONFIG}, private=True)
    errors = run_client(hub, tmp_path / "anonymous", """
out([error_of(hf.hf_hub_download, "org/gated", "model.safetensors"),
     error_of(hf.snapshot_download, "org/gated"),
     error_of(hf.hf_hub_download, "org/secret", "config.json")])
""")
    assert errors == ["GatedRepoError", "GatedRepoError", "RepositoryNotFoundError"]
    assert hub.cdn.hits() == []

    anonymous = len(hub.hub.requests)
    home = tmp_path / "granted"
    got = run_client(hub, home, """
snapshot = hf.snapshot_download("org/gated")
meta = hf.get_safetensors_metadata("org/gated")
with hf.HfFileSystem().open("hf://org/gated/model.safetensors", "rb", block_size=4096) as f:
    head = f.read(8)
out([snapshot, sorted(meta.files_metadata["model.safetensors"].tensors), head.hex()])
""", token=TOKEN)
    snapshot = Path(got[0])
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert (snapshot / "config.json").read_bytes() == CONFIG
    assert got[1] == ["encoder.bias", "encoder.weight", "step"]
    assert bytes.fromhex(got[2]) == WEIGHTS[:8]
    resolves = [r for r in hub.hub.requests[anonymous:] if "/org/gated/resolve/" in r.route]
    assert resolves and all(r.header("Authorization") == f"Bearer {TOKEN}" for r in resolves)
    # Three kinds of download went through the CDN (whole file, header range, fsspec block),
    # and not one of them carried the token.
    assert len(hub.cdn.hits(hub.cdn_route("org/gated", "model.safetensors"))) >= 3
    assert hub.cdn_authorized() == []


def test_offline_client_rereads_the_cache_without_a_request(hub: HfHubStandIn,
                                                            tmp_path: Path) -> None:
    home = tmp_path / "hf"
    online = run_client(hub, home, 'out(hf.snapshot_download("org/tiny"))')
    seen = len(hub.hub.requests) + len(hub.cdn.requests)
    got = run_client(hub, home, """
out([hf.snapshot_download("org/tiny"), hf.hf_hub_download("org/tiny", "model.safetensors"),
     hf.hf_hub_download("org/tiny", "docs/notes.txt"),
     error_of(hf.hf_hub_download, "org/tiny", "absent.txt")])
""", offline=True)
    assert got[0] == online
    assert Path(got[1]).read_bytes() == WEIGHTS and Path(got[2]).read_bytes() == NOTES
    assert got[3] == "LocalEntryNotFoundError"
    assert len(hub.hub.requests) + len(hub.cdn.requests) == seen


def test_revisions_download_their_own_trees(hub: HfHubStandIn, tmp_path: Path) -> None:
    first = hub.tag("org/tiny", "v1.0")
    second = hub.commit("org/tiny", {"config.json": b'{"v": 2}\n'})
    home = tmp_path / "hf"
    got = run_client(hub, home, f"""
out([hf.hf_hub_download("org/tiny", "config.json", revision=rev)
     for rev in ("v1.0", "{first}", "main")])
""")
    assert [Path(p).read_bytes() for p in got] == [CONFIG, CONFIG, b'{"v": 2}\n']
    assert [Path(p).parent.name for p in got] == [first, first, second]
    refs = repo_cache(home) / "refs"
    assert ((refs / "v1.0").read_text(), (refs / "main").read_text()) == (first, second)


def test_dataset_repos_download_and_describe(hub: HfHubStandIn, tmp_path: Path) -> None:
    hub.add_repo("org/data", {"README.md": b"# data\n", "train/part-0.parquet": WEIGHTS},
                 repo_type="dataset")
    home = tmp_path / "hf"
    got = run_client(hub, home, """
snapshot = hf.snapshot_download("org/data", repo_type="dataset")
info = hf.HfApi().dataset_info("org/data", files_metadata=True)
out([snapshot, {s.rfilename: s.lfs and s.lfs.sha256 for s in info.siblings}])
""")
    snapshot = Path(got[0])
    assert snapshot.parent.parent == repo_cache(home, "org/data", "datasets")
    assert (snapshot / "train" / "part-0.parquet").read_bytes() == WEIGHTS
    assert (snapshot / "README.md").read_bytes() == b"# data\n"
    assert got[1] == {"README.md": None, "train/part-0.parquet": SHA256}


def test_client_recovers_from_a_429_a_dropped_body_and_an_ignored_range(
        hub: HfHubStandIn, tmp_path: Path) -> None:
    # The client writes in 10 MiB chunks and resumes from the last whole one, so the object
    # must be larger than that for the resume to ask for a range.
    chunk = 10 << 20
    large = bytes(range(256)) * (44 << 10)  # 11 MiB
    hub.add_repo("org/large", {"weights.bin": large})
    # The repo-info call does not retry, the tree listing after it does.
    hub.inject(Fault("status", status=429, retry_after="0", skip=1), "org/large", on="api")
    hub.inject(Fault("drop", after=chunk + 5000), "org/large", "weights.bin")
    hub.inject(Fault("ignore-range", skip=1), "org/large", "weights.bin")
    snapshot = Path(run_client(hub, tmp_path / "hf", 'out(hf.snapshot_download("org/large"))'))
    assert (snapshot / "weights.bin").read_bytes() == large
    commit = hub.repo("org/large").branches["main"]
    assert [r.status for r in hub.hub.hits(f"/api/models/org/large/tree/{commit}")] == [429, 200]
    # Dropped after 10 MiB + 5000 bytes; the resume asked for the rest from the last whole
    # chunk, got the whole object (200) and started over.
    route = hub.cdn_route("org/large", "weights.bin")
    assert [(r.header("Range"), r.status, r.sent) for r in hub.cdn.hits(route)] == [
        (None, 200, chunk + 5000), (f"bytes={chunk}-", 200, len(large))]


def test_corrupted_lfs_object_reaches_the_client_unnoticed(hub: HfHubStandIn,
                                                          tmp_path: Path) -> None:
    # The client checks sizes only, so a same-size corruption lands in its cache under the
    # true sha256: what ckpt's verification (issue 16) must refuse.
    hub.inject(Fault("corrupt", offset=20_000, times=None), "org/tiny", "model.safetensors")
    path = Path(run_client(hub, tmp_path / "hf",
                           'out(hf.hf_hub_download("org/tiny", "model.safetensors"))'))
    data = path.read_bytes()
    assert len(data) == len(WEIGHTS) and data != WEIGHTS
    assert path.resolve().name == SHA256
