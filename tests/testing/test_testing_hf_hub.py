"""The Hugging Face Hub stand-in (ckptkit.testing.hf_hub) at the HTTP level: resolve and its
headers, the CDN redirect, revisions, the API's JSON, access control, faults, rate cap, counters
and the ``python -m`` entry point.  tests/testing/test_testing_hf_client.py runs the real client on it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ckptkit.testing.hf_hub import Fault, HfHubStandIn
from tests.conftest import SRC
from tests.hf_content import CONFIG, NOTES, TOKEN, WEIGHTS
from tests.testing.test_testing_hubs import get, serving_line, start_cli

SHA256 = hashlib.sha256(WEIGHTS).hexdigest()
POINTER = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{SHA256}\n"
           f"size {len(WEIGHTS)}\n").encode()


def git_blob_id(data: bytes) -> str:
    """The blob id real Git gives ``data``."""
    return subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True,
                          check=True).stdout.decode().strip()


def api(hub: HfHubStandIn, path: str, token: str | None = None) -> tuple[int, dict, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, head, body = get(f"{hub.endpoint}{path}", headers)
    return status, head, json.loads(body) if body else None


# --- resolve ------------------------------------------------------------------------------------

def test_git_file_resolves_with_its_blob_id_commit_and_ranges(hub: HfHubStandIn) -> None:
    url = f"{hub.endpoint}/org/tiny/resolve/main/config.json"
    commit = hub.repo("org/tiny").branches["main"]
    status, headers, body = get(url, method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["ETag"] == f'"{git_blob_id(CONFIG)}"'
    assert headers["X-Repo-Commit"] == commit
    assert headers["Content-Length"] == str(len(CONFIG))
    assert "X-Linked-Etag" not in headers and not any("xet" in h.lower() for h in headers)

    assert get(url)[2] == CONFIG
    status, headers, body = get(url, {"Range": "bytes=2-9", "If-Range": headers["ETag"]})
    assert (status, body, headers["Content-Range"]) == (206, CONFIG[2:10],
                                                        f"bytes 2-9/{len(CONFIG)}")
    assert get(url, {"Range": "bytes=2-9", "If-Range": '"stale"'})[:3:2] == (200, CONFIG)
    assert get(f"{hub.endpoint}/org/tiny/resolve/main/docs/notes.txt")[2] == NOTES


def test_lfs_file_redirects_to_the_cdn_with_linked_etag_and_size(hub: HfHubStandIn) -> None:
    commit = hub.repo("org/tiny").branches["main"]
    for method in ("HEAD", "GET"):
        status, headers, body = get(f"{hub.endpoint}/org/tiny/resolve/main/model.safetensors",
                                    method=method)
        assert status == 302
        assert headers["X-Linked-Etag"] == headers["ETag"] == f'"{SHA256}"'
        assert headers["X-Linked-Size"] == str(len(WEIGHTS))
        assert headers["X-Repo-Commit"] == commit
        assert headers["Location"].startswith(hub.cdn.base + "/")  # another port
        assert body == (b"" if method == "HEAD" else
                        f"Found. Redirecting to {headers['Location']}".encode())
    location = headers["Location"]
    status, cdn_headers, body = get(location)
    assert (status, body) == (200, WEIGHTS)
    assert 'filename="model.safetensors"' in cdn_headers["Content-Disposition"]
    status, _, body = get(location, {"Range": "bytes=-100"})
    assert (status, body) == (206, WEIGHTS[-100:])

    # The CDN trusts its signature, not tokens: a URL the Hub did not sign is refused.
    split = urllib.parse.urlsplit(location)
    forged = location.replace(split.query, urllib.parse.urlencode(
        {"path": "model.safetensors", "signature": "0" * 32}))
    assert get(forged)[0] == 403
    assert hub.cdn_route("org/tiny", "model.safetensors") == split.path


def test_lfs_pointer_blob_id_is_gits(hub: HfHubStandIn) -> None:
    _, _, info = api(hub, "/api/models/org/tiny/revision/main?blobs=true")
    weights = next(s for s in info["siblings"] if s["rfilename"] == "model.safetensors")
    assert weights == {"rfilename": "model.safetensors", "size": len(WEIGHTS),
                       "blobId": git_blob_id(POINTER),
                       "lfs": {"sha256": SHA256, "size": len(WEIGHTS),
                               "pointerSize": len(POINTER)}}


def test_missing_file_and_revision_answer_with_hub_error_codes(hub: HfHubStandIn) -> None:
    status, headers, _ = get(f"{hub.endpoint}/org/tiny/resolve/main/absent.bin", method="HEAD")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert headers["X-Repo-Commit"] == hub.repo("org/tiny").branches["main"]
    status, headers, _ = get(f"{hub.endpoint}/org/tiny/resolve/nope/config.json")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = get(f"{hub.endpoint}/org/absent/resolve/main/config.json")
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")


# --- revisions ----------------------------------------------------------------------------------

def test_branches_tags_and_commits_resolve_to_their_trees(hub: HfHubStandIn) -> None:
    first = hub.tag("org/tiny", "v1.0")
    second = hub.commit("org/tiny", {"config.json": b'{"v": 2}\n'}, delete=["docs/notes.txt"])
    dev = hub.commit("org/tiny", {"extra.txt": b"dev\n"}, branch="refs/pr/1")
    assert len({first, second, dev}) == 3 and all(len(s) == 40 for s in (first, second, dev))

    def resolve(rev: str, path: str) -> tuple[int, bytes, str | None]:
        status, headers, body = get(f"{hub.endpoint}/org/tiny/resolve/"
                                    f"{urllib.parse.quote(rev, safe='')}/{path}")
        return status, body, headers.get("X-Repo-Commit")

    assert resolve("main", "config.json") == (200, b'{"v": 2}\n', second)
    assert resolve("v1.0", "config.json") == (200, CONFIG, first)
    assert resolve(first, "config.json") == (200, CONFIG, first)
    assert resolve("refs/tags/v1.0", "docs/notes.txt") == (200, NOTES, first)
    assert resolve("main", "docs/notes.txt")[0] == 404
    assert resolve("refs/pr/1", "extra.txt") == (200, b"dev\n", dev)
    _, _, refs = api(hub, "/api/models/org/tiny/refs")
    assert {b["name"]: b["targetCommit"] for b in refs["branches"]} == {"main": second,
                                                                         "refs/pr/1": dev}
    assert refs["tags"] == [{"name": "v1.0", "ref": "refs/tags/v1.0", "targetCommit": first}]
    # Same history, same ids: commit ids are content-derived, not random.
    again = HfHubStandIn()
    try:
        again.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": WEIGHTS,
                                    "docs/notes.txt": NOTES})
        assert again.repo("org/tiny").branches["main"] == first
    finally:
        again.stop()


# --- API ----------------------------------------------------------------------------------------

def test_repo_info_lists_siblings_with_metadata_only_when_asked(hub: HfHubStandIn) -> None:
    status, _, info = api(hub, "/api/models/org/tiny")
    assert status == 200
    assert info["id"] == info["modelId"] == "org/tiny"
    assert info["sha"] == hub.repo("org/tiny").branches["main"]
    assert info["private"] is False and info["gated"] is False
    assert info["siblings"] == [{"rfilename": p} for p in
                                ("config.json", "docs/notes.txt", "model.safetensors")]
    _, _, blobs = api(hub, "/api/models/org/tiny/revision/main?blobs=true")
    config = blobs["siblings"][0]
    assert config == {"rfilename": "config.json", "size": len(CONFIG),
                      "blobId": git_blob_id(CONFIG)}


def test_tree_lists_folders_pages_and_expands(hub: HfHubStandIn) -> None:
    hub.commit("org/tiny", {"docs/a/b.txt": b"b\n"}, message="Add b")
    _, _, top = api(hub, "/api/models/org/tiny/tree/main")
    assert [(e["type"], e["path"]) for e in top] == [
        ("directory", "docs"), ("file", "config.json"), ("file", "model.safetensors")]
    weights = top[2]
    assert weights["lfs"] == {"oid": SHA256, "size": len(WEIGHTS), "pointerSize": len(POINTER)}
    assert weights["oid"] == git_blob_id(POINTER)
    _, _, docs = api(hub, f"/api/models/org/tiny/tree/main/{urllib.parse.quote('docs', '')}")
    assert [e["path"] for e in docs] == ["docs/a", "docs/notes.txt"]
    status, headers, _ = api(hub, "/api/models/org/tiny/tree/main/nowhere")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")

    hub.page_size = 2
    url = f"{hub.endpoint}/api/models/org/tiny/tree/main?recursive=true"
    paths = []
    while url:
        status, headers, body = get(url)
        paths += [e["path"] for e in json.loads(body)]
        link = headers.get("Link")
        url = link[1:link.index(">")] if link else ""
    assert paths == ["docs", "docs/a", "config.json", "docs/a/b.txt", "docs/notes.txt",
                     "model.safetensors"]
    _, _, expanded = api(hub, "/api/models/org/tiny/tree/main/docs?expand=true")
    titles = {e["path"]: e["lastCommit"]["title"] for e in expanded}
    assert titles == {"docs/a": "Add b", "docs/notes.txt": "Initial commit"}


def test_paths_info_answers_the_form_post(hub: HfHubStandIn) -> None:
    body = urllib.parse.urlencode([("paths", "model.safetensors"), ("paths", "docs"),
                                   ("paths", "absent"), ("expand", "false")]).encode()
    request = urllib.request.Request(f"{hub.endpoint}/api/models/org/tiny/paths-info/main",
                                     data=body, method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        entries = json.loads(resp.read())
    assert [(e["type"], e["path"]) for e in entries] == [("file", "model.safetensors"),
                                                         ("directory", "docs")]
    assert entries[0]["oid"] and entries[0]["lfs"]["oid"] == SHA256


def test_dataset_repos_have_their_own_routes(hub: HfHubStandIn) -> None:
    hub.add_repo("org/data", {"train.parquet": b"PAR1" + bytes(64) + b"PAR1",
                              "README.md": b"# data\n"}, repo_type="dataset")
    status, headers, body = get(f"{hub.endpoint}/datasets/org/data/resolve/main/README.md")
    assert (status, body) == (200, b"# data\n")
    status, headers, _ = get(f"{hub.endpoint}/datasets/org/data/resolve/main/train.parquet")
    assert status == 302 and "/repos/datasets/org/data/" in headers["Location"]
    assert api(hub, "/api/datasets/org/data")[2]["id"] == "org/data"
    assert api(hub, "/api/models/org/data")[0] == 401  # not a model


# --- access -------------------------------------------------------------------------------------

def test_gated_repo_lists_files_but_serves_them_only_to_a_granted_token(
        hub: HfHubStandIn) -> None:
    hub.grant("hf_other")  # valid, but not granted org/gated
    url = f"{hub.endpoint}/org/gated/resolve/main/config.json"
    status, headers, _ = get(url)
    assert (status, headers["X-Error-Code"]) == (401, "GatedRepo")
    status, headers, _ = get(url, {"Authorization": "Bearer hf_other"})
    assert (status, headers["X-Error-Code"]) == (403, "GatedRepo")
    assert get(url, {"Authorization": f"Bearer {TOKEN}"})[:3:2] == (200, CONFIG)
    assert api(hub, "/api/models/org/gated")[2]["gated"] == "manual"  # info is public
    status, headers, _ = get(url, {"Authorization": "Bearer hf_unknown"})
    assert (status, headers["X-Error-Message"]) == (401,
                                                    "Invalid credentials in Authorization header")


def test_private_repo_is_invisible_without_a_granted_token(hub: HfHubStandIn) -> None:
    hub.add_repo("org/secret", {"config.json": CONFIG}, private=True)
    hub.grant("hf_other")
    hub.grant("hf_secret", "org/secret")
    for path in ("/api/models/org/secret", "/org/secret/resolve/main/config.json"):
        assert api(hub, path)[0] == 401
        status, headers, _ = api(hub, path, token="hf_other")
        assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
        assert api(hub, path, token="hf_secret")[0] == 200


# --- faults, rate, counters ---------------------------------------------------------------------

def lfs_location(hub: HfHubStandIn, repo: str = "org/tiny",
                 path: str = "model.safetensors") -> str:
    return get(f"{hub.endpoint}/{repo}/resolve/main/{path}", method="HEAD")[1]["Location"]


def test_status_fault_answers_429_with_retry_after_then_recovers(hub: HfHubStandIn) -> None:
    hub.inject(Fault("status", status=429, retry_after="7", times=2), "org/tiny", on="api")
    for _ in range(2):
        status, headers, _ = get(f"{hub.endpoint}/api/models/org/tiny")
        assert (status, headers["Retry-After"]) == (429, "7")
    assert get(f"{hub.endpoint}/api/models/org/tiny")[0] == 200
    assert [r.status for r in hub.hub.hits("/api/models/org/tiny")] == [429, 429, 200]


def test_drop_and_reset_cut_the_body_after_the_given_bytes(hub: HfHubStandIn) -> None:
    location = lfs_location(hub)
    split = urllib.parse.urlsplit(location)
    for kind, expected in (("drop", b""), ("reset", None)):
        hub.inject(Fault(kind, after=1000), "org/tiny", "model.safetensors")
        with socket.create_connection(("127.0.0.1", hub.cdn.port), timeout=10) as sock:
            sock.sendall(f"GET {split.path}?{split.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
                ended = b""
            except ConnectionResetError:
                ended = None
        head, _, body = received.partition(b"\r\n\r\n")
        assert f"Content-Length: {len(WEIGHTS)}".encode() in head
        assert body == WEIGHTS[:1000] and ended == expected, kind
    assert [r.sent for r in hub.cdn.hits(split.path)] == [1000, 1000]
    assert get(location)[2] == WEIGHTS  # each fault fired once


def test_corrupt_object_serves_same_size_wrong_bytes_every_time(hub: HfHubStandIn) -> None:
    hub.inject(Fault("corrupt", offset=5000, times=None), "org/tiny", "model.safetensors")
    location = lfs_location(hub)
    for _ in range(2):
        body = get(location)[2]
        assert len(body) == len(WEIGHTS) and body != WEIGHTS
        assert [i for i in range(len(WEIGHTS)) if body[i] != WEIGHTS[i]] == [5000]
    assert get(location, {"Range": "bytes=0-99"})[2] == WEIGHTS[:100]  # span without it
    assert get(location, {"Range": "bytes=4990-5009"})[2] != WEIGHTS[4990:5010]
    # The Hub's own metadata still names the true object.
    assert get(f"{hub.endpoint}/org/tiny/resolve/main/model.safetensors",
               method="HEAD")[1]["X-Linked-Etag"] == f'"{SHA256}"'


def test_ignore_range_fault_answers_the_whole_file(hub: HfHubStandIn) -> None:
    hub.inject(Fault("ignore-range"), "org/tiny", "config.json", on="resolve")
    url = f"{hub.endpoint}/org/tiny/resolve/main/config.json"
    assert get(url, {"Range": "bytes=5-"})[:3:2] == (200, CONFIG)
    assert get(url, {"Range": "bytes=5-"})[:3:2] == (206, CONFIG[5:])


def test_counters_record_status_and_bytes_per_route(hub: HfHubStandIn) -> None:
    location = lfs_location(hub)
    get(location, {"Range": "bytes=0-999"})
    get(location)
    route = hub.cdn_route("org/tiny", "model.safetensors")
    assert [(r.method, r.status, r.sent) for r in hub.cdn.hits(route)] == [
        ("GET", 206, 1000), ("GET", 200, len(WEIGHTS))]
    assert hub.cdn.bytes_sent(route) == 1000 + len(WEIGHTS)
    resolve = hub.resolve_route("org/tiny", "model.safetensors")
    assert [(r.method, r.status) for r in hub.hub.hits(resolve)] == [("HEAD", 302)]
    assert hub.cdn_authorized() == []


def test_rate_cap_paces_each_connection(hub: HfHubStandIn) -> None:
    hub.rate = 256 << 10  # bytes per second, per connection
    location = lfs_location(hub)
    began = time.monotonic()
    status, _, body = get(location, {"Range": "bytes=0-32767"})
    elapsed = time.monotonic() - began
    assert (status, body) == (206, WEIGHTS[:32768])
    # A lower bound only: a loaded machine makes it slower, never faster.  The first write
    # (rate / 20 bytes) goes out unpaced.
    assert elapsed >= (32768 - (256 << 10) / 20) / (256 << 10)


# --- python -m ckptkit.testing.hf_hub -----------------------------------------------------------

def test_entry_point_serves_a_folder_of_repos_until_signalled(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    (root / "models" / "org" / "tiny" / "docs").mkdir(parents=True)
    (root / "models" / "org" / "tiny" / "config.json").write_bytes(CONFIG)
    (root / "models" / "org" / "tiny" / "model.safetensors").write_bytes(WEIGHTS)
    (root / "datasets" / "org" / "data").mkdir(parents=True)
    (root / "datasets" / "org" / "data" / "README.md").write_bytes(b"# d\n")
    proc = start_cli(str(root), "--gated", "org/tiny", "--token", TOKEN, "--rate", "64MiB",
                     module="ckptkit.testing.hf_hub")
    try:
        line = serving_line(proc)
        prefix = f"serving {root} on http://127.0.0.1:"
        assert line.startswith(prefix) and " (CDN http://127.0.0.1:" in line, line
        endpoint = line.split(" on ", 1)[1].split(" ", 1)[0]
        url = f"{endpoint}/org/tiny/resolve/main/model.safetensors"
        assert get(url)[0] == 401
        location = get(url, {"Authorization": f"Bearer {TOKEN}"})[1]["Location"]
        assert get(location)[2] == WEIGHTS
        assert get(f"{endpoint}/datasets/org/data/resolve/main/README.md")[2] == b"# d\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and err == ""


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a directory"),
    (["{root}", "--gated", "org/absent"], "is not a repo under"),
    (["{root}", "--rate", "fast"], "is not a rate"),
])
def test_entry_point_rejects_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "models" / "org" / "tiny").mkdir(parents=True)
    argv = [a.format(root=tmp_path, missing=tmp_path / "missing") for a in args]
    proc = subprocess.run([sys.executable, "-m", "ckptkit.testing.hf_hub", *argv],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr

