"""ckptkit end to end without network: the steps of ``scripts/demo``, and the transcript the
README and docs show.

    python scripts/lib/demo.py --ckpt PATH [--keep DIR] [--write-docs]

``scripts/demo`` runs this in a light virtualenv (core install and huggingface_hub: no torch,
TensorFlow or JAX) with ``--ckpt`` naming its ``ckpt``.  A machine with internet is played by
the bundled samples
(its cache is filled from them with ``--local-dir``); it exports a mirror (``ckpt mirror
export``), serves it (``ckpt mirror serve``), and everything after fetches from that mirror:
nothing leaves the machine.

Each shown step prints ``$ <command>`` and its output.  The transcript (paths shortened as the
docs show them) is written to ``transcript.md`` in the work directory, kept with ``--keep DIR``.
Blocks of README.md and docs/*.md marked ``<!-- demo: STEP -->`` are that transcript:
``--write-docs`` rewrites them, and tests/test_demo_docs.py runs the same steps in-process (no
interpreter per step) and fails when a block no longer matches what the commands print.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "src" / "ckptkit" / "samples"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"(<!-- demo: ([\w-]+) -->\n```console\n)(.*?)(```)", re.S)
#: The only variables a step inherits: the demo must not depend on the shell it runs in
#: (CKPTKIT_*, proxies, certificates), and the doctor's report must not show it.
INHERITED = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TEMP",
             "TMP", "SYSTEMROOT")
#: What differs between two honest runs (timings, dates, the machine, installed extras): left
#: out when a docs block is compared with a fresh run, kept as recorded in the docs.
VOLATILE = [(re.compile(p, re.M), r) for p, r in (
    (r"\b\d+ ms\b", "N ms"), (r"\d{4}-\d\d-\d\d \d\d:\d\d", "DATE"),
    (r"^ckptkit \S+  Python .*$", "VERSIONS"), (r"^extras .*$", "EXTRAS"),
    (r"[\d.]+ [KMGT]?B free", "N free"), (r"^cache     .*$", "CACHE"),
    # where a kill -9 lands: how much a resumed fetch still had to transfer
    (r"[\d.]+ [KMGT]?B (transferred|resumed)", r"N \1"))]


class Demo:
    """Runs the steps; ``ckpt`` is the command to run (None: in this process, for tests)."""

    def __init__(self, work: Path, ckpt: list[str] | None, echo: bool = True) -> None:
        self.work, self.ckpt, self.echo = work, ckpt, echo
        self.transcript: dict[str, str] = {}
        self.env = {"CKPTKIT_CACHE": str(work / "cache"), "CKPTKIT_CONFIG": str(work / "config"),
                    "TFHUB_CACHE_DIR": str(work / "tfhub"),
                    "KAGGLEHUB_CACHE": str(work / "kagglehub"), "HOME": str(work / "home"),
                    "KAGGLE_CONFIG_DIR": str(work / "home" / ".kaggle"), "NO_COLOR": "1"}
        self.server: subprocess.Popen[str] | None = None
        tty = echo and sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.bold, self.plain = ("\033[1m", "\033[0m") if tty else ("", "")

    # -- output ---------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self._print(f"\n{self.bold}# {text}{self.plain}")

    def _print(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def shorten(self, text: str) -> str:
        """Paths and ports as the docs show them (see README: "paths shortened")."""
        for work in {str(self.work.resolve()), str(self.work)}:
            text = text.replace(f"{work}/cache", "~/.cache/ckptkit")
            text = text.replace(Path(work).as_uri(), "file:///home/me/ckpt-demo")
            text = text.replace(work, "~/ckpt-demo")
        text = text.replace(f"{ROOT}/", "")
        return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:8000", text)

    def record(self, key: str | None, shown: str, output: str) -> None:
        if key is not None:
            self.transcript[key] = self.shorten(f"$ {shown}\n{output}")

    # -- steps ----------------------------------------------------------------------------

    def run(self, key: str | None, *args: str, ok: tuple[int, ...] = (0,),
            shown: str | None = None, env: dict[str, str] | None = None) -> str:
        """``ckpt ARGS`` in the work directory; returns its output (stdout and stderr, in the
        order printed)."""
        shown = shown or "ckpt " + shlex.join(args)
        self._print(f"{self.bold}$ {self.shorten(shown)}{self.plain}")
        code, output = (self._in_process(args, env) if self.ckpt is None
                        else self._subprocess(args, env))
        if code not in ok:
            raise SystemExit(f"demo: `{shown}` exited {code}, expected {ok}:\n{output}")
        self.record(key, shown, output)
        return output

    def _subprocess(self, args: tuple[str, ...], env: dict[str, str] | None) -> tuple[int, str]:
        assert self.ckpt is not None
        proc = subprocess.Popen([*self.ckpt, *args], cwd=self.work, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**self.environment(env), "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if self.echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        return proc.wait(), "".join(lines)

    def _in_process(self, args: tuple[str, ...], env: dict[str, str] | None) -> tuple[int, str]:
        from ckptkit.cli.main import main

        out = io.StringIO()
        with self._environment(env), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(out):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
        self._print(out.getvalue().rstrip("\n"))
        return code, out.getvalue()

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The whole environment of a step (see INHERITED)."""
        kept = {name: os.environ[name] for name in INHERITED if name in os.environ}
        return {**kept, **self.env, **(extra or {})}

    @contextlib.contextmanager
    def _environment(self, extra: dict[str, str] | None) -> Iterator[None]:
        saved, cwd = dict(os.environ), os.getcwd()
        try:  # imported under the outer environment, so that it can be put back
            from huggingface_hub import constants
        except ImportError:
            constants = None
        kept = dict(vars(constants)) if constants is not None else {}
        os.environ.clear()
        os.environ.update(self.environment(extra))
        os.chdir(self.work)
        try:
            if constants is not None:  # read once, at import: as a ckpt process would read it
                from ckptkit.testing.hf_hub import client_constants_now

                vars(constants).update(client_constants_now())
            yield
        finally:
            if constants is not None:
                vars(constants).update({k: v for k, v in kept.items() if k.isupper()})
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved)

    def shell(self, key: str | None, shown: str, action: Callable[[], str | None]) -> None:
        """A step done here (a mirror host removed, a folder listed), shown as its shell
        command; ``action`` returns what the command would print."""
        self._print(f"{self.bold}$ {shown}{self.plain}")
        output = action() or ""
        if output:
            self._print(output.rstrip("\n"))
        self.record(key, shown, output)

    def serve(self, key: str, directory: str) -> str:
        """``ckpt mirror serve DIRECTORY --port 0 &``; returns the --mirror value it prints."""
        args = ("mirror", "serve", directory, "--port", "0")
        command = [*(self.ckpt or [sys.executable, "-m", "ckptkit"]), *args]
        self.server = subprocess.Popen(command, cwd=self.work, text=True, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE,
                                       env={**self.environment(), "PYTHONUNBUFFERED": "1"})
        assert self.server.stdout is not None and self.server.stderr is not None
        value = self.server.stdout.readline()
        if not value:
            raise SystemExit(f"demo: ckpt mirror serve failed:\n{self.server.stderr.read()}")
        said = self.server.stderr.readline()
        shown = "ckpt " + shlex.join(args) + " &"
        self._print(f"{self.bold}$ {shown}{self.plain}\n{said}{value}".rstrip("\n"))
        self.record(key, shown, said + value)
        return value.strip()

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.communicate()


def steps(demo: Demo) -> None:
    """The demo: a site mirror, fetching from it, conversion, a training run, scan, doctor, and
    a Hugging Face Hub repo."""
    work, samples = demo.work, str(SAMPLES)
    origin = work / "origin"
    demo.say("On a machine with internet: fetch models into its cache, export them as a "
             "static mirror (the bundled samples in origin/ stand in for the hubs here)")
    _origin(origin)
    demo.run("site-fetch", "fetch", "musiq-spaq", "jukebox-1b_lyrics", "loftr", "--offline",
             "--local-dir", "origin", "--cache-dir", "site-cache", "--quiet")
    demo.run("mirror-export", "mirror", "export", "mirror", "--cache-dir", "site-cache")
    demo.say("As on today's internet, tfhub.dev and the Azure CDN are gone: drop them from "
             "the mirror so that fetches fall back to the next source")
    demo.shell("mirror-retire", "rm -r mirror/tfhub.dev mirror/openaipublic.azureedge.net",
               lambda: _remove(work / "mirror", "tfhub.dev", "openaipublic.azureedge.net"))
    demo.say("Serve it (any web server would do); this machine fetches through it from now on")
    demo.env["CKPTKIT_MIRROR"] = demo.serve("mirror-serve", "mirror")

    demo.say("The catalogue, and what fetching MUSIQ-SPAQ involves")
    demo.run("list", "list")
    demo.run("fetch-plan", "fetch", "musiq-spaq", "--dry-run")
    demo.say("Fetch it: TF Hub fails, Kaggle serves the SavedModel (its archive, no kagglehub "
             "needed); the npz comes from GCS")
    demo.run("fetch", "fetch", "musiq-spaq")
    demo.run("inspect-name", "inspect", "musiq-spaq/saved_model")
    demo.say("No server needed either: the same tree through file:// URLs (a share, a USB disk)")
    demo.run("fetch-file", "fetch", "loftr", "--mirror", _quiet(demo, "mirror", "rules", "mirror"),
             shown='ckpt fetch loftr --mirror "$(ckpt mirror rules mirror)"')

    demo.say("A Jukebox bundle: the CDN is gone, the storage account serves; placed where "
             "Jukebox looks")
    demo.run("fetch-dest", "fetch", "jukebox-1b_lyrics", "--dest", "jukebox-models")
    demo.say("The 5b VQ-VAE and upsamplers are shared: fetching jukebox-5b needs only its top "
             "prior")
    demo.run("fetch-shared", "fetch", "jukebox-5b", "--dry-run")
    demo.run("cache-ls", "cache", "ls")
    demo.run("inspect-prior", "inspect", "jukebox-1b_lyrics/prior_level_2.pth.tar", "--depth", "1")

    demo.say("Convert without torch: a training checkpoint to safetensors, a ReDimNet epoch to "
             "Flax")
    demo.run("convert-safetensors", "convert", f"{samples}/thinker_step_200.pt", "--to",
             "safetensors")
    demo.run("convert-redimnet", "convert", f"{samples}/redimnet_epoch_3.pt", "--to", "flax")
    demo.say("LoFTR by name: the built-in recipe gives IFViT's Flax layout")
    demo.run("convert-loftr", "convert", "loftr", "--to", "flax")

    demo.say("A training run: keep the newest checkpoint (the newest is truncated, so the last "
             "good one stays too)")
    _training_run(work / "checkpoints" / "thinker_tiny")
    run = "checkpoints/thinker_tiny"
    demo.run("cleanup-plan", "cleanup", run, "--keep-last", "1", "--dry-run")
    demo.run("cleanup", "cleanup", run, "--keep-last", "1", "--yes")
    demo.run("latest", "latest", run)
    demo.say("Strip training state for deployment, check nothing changed, pick what to ship")
    demo.run("strip", "strip", f"{run}/thinker_best.pt", "-o", "thinker_infer.pt")
    demo.run("diff", "diff", f"{samples}/thinker_step_200.pt", "thinker_step_200.safetensors")
    demo.run("compare", "compare", f"{run}/thinker_best.pt", "thinker_step_200.safetensors",
             "thinker_infer.pt")

    demo.say("Scan downloads before loading them: a pickle that would run a shell command is "
             "flagged, and nothing runs")
    _downloads(work)
    demo.run("scan", "scan", "downloads", ok=(5,))
    if (work / "downloads" / "PWNED").exists():
        raise SystemExit("demo: the payload ran")
    demo._print("demo: the payload never ran (no PWNED file); ckpt scan exits 5 on unsafe files")

    demo.say("Doctor: every source of a model checked (reachable, authenticated, cached, "
             "verified) without downloading; exit 1 = degraded (TF Hub is gone here)")
    # A generous --timeout: the answer must not depend on how loaded the machine is.
    demo.run("doctor", "doctor", "musiq-spaq", "--timeout", "60", ok=(1,))

    demo.say("A training step saved by a 2-rank FSDP2 job with torch.distributed.checkpoint: "
             "one checkpoint, each tensor in two chunks, read without torch")
    demo.run("inspect-dcp", "inspect", f"{samples}/fsdp_step_200", "--filter", "model.*")
    demo.run("verify-dcp", "verify", f"{samples}/fsdp_step_200")
    demo.say("A copy whose rank-1 file was cut short: verify names each chunk it lost (exit 3)")
    demo.shell("dcp-truncate", f"cp -r {samples}/fsdp_step_200 step_200 && truncate -s 70000 "
               "step_200/__1_0.distcp", lambda: _truncated_copy(
                   SAMPLES / "fsdp_step_200", work / "step_200", "__1_0.distcp", 70000))
    demo.run("verify-dcp-broken", "verify", "step_200", ok=(3,))
    demo.say("Consolidated into one safetensors file, one global tensor at a time (still no "
             "torch); diff then finds every tensor of the step unchanged in it")
    demo.run("convert-dcp", "convert", f"{samples}/fsdp_step_200", "--to", "safetensors", "-o",
             "step_200.safetensors")
    demo.run("diff-dcp", "diff", f"{samples}/fsdp_step_200", "step_200.safetensors")
    demo.run("inspect-hf-sharded", "inspect", f"{samples}/hf_sharded", "--tensors")

    demo.say("Inspect any format without its framework")
    demo.run("inspect", "inspect", f"{samples}/thinker_step_200.pt")
    for name, extra in (("redimnet_epoch_3.pt", ("--depth", "1")),
                        ("spaq_ckpt.npz", ("--depth", "3")),
                        ("tf_ckpt/ckpt-1.index", ("--depth", "2")),
                        ("encoder_scripted.pt", ("--depth", "1")),
                        ("model.safetensors", ("--filter", "encoder.*")),
                        ("flax_params.msgpack", ("--depth", "2")),
                        ("probe_head.joblib", ()), ("embeddings.npy", ())):
        demo.run(None, "inspect", f"{samples}/{name}", *extra)
    demo.say("And the formats passed around besides checkpoints: a GGUF for llama.cpp (its "
             "chat template escaped), an ONNX model with external weights, a Keras archive")
    demo.run("inspect-gguf", "inspect", f"{samples}/tiny_llama.gguf")
    demo.run("inspect-onnx", "inspect", f"{samples}/onnx_mlp/mlp.onnx")
    # Not shown in the docs: without h5py (the core install) the weights are not listed.
    demo.run(None, "inspect", f"{samples}/keras_mlp.keras")
    # A JAX project's params.pkl: a plain pickle, read without unpickling it.
    demo.run("inspect-params-pkl", "inspect", f"{samples}/params.pkl", "--depth", "3")
    _hugging_face(demo)

    demo.say("What the demo wrote (kept with --keep DIR; transcript.md is written last)")
    demo.shell("kept", "ls -1 ~/ckpt-demo", lambda: "".join(
        f"{name}\n" for name in sorted({p.name for p in work.iterdir()} | {"transcript.md"})))


def _hugging_face(demo: Demo) -> None:
    """The Hugging Face Hub steps (scripts/lib/demo_hf.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ckptkit_demo_hf",
                                                  Path(__file__).with_name("demo_hf.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.steps(demo, SAMPLES)


def _truncated_copy(source: Path, target: Path, name: str, size: int) -> None:
    shutil.copytree(source, target)
    with open(target / name, "r+b") as fh:
        fh.truncate(size)


def _remove(folder: Path, *names: str) -> None:
    for name in names:
        shutil.rmtree(folder / name)


def _quiet(demo: Demo, *args: str) -> str:
    """What ``ckpt ARGS`` prints, run without being shown (a ``$(...)`` of a shown command)."""
    echo, demo.echo = demo.echo, False
    try:
        return demo.run(None, *args).strip()
    finally:
        demo.echo = echo


def _origin(origin: Path) -> None:
    """What the hubs serve, laid out by catalogue file id for ``--local-dir``."""
    from ckptkit.testing.loftr import write_checkpoint

    shutil.copytree(SAMPLES / "musiq_saved_model", origin / "musiq" / "spaq" / "saved_model")
    shutil.copy(SAMPLES / "spaq_ckpt.npz", origin / "musiq" / "spaq_ckpt.npz")
    shutil.copytree(SAMPLES / "jukebox", origin / "jukebox" / "5b")
    (origin / "jukebox" / "1b_lyrics").mkdir(parents=True)
    shutil.copy(SAMPLES / "prior_level_2.pth.tar", origin / "jukebox" / "1b_lyrics")
    # A Lightning checkpoint laid out as the released one (random weights), without torch.
    (origin / "loftr").mkdir()
    write_checkpoint(origin / "loftr" / "outdoor_ds.ckpt", 0)


def _training_run(run: Path) -> None:
    """Three periodic checkpoints, the newest cut short, a best one and a tokenizer."""
    run.mkdir(parents=True)
    sample = SAMPLES / "thinker_step_200.pt"
    for step in (100, 200, 300):
        shutil.copy(sample, run / f"thinker_step_{step}.pt")
    shutil.copy(sample, run / "thinker_best.pt")
    (run / "tokenizer.model").write_text("sentencepiece model\n")
    (run / "thinker_step_300.pt").write_bytes(sample.read_bytes()[:40000])


class _Payload:
    """What pickle.load would run: os.system("touch <folder>/PWNED")."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.folder / 'PWNED'}",)


def _downloads(work: Path) -> None:
    folder = work / "downloads"
    folder.mkdir()
    shutil.copy(work / "thinker_infer.pt", folder)
    shutil.copy(work / "jukebox-models" / "1b_lyrics" / "prior_level_2.pth.tar", folder)
    payload = {"lr": 3e-4, "hps": _Payload(folder)}
    (folder / "hps.pkl").write_bytes(pickle.dumps(payload, protocol=4))


# -- the docs ---------------------------------------------------------------------------------

def comparable(block: str) -> str:
    """``block`` with what differs between honest runs masked (see VOLATILE), runs of spaces
    (column widths follow the values) made one, and each run of ``ckpt:`` log lines sorted
    (files are fetched in parallel, so their lines interleave in any order)."""
    for pattern, replacement in VOLATILE:
        block = pattern.sub(replacement, block)
    lines: list[str] = []
    logs: list[str] = []
    for line in [*block.splitlines(), ""]:
        if line.startswith("ckpt: "):
            logs.append(line)
            continue
        lines += sorted(logs) + [line]
        logs = []
    return re.sub(r" {2,}", " ", "\n".join(lines[:-1]))


def blocks(text: str) -> list[tuple[str, str]]:
    """``(step, block text)`` of every marked block of a page."""
    return [(m.group(2), m.group(3)) for m in MARK.finditer(text)]


def rewrite(text: str, transcript: dict[str, str]) -> str:
    """``text`` with every marked block replaced by the transcript of its step."""
    def one(match: re.Match[str]) -> str:
        if match.group(2) not in transcript:
            raise SystemExit(f"demo: a docs block names step {match.group(2)!r}, which the demo "
                             "does not have")
        return match.group(1) + transcript[match.group(2)].rstrip("\n") + "\n" + match.group(4)

    return MARK.sub(one, text)


def write_transcript(path: Path, transcript: dict[str, str]) -> None:
    path.write_text("".join(f"<!-- demo: {key} -->\n```console\n{text.rstrip()}\n```\n\n"
                            for key, text in transcript.items()), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="the ckpt command to run")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="work in DIR (new or empty) and keep everything the demo writes")
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the marked blocks of README.md and docs/*.md")
    args = parser.parse_args(argv)
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty; name a new or empty directory")
    work = (args.keep or Path(tempfile.mkdtemp(prefix="ckptkit-demo."))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work, shlex.split(args.ckpt))
    print(f"ckptkit demo in {work}: a local mirror stands in for the hubs, nothing leaves this "
          "machine, and torch, TensorFlow and JAX are not needed.")
    try:
        steps(demo)
        heavy = subprocess.run(
            [sys.executable, "-c", "import sys, ckptkit; ckptkit.inspect(sys.argv[1]); print("
             "sum(m in sys.modules for m in ('torch', 'tensorflow', 'jax')))",
             str(SAMPLES / "thinker_step_200.pt")], capture_output=True, text=True, check=True)
        print(f"\ndemo: frameworks imported by all of that: {heavy.stdout.strip()}")
    finally:
        demo.stop()
        write_transcript(work / "transcript.md", demo.transcript)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.keep is not None:
        print(f"demo: everything it wrote is in {work} (transcript.md: what the docs show)")
    if args.write_docs:
        for page in DOCS:
            text = page.read_text(encoding="utf-8")
            if blocks(text):
                page.write_text(rewrite(text, demo.transcript), encoding="utf-8")
        print("demo: README.md and docs/*.md blocks rewritten from this run")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
