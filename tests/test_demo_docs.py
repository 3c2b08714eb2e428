"""The README's and docs' console blocks marked ``<!-- demo: STEP -->`` are what scripts/demo
prints: the demo's steps run here (in this process, on the bundled samples, against a served
mirror tree) and each block must match its step, but for timings, dates and the machine."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Steps the README shows: every headline command, and the mirror.
README_STEPS = {"fetch", "fetch-shared", "mirror-export", "mirror-serve", "scan", "inspect",
                "inspect-name", "convert-loftr", "cleanup-plan", "latest", "strip", "diff",
                "compare", "doctor"}


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ckptkit_demo", ROOT / "scripts" / "lib"
                                                  / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, dict[str, str]]:
    """The demo's module and the transcript of one run of its steps (in its own environment,
    as scripts/demo runs them)."""
    module = _demo_module()
    work = tmp_path_factory.mktemp("demo")
    run = module.Demo(work, ckpt=None, echo=False)
    try:
        module.steps(run)
    finally:
        run.stop()
        shutil.rmtree(work, ignore_errors=True)
    return module, run.transcript


def test_marked_blocks_are_the_demo_output(demo: tuple[ModuleType, dict[str, str]]) -> None:
    module, transcript = demo
    stale = []
    for page in module.DOCS:
        for step, block in module.blocks(page.read_text(encoding="utf-8")):
            assert step in transcript, f"{page.name} shows demo step {step!r}, which is gone"
            if module.comparable(block.rstrip("\n")) != module.comparable(
                    transcript[step].rstrip("\n")):
                stale.append(f"{page.relative_to(ROOT)}: {step}")
    assert not stale, ("blocks differ from the demo's output; rewrite them with "
                       f"`scripts/demo --write-docs`: {stale}")


def test_the_readme_and_convert_page_show_the_demo(demo: tuple[ModuleType, dict[str, str]]
                                                   ) -> None:
    module, _ = demo
    readme = {step for step, _ in module.blocks((ROOT / "README.md").read_text())}
    assert README_STEPS <= readme, f"README.md lacks demo blocks {README_STEPS - readme}"
    for page, step in (("convert.md", "convert-loftr"), ("mirror.md", "mirror-export"),
                       ("mirror.md", "mirror-serve"), ("mirror.md", "fetch-file")):
        assert step in {s for s, _ in module.blocks((ROOT / "docs" / page).read_text())}


def test_rewriting_puts_the_transcript_in_place(demo: tuple[ModuleType, dict[str, str]]) -> None:
    module, transcript = demo
    page = "intro\n<!-- demo: latest -->\n```console\n$ old output\n```\nafter\n"
    new = module.rewrite(page, transcript)
    assert module.blocks(new) == [("latest", transcript["latest"].rstrip("\n") + "\n")]
    assert new.startswith("intro\n") and new.endswith("```\nafter\n")
