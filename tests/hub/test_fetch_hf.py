"""``ckpt fetch hf:ORG/REPO`` against the Hugging Face Hub stand-in, with the real
``huggingface_hub`` client on both sides of the cache: it reads offline what ckpt fetched, and
ckpt reuses what it cached.  Faults come from the stand-in's queue; the kill -9 test counts the
bytes the CDN sent, under a per-connection rate cap, never the clock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptkit.testing.hf_hub import Fault, HfHubStandIn
from tests.conftest import SRC, run_main
from tests.hf_content import CONFIG, NOTES, TOKEN, WEIGHTS, hub  # noqa: F401  (fixture)
from tests.testing.test_testing_hf_client import repo_cache, run_client

pytest.importorskip("huggingface_hub")

SHA256 = hashlib.sha256(WEIGHTS).hexdigest()


@pytest.fixture
def env(hub: HfHubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process pointed at the stand-in (no token), caches in tmp; returns HF_HOME."""
    home = tmp_path / "hf"
    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGING_FACE")):
            monkeypatch.delenv(name)
    for name, value in hub.client_env(home).items():
        if name.startswith("HF_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("CKPTKIT_CACHE", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CKPTKIT_CONFIG", str(tmp_path / "config"))
    monkeypatch.setattr("ckptkit.hub.download.download.BACKOFF_BASE", 0.01)
    return home


def fetch_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code, out, err = run_main(capsys, "fetch", *args, "--json")
    assert code == 0, err
    [result] = json.loads(out)
    return result


def test_fetch_then_huggingface_hub_reads_it_offline_byte_identical(
        hub: HfHubStandIn, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = fetch_json(capsys, "hf:org/tiny")
    commit = hub.repo("org/tiny").branches["main"]
    snapshot = repo_cache(env) / "snapshots" / commit
    assert result["commit"] == commit and result["snapshot"] == str(snapshot)
    assert {f["path"]: (f["size"], f["sha256"]) for f in result["files"]} == {
        "config.json": (len(CONFIG), hashlib.sha256(CONFIG).hexdigest()),
        "docs/notes.txt": (len(NOTES), hashlib.sha256(NOTES).hexdigest()),
        "model.safetensors": (len(WEIGHTS), SHA256)}
    assert (repo_cache(env) / "refs" / "main").read_text() == commit
    got = run_client(hub, env, """
snapshot = hf.snapshot_download("org/tiny")
weights = hf.hf_hub_download("org/tiny", "model.safetensors")
import pathlib
out([snapshot, weights, pathlib.Path(weights).read_bytes().hex(),
     pathlib.Path(snapshot, "docs/notes.txt").read_text()])
""", offline=True)
    assert got == [str(snapshot), str(snapshot / "model.safetensors"), WEIGHTS.hex(),
                   NOTES.decode()]
    assert not hub.cdn_authorized()
    # Weights crossed the CDN once (plus the one byte of the engine's ranged probe), and
    # ckpt's staging holds nothing afterwards.
    route = hub.cdn_route("org/tiny", "model.safetensors")
    assert hub.cdn.bytes_sent(route) == len(WEIGHTS) + 1
    staging = env.parent / "ckpt" / "staging"
    assert not [p for p in staging.rglob("*") if p.is_file()]


def test_files_the_client_cached_are_reused(hub: HfHubStandIn, env: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_client(hub, env, 'out(hf.hf_hub_download("org/tiny", "model.safetensors"))')
    route = hub.cdn_route("org/tiny", "model.safetensors")
    before = hub.cdn.bytes_sent(route)
    result = fetch_json(capsys, "hf:org/tiny")
    sources = {f["path"]: f["source"] for f in result["files"]}
    assert sources == {"model.safetensors": "cache", "config.json": "hf",
                       "docs/notes.txt": "hf"}
    assert hub.cdn.bytes_sent(route) == before


def test_dry_run_lists_the_plan_and_bytes_and_downloads_nothing(
        hub: HfHubStandIn, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "fetch", "hf:org/tiny", "--dry-run", "--json",
                              "--include", "*.safetensors", "--include", "docs/")
    assert code == 0, err
    [plan] = json.loads(out)
    assert [f["path"] for f in plan["files"]] == ["docs/notes.txt", "model.safetensors"]
    assert plan["total_bytes"] == len(NOTES) + len(WEIGHTS)
    assert not hub.cdn.hits() and not (repo_cache(env)).exists()


def test_include_exclude_and_a_tag(hub: HfHubStandIn, env: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    hub.tag("org/tiny", "v1")
    hub.commit("org/tiny", {"config.json": b"{}\n"})
    result = fetch_json(capsys, "hf:org/tiny@v1", "--exclude", "*.safetensors")
    assert [f["path"] for f in result["files"]] == ["config.json", "docs/notes.txt"]
    assert result["commit"] == hub.repo("org/tiny").tags["v1"]
    snapshot = Path(result["snapshot"])
    assert (snapshot / "config.json").read_bytes() == CONFIG
    assert not (snapshot / "model.safetensors").exists()
    assert (repo_cache(env) / "refs" / "v1").read_text() == result["commit"]


def test_gated_repo_needs_a_token_in_one_line_and_works_with_it(
        hub: HfHubStandIn, env: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_main(capsys, "fetch", "hf:org/gated")
    assert code == 4 and out == ""
    assert err.count("\n") == 1 and "needs a Hugging Face token" in err and "HF_TOKEN" in err
    assert not (repo_cache(env, "org/gated") / "snapshots").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = run_main(capsys, "fetch", "hf:org/gated")
    assert code == 0, err
    assert (Path(out.strip()) / "model.safetensors").read_bytes() == WEIGHTS
    assert TOKEN not in out + err
    assert not hub.cdn_authorized()  # sent to the Hub endpoint only, not after the redirect
    assert any(r.header("Authorization") == f"Bearer {TOKEN}" for r in hub.hub.hits())


def test_stored_token_of_huggingface_hub_is_used(hub: HfHubStandIn, env: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    env.mkdir(parents=True, exist_ok=True)
    (env / "token").write_text(TOKEN)  # where `hf auth login` stores it (HF_HOME/token)
    code, out, err = run_main(capsys, "fetch", "hf:org/gated")
    assert code == 0, err and TOKEN not in out + err


def test_corrupted_lfs_object_exits_3_and_leaves_no_wrong_bytes(
        hub: HfHubStandIn, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.inject(Fault("corrupt", times=None, offset=1000), "org/tiny", "model.safetensors")
    code, out, err = run_main(capsys, "fetch", "hf:org/tiny")
    assert code == 3, err
    assert "sha256" in err and err.count("\n") == 1
    cache = repo_cache(env)
    assert not (cache / "snapshots").exists() and not (cache / "refs").exists()
    blobs = sorted(p.name for p in (cache / "blobs").iterdir())
    assert SHA256 not in blobs
    for blob in (cache / "blobs").iterdir():  # only the verified Git files are there
        assert blob.read_bytes() in (CONFIG, NOTES)
    staged = [p for p in (env.parent / "ckpt" / "staging").rglob("*") if p.is_file()]
    assert not staged  # the bad .part was deleted, not kept to resume from


def test_reset_mid_body_and_429_with_retry_after_are_survived(
        hub: HfHubStandIn, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.inject(Fault("status", status=429, retry_after="0"), "org/tiny", on="api")
    hub.inject(Fault("status", status=429, retry_after="0"), "org/tiny", "model.safetensors")
    hub.inject(Fault("reset", after=4096), "org/tiny", "model.safetensors")
    result = fetch_json(capsys, "hf:org/tiny")
    assert Path(result["snapshot"], "model.safetensors").read_bytes() == WEIGHTS
    statuses = [r.status for r in hub.cdn.hits(hub.cdn_route("org/tiny", "model.safetensors"))]
    assert 429 in statuses
    assert any(r.status == 429 for r in hub.hub.hits())


def test_offline_uses_only_the_hub_cache(hub: HfHubStandIn, env: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_main(capsys, "fetch", "hf:org/tiny", "--offline")
    assert code == 4 and "not in the Hub cache" in err
    run_client(hub, env, 'out(hf.snapshot_download("org/tiny"))')  # the client fetched it
    served = len(hub.hub.hits()) + len(hub.cdn.hits())
    result = fetch_json(capsys, "hf:org/tiny", "--offline")
    assert len(hub.hub.hits()) + len(hub.cdn.hits()) == served
    assert {f["path"]: f["sha256"] for f in result["files"]}["model.safetensors"] == SHA256


def test_cache_ls_and_verify_show_the_hub_snapshots(hub: HfHubStandIn, env: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    result = fetch_json(capsys, "hf:org/tiny")
    code, out, _err = run_main(capsys, "cache", "ls", "--json")
    assert code == 0
    [row] = [r for r in json.loads(out) if r["source"] == "hf"]
    assert row["path"] == result["snapshot"] and row["bytes"] == len(CONFIG + NOTES + WEIGHTS)
    code, out, _err = run_main(capsys, "cache", "verify")
    assert code == 0 and "hf:org/tiny" in out
    blob = repo_cache(env) / "blobs" / SHA256
    blob.write_bytes(b"x" * len(WEIGHTS))
    code, out, _err = run_main(capsys, "cache", "verify", "--json")
    assert code == 3
    assert {r["name"]: r["status"] for r in json.loads(out)}[
        "hf:org/tiny/model.safetensors"] == "CHANGED"
    # A later fetch notices the damaged blob and replaces it.
    fetch_json(capsys, "hf:org/tiny")
    assert blob.read_bytes() == WEIGHTS


# --- processes: kill -9 and concurrency ------------------------------------------------------

BIG = 4 << 20


def _ckpt(hub: HfHubStandIn, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**hub.client_env(tmp_path / "hf"), "PYTHONPATH": str(SRC),
           "CKPTKIT_CACHE": str(tmp_path / "ckpt"), "CKPTKIT_CONFIG": str(tmp_path / "config")}
    return subprocess.Popen([sys.executable, "-m", "ckptkit", "fetch", *args, "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def big_hub() -> HfHubStandIn:
    with HfHubStandIn(rate=2 << 20) as standin:  # 2 MiB/s per connection
        standin.add_repo("org/big", {f"shard-{i}.safetensors": os.urandom(BIG)
                                     for i in range(2)})
        yield standin


def test_kill_9_at_40_percent_then_rerun_moves_at_most_1_1x_the_repo(
        big_hub: HfHubStandIn, tmp_path: Path) -> None:
    total = 2 * BIG
    proc = _ckpt(big_hub, tmp_path, "hf:org/big")
    while big_hub.cdn.bytes_sent() < 0.4 * total:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = tmp_path / "hf" / "hub" / "models--org--big"
    assert not (cache / "snapshots").exists() and not (cache / "refs").exists()
    big_hub.rate = None
    rerun = _ckpt(big_hub, tmp_path, "hf:org/big")
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert big_hub.cdn.bytes_sent() <= 1.1 * total
    files = {p.name: p.read_bytes() for p in Path(out.strip()).iterdir()}
    repo = big_hub.repo("org/big")
    assert files == {p: f.source for p, f in repo.commits[repo.branches["main"]].files.items()}


def test_two_processes_download_each_file_once(big_hub: HfHubStandIn, tmp_path: Path) -> None:
    first, second = (_ckpt(big_hub, tmp_path, "hf:org/big") for _ in range(2))
    outputs = [p.communicate(timeout=120) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert big_hub.cdn.bytes_sent() <= 2 * BIG + 2  # each file once (+ its 1-byte probe)


# --- catalogue sources of type "hf" ----------------------------------------------------------

CATALOGUE = """
schema = 1

[files."team/tiny.safetensors"]
sources = [
  {{ type = "hf", repo = "{repo}", revision = "main", filename = "model.safetensors" }},
  {{ type = "url", url = "{fallback}" }},
]

[models.tiny]
files = ["team/tiny.safetensors"]
"""


def _catalogue(tmp_path: Path, repo: str, fallback: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(CATALOGUE.format(repo=repo, fallback=fallback))
    return path


def test_catalogue_hf_source_fills_both_caches(hub: HfHubStandIn, env: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    cat = _catalogue(tmp_path, "org/tiny", "http://127.0.0.1:9/nothing")
    code, out, err = run_main(capsys, "fetch", "tiny", "--catalog", str(cat), "--json")
    assert code == 0, err
    [item] = json.loads(out)
    assert item["source"] == "hf" and item["sha256"] == SHA256
    assert Path(item["path"]).read_bytes() == WEIGHTS
    got = run_client(hub, env, 'out(open(hf.hf_hub_download("org/tiny", "model.safetensors"), '
                               '"rb").read().hex())', offline=True)
    assert got == WEIGHTS.hex()
    # Offline, a fresh ckpt cache is filled from the Hugging Face cache alone.
    served = len(hub.cdn.hits())
    code, out, err = run_main(capsys, "fetch", "tiny", "--catalog", str(cat), "--offline",
                              "--cache-dir", str(tmp_path / "other"))
    assert code == 0, err and len(hub.cdn.hits()) == served


def test_catalogue_hf_source_falls_back_when_a_token_is_needed(
        hub: HfHubStandIn, env: Path, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    from ckptkit.testing.static import StaticServer

    hub.add_repo("org/closed", {"model.safetensors": WEIGHTS}, gated=True)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "w.safetensors").write_bytes(WEIGHTS)
    plain = StaticServer(tmp_path / "site")
    plain.start()
    try:
        cat = _catalogue(tmp_path, "org/closed", f"{plain.base}/w.safetensors")
        code, out, err = run_main(capsys, "fetch", "tiny", "--catalog", str(cat))
    finally:
        plain.stop()
    assert code == 0, err
    assert "hf:https://huggingface.co/org/closed/resolve/main/model.safetensors failed: " \
           "a token is needed" in err
    assert Path(out.strip()).read_bytes() == WEIGHTS


def test_builtin_loftr_comes_from_the_hub_first() -> None:
    from ckptkit.hub import catalogue

    cat = catalogue.load(())
    for file_id, name in (("loftr/outdoor_ds.ckpt", "loftr_outdoor.ckpt"),
                          ("loftr/indoor_ds.ckpt", "loftr_indoor.ckpt")):
        first = cat.files[file_id].sources[0]
        assert (first.type, first.repo, first.revision, first.filename) == (
            "hf", "kornia/loftr", "main", name)
        assert first.ref == f"https://huggingface.co/kornia/loftr/resolve/main/{name}"


def test_doctor_reports_the_hub_source(hub: HfHubStandIn, env: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/closed", {"model.safetensors": WEIGHTS}, gated=True)
    hub.grant(TOKEN, "org/closed")
    cat = _catalogue(tmp_path, "org/closed", "http://127.0.0.1:9/nothing")

    def hf_row(*args: str) -> dict:
        code, out, err = run_main(capsys, "doctor", "tiny", "--catalog", str(cat), "--json",
                                  *args)
        [model] = json.loads(out)["models"]
        [file] = model["files"]
        return next(s for s in file["sources"] if s["type"] == "hf")

    row = hf_row()
    assert row["reachable"]["status"] == "ok"
    assert row["authenticated"]["status"] == "fail" and "HF_TOKEN" in row["authenticated"]["detail"]
    assert row["cached"]["status"] == "absent"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = run_main(capsys, "fetch", "tiny", "--catalog", str(cat))
    assert code == 0, err
    row = hf_row()
    assert row["authenticated"] == {"status": "ok", "detail": "token from HF_TOKEN"}
    assert row["cached"]["status"] == "ok" and row["verified"]["status"] == "ok"
    assert not hub.cdn_authorized()
    # --mirror moves the Hub endpoint too: the probe goes to the rewritten URL.
    row = hf_row("--mirror", f"{hub.endpoint}=http://127.0.0.1:9")
    assert row["target"].startswith("http://127.0.0.1:9/") and row["reachable"]["status"] == "fail"
    row = hf_row("--offline")
    assert row["usable"] and row["reachable"]["status"] == "not_checked"


def test_mirror_rewrites_the_hub_endpoint_and_datasets_work(
        hub: HfHubStandIn, env: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("org/data", {"train.parquet": WEIGHTS, "README.md": NOTES},
                 repo_type="dataset")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # for the endpoint; a mirror elsewhere never gets it
    result = fetch_json(capsys, "hf:org/data", "--repo-type", "dataset", "--mirror",
                        f"https://hub.example.invalid={hub.endpoint}")
    assert result["repo_type"] == "dataset"
    snapshot = Path(result["snapshot"])
    assert snapshot.parent.parent.name == "datasets--org--data"
    assert (snapshot / "train.parquet").read_bytes() == WEIGHTS
    assert not [r for r in hub.hub.hits() if r.header("Authorization")]
    again = fetch_json(capsys, "hf:datasets/org/data", "--offline")
    assert again["commit"] == result["commit"]


def test_bad_names_and_flags_are_usage_errors(env: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["hf:org"], ["hf:org/a/b"], ["hf:org/tiny@"], ["hf:org/tiny", "loftr"],
                 ["loftr", "--include", "*.ckpt"]):
        code, out, err = run_main(capsys, "fetch", *args)
        assert code == 2 and out == "" and err.count("\n") == 1, (args, err)
