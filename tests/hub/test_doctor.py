"""`ckptkit.hub.doctor`: every check against real servers on 127.0.0.1 (a MirrorServer serving files,
TF Hub and the Kaggle API on one port; the test HTTP server for auth answers and slow hosts),
with caches filled by real fetches."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkit import config
from ckptkit.hub.diagnosis import Check, DoctorReport, FileReport
from ckptkit.hub.doctor import plan_doctor
from ckptkit.errors import ExitCode, UsageError
from ckptkit.hub.fetch import plan_fetch
from ckptkit.testing.hubs import KaggleStub, MirrorServer, tree_files
from tests.conftest import SRC
from tests.servers.http import Fault, HTTPTestServer

SAMPLES = SRC / "ckptkit" / "samples"
GCS = "https://storage.googleapis.com"
KAGGLE_HANDLE = "google/musiq/tensorFlow2/spaq/1"
STATUSES = {"ok", "fail", "absent", "not_checked", "not_applicable"}


@pytest.fixture
def mirror_root(tmp_path: Path) -> Path:
    """MUSIQ-SPAQ everywhere: the SavedModel on TF Hub and Kaggle, the npz on "GCS"."""
    root = tmp_path / "mirror"
    (root / "files" / "gresearch" / "musiq").mkdir(parents=True)
    shutil.copy(SAMPLES / "spaq_ckpt.npz", root / "files" / "gresearch" / "musiq")
    shutil.copytree(SAMPLES / "musiq_saved_model", root / "tfhub/google/musiq/spaq/1")
    shutil.copytree(SAMPLES / "musiq_saved_model", root / "kaggle" / KAGGLE_HANDLE)
    return root


@pytest.fixture
def mirror(mirror_root: Path) -> Iterator[MirrorServer]:
    with MirrorServer(mirror_root) as server:
        yield server


def rules(base: str) -> str:
    return (f"https://tfhub.dev={base}/tfhub,https://api.kaggle.com={base}/kaggle,"
            f"{GCS}={base}/files")


def doctor(names: list[str], *, timeout: float = 5.0, **settings: object) -> DoctorReport:
    conf = config.settings(**settings)  # type: ignore[arg-type]
    return plan_doctor(names, conf, timeout=timeout).execute()


def the_file(report: DoctorReport, file_id: str) -> FileReport:
    return next(f for m in report.models for f in m.files if f.id == file_id)


def source(file: FileReport, kind: str):
    return next(s for s in file.sources if s.type == kind)


def test_cached_and_reachable_everywhere_is_ok_without_downloading(
        mirror: MirrorServer) -> None:
    plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    mirror.requests.clear()

    report = doctor(["musiq-spaq"], mirror=rules(mirror.base))

    assert report.verdict == "ok" and report.exit_code == ExitCode.OK
    saved, npz = report.models[0].files
    assert saved.cache.verified.status == "ok" and saved.cache.verified.detail == "matches the pin"
    tfhub = source(saved, "tfhub")
    assert tfhub.reachable.status == "ok" and tfhub.http_status == 206
    assert tfhub.cached.detail == "TF Hub cache" and tfhub.verified.status == "ok"
    kaggle = source(saved, "kaggle")
    assert kaggle.reachable.status == "ok" and kaggle.authenticated.detail == "not needed"
    assert kaggle.cached.status == "absent"  # fetched from TF Hub, so kagglehub has nothing
    url = source(npz, "url")
    assert url.reachable.status == "ok" and url.announced_size == (
        SAMPLES / "spaq_ckpt.npz").stat().st_size
    # Probes only: one byte asked of every file, the Kaggle listing, no download RPC.
    gets = [r for r in mirror.requests if r.method == "GET"]
    assert gets and all(r.headers.get("Range") == "bytes=0-0" for r in gets)
    rpcs = [r.path.rsplit("/", 1)[-1] for r in mirror.requests if r.method == "POST"]
    assert rpcs == ["ListModelInstanceVersionFiles"]


def test_a_server_that_is_down_is_unreachable_at_once(mirror: MirrorServer) -> None:
    base = mirror.base
    mirror.stop()  # connections are refused
    report = doctor(["musiq-spaq"], mirror=rules(base), timeout=600)
    saved = the_file(report, "musiq/spaq/saved_model")
    for row in saved.sources:  # refused at once: a wait would end "timed out after 600 s"
        assert row.reachable.status == "fail" and row.reachable.detail == "connection refused"
        assert row.authenticated.status == "not_checked"
    assert report.verdict == "unavailable" and report.exit_code == ExitCode.NOT_FOUND
    assert "not cached and no working source" in report.models[0].summary


def test_one_source_down_with_another_up_is_degraded(mirror: MirrorServer) -> None:
    mirror.down.add("/tfhub")  # 503
    report = doctor(["musiq-spaq"], mirror=rules(mirror.base))
    saved = the_file(report, "musiq/spaq/saved_model")
    assert source(saved, "tfhub").reachable == Check("fail", "HTTP 503")
    assert source(saved, "kaggle").usable and saved.available
    assert report.verdict == "degraded" and report.exit_code == ExitCode.ERROR


def test_a_connection_closed_without_answer_is_unreachable(mirror_root: Path) -> None:
    with MirrorServer(mirror_root, down=["/files"], down_mode="close") as server:
        report = doctor(["musiq-spaq"], mirror=rules(server.base))
    url = source(the_file(report, "musiq/spaq_ckpt.npz"), "url")
    assert url.reachable.status == "fail" and url.http_status is None


def write_catalogue(tmp_path: Path, sources: str, name: str = "probe-me") -> Path:
    path = tmp_path / "extra.toml"
    path.write_text(f'schema = 1\n[files."x/weights.bin"]\nsources = [{sources}]\n'
                    f'[models.{name}]\nfiles = ["x/weights.bin"]\n')
    return path


def test_401_means_not_authenticated(http_server: HTTPTestServer, tmp_path: Path) -> None:
    http_server.add("/weights.bin", b"w" * 100, faults=[Fault("status", status=401, times=None)])
    url = http_server.url("/weights.bin")
    cat = write_catalogue(tmp_path, f'{{ type = "url", url = "{url}" }}')
    report = doctor(["probe-me"], catalogs=(cat,))
    row = the_file(report, "x/weights.bin").sources[0]
    assert row.reachable.status == "ok" and row.http_status == 401
    assert row.authenticated.status == "fail" and row.authenticated.detail == "HTTP 401"
    assert not row.usable and report.exit_code == ExitCode.NOT_FOUND


def kaggle_only(stub: KaggleStub) -> str:
    """The Kaggle API on ``stub``; TF Hub and GCS on paths it answers 404 for."""
    return (f"https://api.kaggle.com={stub.base},https://tfhub.dev={stub.base}/none,"
            f"{GCS}={stub.base}/none")


def test_kaggle_403_names_the_credentials_sent(
        kaggle_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cret")
    stub = KaggleStub()
    stub.add_model(KAGGLE_HANDLE, tree_files(SAMPLES / "musiq_saved_model"))
    stub.forbidden = True
    with stub:
        report = doctor(["musiq-spaq"], mirror=kaggle_only(stub))
        sent = [r.headers.get("Authorization") for r in stub.requests if r.method == "POST"]
    kaggle = source(the_file(report, "musiq/spaq/saved_model"), "kaggle")
    assert kaggle.authenticated == Check(
        "fail", "HTTP 403, credentials from KAGGLE_USERNAME/KAGGLE_KEY")
    assert sent and sent[0].startswith("Basic ")
    assert "s3cret" not in json.dumps(report.to_dict())


def test_kaggle_token_is_sent_and_accepted(kaggle_env: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok-123")
    stub = KaggleStub()
    stub.add_model(KAGGLE_HANDLE, tree_files(SAMPLES / "musiq_saved_model"))
    with stub:
        report = doctor(["musiq-spaq"], mirror=kaggle_only(stub))
        (path, body), = stub.rpc_bodies("ListModelInstanceVersionFiles")
        sent = [r.headers.get("Authorization") for r in stub.requests if r.method == "POST"]
    assert path == "/v1/models.ModelApiService/ListModelInstanceVersionFiles"
    assert body["framework"] == "MODEL_FRAMEWORK_TENSOR_FLOW_2" and body["versionNumber"] == 1
    assert sent == ["Bearer tok-123"]
    kaggle = source(the_file(report, "musiq/spaq/saved_model"), "kaggle")
    assert kaggle.authenticated == Check(
        "ok", "credentials from KAGGLE_API_TOKEN")


def test_a_cached_file_modified_since_fails_verification(mirror: MirrorServer) -> None:
    fetched = plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    npz = Path(next(f.path for f in fetched if f.name == "musiq/spaq_ckpt.npz"))
    with open(npz, "r+b") as fh:  # same size, one byte flipped
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))

    report = doctor(["musiq-spaq"], mirror=rules(mirror.base))

    cache = the_file(report, "musiq/spaq_ckpt.npz").cache
    assert cache.cached.status == "ok"
    assert cache.verified == Check("fail", "sha256 differs from the pin")
    assert report.verdict == "damaged" and report.exit_code == ExitCode.INTEGRITY
    assert "ckpt cache rm musiq-spaq --yes" in report.models[0].summary


def test_a_tf_hub_cache_entry_damaged_since_fails_verification(mirror: MirrorServer) -> None:
    plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    report = doctor(["musiq-spaq"], mirror=rules(mirror.base))
    module_dir = Path(source(the_file(report, "musiq/spaq/saved_model"), "tfhub").copy)
    (module_dir / "extra.txt").write_text("a temp cleaner or a user left this\n")

    report = doctor(["musiq-spaq"], mirror=rules(mirror.base))

    saved = the_file(report, "musiq/spaq/saved_model")
    assert saved.cache.verified.status == "ok"
    assert source(saved, "tfhub").verified.status == "fail"
    assert report.exit_code == ExitCode.INTEGRITY


def test_a_cached_file_gone_is_reported(mirror: MirrorServer) -> None:
    fetched = plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    Path(next(f.path for f in fetched if f.name == "musiq/spaq_ckpt.npz")).unlink()
    report = doctor(["musiq-spaq"], mirror=rules(mirror.base))
    cache = the_file(report, "musiq/spaq_ckpt.npz").cache
    assert cache.cached == Check("fail", "recorded, but the file is gone")
    assert report.exit_code == ExitCode.INTEGRITY


def test_offline_sends_nothing_and_says_so(mirror: MirrorServer) -> None:
    plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    mirror.requests.clear()

    report = doctor(["musiq-spaq", "musiq-ava"], mirror=rules(mirror.base), offline=True)

    assert mirror.requests == [] and report.requests == 0 and report.offline
    spaq = {f.id: f for f in report.models[0].files}
    for row in spaq["musiq/spaq/saved_model"].sources:
        assert row.reachable == Check("not_checked", "offline")
    assert spaq["musiq/spaq_ckpt.npz"].cache.verified.status == "ok"
    assert [m.verdict for m in report.models] == ["ok", "unavailable"]
    assert "no local copy (offline)" in report.models[1].summary
    assert report.exit_code == ExitCode.NOT_FOUND


def test_offline_from_the_environment(mirror: MirrorServer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTKIT_OFFLINE", "1")
    report = doctor(["musiq-spaq"], mirror=rules(mirror.base))
    assert mirror.requests == [] and report.offline


def test_local_dir_copies_are_found_and_verified(mirror: MirrorServer, tmp_path: Path) -> None:
    fetched = plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    npz = Path(next(f.path for f in fetched if f.name == "musiq/spaq_ckpt.npz"))
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    shutil.copy(npz, good / "spaq_ckpt.npz")
    (bad / "spaq_ckpt.npz").write_bytes(b"not the checkpoint")

    ok = doctor(["musiq-spaq"], local_dirs=(good,), offline=True)
    local = source(the_file(ok, "musiq/spaq_ckpt.npz"), "local")
    assert local.usable and local.verified.status == "ok" and local.copy == str(
        good / "spaq_ckpt.npz")

    damaged = doctor(["musiq-spaq"], local_dirs=(bad,), offline=True)
    local = source(the_file(damaged, "musiq/spaq_ckpt.npz"), "local")
    assert local.verified.status == "fail" and not local.usable
    assert damaged.exit_code == ExitCode.INTEGRITY


def test_without_a_hash_to_compare_a_copy_is_not_verified_and_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 10)
    cat = write_catalogue(tmp_path, f'{{ type = "local", path = "{folder / "weights.bin"}" }}')
    report = doctor(["probe-me"], catalogs=(cat,))
    row = the_file(report, "x/weights.bin").sources[0]
    assert row.cached.status == "ok" and row.size == 10
    assert row.verified == Check(
        "not_checked", "no catalogue sha256 or pin to compare with")
    assert row.reachable.status == "not_applicable" and report.exit_code == ExitCode.OK


def test_probes_run_in_parallel_and_time_out(http_server: HTTPTestServer,
                                             tmp_path: Path) -> None:
    entries = []
    for i in range(4):
        # Each answers only once all five probes are in flight: sent one after the other,
        # they would wait the 60 s out and fail the 3 s timeout.
        http_server.add(f"/slow{i}.bin", b"s" * 10,
                        faults=[Fault("delay", seconds=60, concurrent=5, times=None)])
        entries.append(f'[files."x/slow{i}.bin"]\nsources = [{{ type = "url", '
                       f'url = "{http_server.url(f"/slow{i}.bin")}" }}]\n')
    # Never answers (until the test ends): only the timeout ends its probe.
    http_server.add("/stuck.bin", b"s", faults=[Fault("delay", seconds=None, times=None)])
    entries.append(f'[files."x/stuck.bin"]\nsources = [{{ type = "url", '
                   f'url = "{http_server.url("/stuck.bin")}" }}]\n')
    cat = tmp_path / "slow.toml"
    ids = ", ".join(f'"x/slow{i}.bin"' for i in range(4))
    cat.write_text("schema = 1\n" + "".join(entries)
                   + f'[models.slow]\nfiles = [{ids}]\n[models.stuck]\nfiles = ["x/stuck.bin"]\n')

    report = doctor(["slow", "stuck"], catalogs=(cat,), timeout=3)

    assert http_server.peak_in_flight == 5
    assert report.models[0].verdict == "ok"
    stuck = the_file(report, "x/stuck.bin").sources[0]
    assert stuck.reachable == Check("fail", "timed out after 3 s")


def test_kaggle_cache_filled_by_a_fetch_counts(mirror: MirrorServer, kaggle_env: Path) -> None:
    no_tfhub = rules(mirror.base).replace("/tfhub,", "/gone,")  # 404: not retried
    plan_fetch(["musiq-spaq"], config.settings(mirror=no_tfhub)).execute()
    mirror.stop()  # the API is gone, but kagglehub would reuse its cache

    report = doctor(["musiq-spaq"], mirror=no_tfhub)

    kaggle = source(the_file(report, "musiq/spaq/saved_model"), "kaggle")
    assert kaggle.reachable.status == "fail" and kaggle.cached.detail == "kagglehub cache"
    assert kaggle.verified.status == "ok" and kaggle.usable
    assert kaggle.copy == str(kaggle_env / "models" / KAGGLE_HANDLE)


def test_lock_json_credentials_and_each_copy_are_read_once(
        mirror: MirrorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptkit.hub import credentials, pins
    from ckptkit.storage import hashing

    plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    reads: list[Path] = []
    lookups: list[object] = []
    walks: list[Path] = []
    read, find, walk = pins.Pins._read, credentials.find_kaggle_credentials, hashing.tree_files
    monkeypatch.setattr(pins.Pins, "_read", lambda self: reads.append(self.path) or read(self))
    monkeypatch.setattr(credentials, "find_kaggle_credentials",
                        lambda *a, **k: lookups.append(a) or find(*a, **k))
    monkeypatch.setattr(hashing, "tree_files", lambda root: walks.append(root) or walk(root))

    report = doctor(["musiq-spaq"], mirror=rules(mirror.base), offline=True)

    tfhub = source(the_file(report, "musiq/spaq/saved_model"), "tfhub")
    assert tfhub.verified.status == "ok" and tfhub.size == sum(
        p.stat().st_size for p in walk(Path(tfhub.copy or "")))
    # Shared by the checks and the environment report; the copy is sized while it is hashed.
    assert len(reads) == 1 and len(lookups) == 1 and report.environment.pins == 2
    assert walks.count(Path(tfhub.copy or "")) == 1


def test_unknown_names_and_bad_timeouts_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="no model named 'musiq-spaqq'.*Did you mean musiq-spaq"):
        plan_doctor(["musiq-spaqq"], config.settings())
    with pytest.raises(UsageError, match="timeout"):
        plan_doctor(["musiq-spaq"], config.settings(), timeout=0)


def test_every_model_is_checked_when_none_is_named() -> None:
    plan = plan_doctor([], config.settings(offline=True))
    names = [name for name, _ in plan.models]
    assert names == sorted(names) and "musiq-spaq" in names and "jukebox-5b" in names
    # Files shared by the Jukebox bundles are checked once.
    ids = [f.spec.id for f in plan.files]
    assert len(ids) == len(set(ids)) and plan.probes == ()


def test_json_document_follows_the_schema(mirror: MirrorServer) -> None:
    plan_fetch(["musiq-spaq"], config.settings(mirror=rules(mirror.base))).execute()
    data = json.loads(json.dumps(doctor(["musiq-spaq"], mirror=rules(mirror.base)).to_dict()))
    assert set(data) == {"schema", "verdict", "exit_code", "offline", "timeout", "requests",
                         "environment", "models"}
    assert data["schema"] == 1 and data["exit_code"] == 0
    assert {"ckptkit", "python", "extras", "cache", "pins", "variables",
            "kaggle_credentials"} <= set(data["environment"])
    model, = data["models"]
    assert set(model) == {"name", "verdict", "summary", "files"}
    for file in model["files"]:
        assert set(file) == {"id", "kind", "expected_sha256", "hash_from", "available",
                             "damaged", "cache", "sources"}
        for row in [file["cache"], *file["sources"]]:
            for check in ("reachable", "authenticated", "cached", "verified"):
                assert row[check]["status"] in STATUSES and row[check]["detail"] is not None
