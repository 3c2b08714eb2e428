"""ckptkit.resume on real tiny torch training runs and on μOmni checkpoint layouts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import ckptkit  # noqa: E402
from ckptkit.errors import FormatError, NotFoundError, UnsafeContentError  # noqa: E402
from ckptkit.runs.resuming import StateMismatchError  # noqa: E402


@dataclass
class TrainConfig:
    """A custom class: pickling it makes a file that weights_only loading refuses."""

    lr: float = 1e-3


def _mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


class Run:
    """Model, AdamW, StepLR and an enabled CPU GradScaler, trained on seeded per-step batches."""

    def __init__(self) -> None:
        self.model = _mlp()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu")
        self.step = 0

    def train_step(self) -> Any:
        self.step += 1
        # The batch depends only on the step number, so a resumed run sees the same data.
        gen = torch.Generator().manual_seed(1000 + self.step)
        x = torch.randn(4, 8, generator=gen)
        y = torch.randn(4, 1, generator=gen)
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "best_val_loss": 0.75}


def _params(model: Any) -> list[Any]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_resumed_run_matches_uninterrupted_run_exactly(tmp_path: Path) -> None:
    straight = Run()
    losses = {}
    params = {}
    for _ in range(11):
        loss = straight.train_step()
        if straight.step in (10, 11):
            losses[straight.step], params[straight.step] = loss, _params(straight.model)

    first = Run()
    for _ in range(5):
        first.train_step()
    path = tmp_path / "thinker_step_5.pt"
    torch.save(first.checkpoint(), path)

    resumed = Run()
    # A fresh run's weights differ from the saved ones only after resume() is wrong or skipped.
    result = ckptkit.resume(path, model=resumed.model, optimizer=resumed.optimizer,
                            scheduler=resumed.scheduler, scaler=resumed.scaler)
    assert result.path == path
    assert result.step == 5
    assert result.epoch is None
    assert (result.best_metric, result.best_metric_name) == (0.75, "best_val_loss")
    assert result.restored == ("model", "optimizer", "scheduler", "scaler")
    assert result.missing == () and result.unused == ()
    assert resumed.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert resumed.scaler.get_scale() == first.scaler.get_scale()

    resumed.step = result.step
    while resumed.step < 11:
        loss = resumed.train_step()
        if resumed.step in (10, 11):
            assert torch.equal(loss, losses[resumed.step])
            _assert_same(_params(resumed.model), params[resumed.step])


def test_without_optimizer_state_the_run_diverges(tmp_path: Path) -> None:
    """The control for the test above: restoring weights alone is not an exact resume."""
    straight = Run()
    for _ in range(6):
        straight.train_step()
    first = Run()
    for _ in range(5):
        first.train_step()
    torch.save(first.checkpoint(), tmp_path / "a.pt")
    partial = Run()
    ckptkit.resume(tmp_path / "a.pt", model=partial.model)
    partial.step = 5
    partial.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(_params(partial.model),
                                                    _params(straight.model)))


def test_directory_resumes_newest_complete_by_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "thinker_tiny"
    run_dir.mkdir()
    run = Run()
    for step in (5, 10, 9):  # 9 written last: newest by mtime, not by step
        run.step = step
        torch.save(run.checkpoint(), run_dir / f"thinker_step_{step}.pt")
    run.step = 99
    torch.save(run.checkpoint(), run_dir / "thinker_best.pt")
    torch.save(run.checkpoint(), run_dir / "thinker.pt")
    # A save killed halfway: the zip has no central directory.
    good = (run_dir / "thinker_step_10.pt").read_bytes()
    (run_dir / "thinker_step_12.pt").write_bytes(good[: len(good) // 2])
    (run_dir / "notes.txt").write_text("not a checkpoint")

    model = _mlp()
    with pytest.warns(UserWarning, match="thinker_step_12.pt"):
        result = ckptkit.resume(run_dir, model=model)
    assert result.path == run_dir / "thinker_step_10.pt"
    assert result.step == 10

    # An explicit file name wins over the directory scan.
    result = ckptkit.resume(run_dir / "thinker_best.pt", model=model)
    assert result.step == 99


def test_directory_without_periodic_checkpoints_is_not_found(tmp_path: Path) -> None:
    torch.save(Run().checkpoint(), tmp_path / "thinker_best.pt")
    with pytest.raises(NotFoundError, match="no complete periodic checkpoint"):
        ckptkit.resume(tmp_path, model=_mlp())
    with pytest.raises(NotFoundError):
        ckptkit.resume(tmp_path / "absent.pt", model=_mlp())


def test_legacy_weights_only_file_restores_model_only(tmp_path: Path) -> None:
    trained = Run()
    for _ in range(3):
        trained.train_step()
    path = tmp_path / "epoch_3.pt"
    torch.save(trained.model.state_dict(), path)

    fresh = Run()
    result = ckptkit.resume(path, model=fresh.model, optimizer=fresh.optimizer,
                            scheduler=fresh.scheduler)
    assert result.restored == ("model",)
    assert result.missing == ("optimizer", "scheduler")
    assert result.unused == ()
    assert (result.step, result.epoch, result.best_metric) == (None, 3, None)
    _assert_same(_params(fresh.model), _params(trained.model))


def _module(seed: int, n_in: int = 4, n_out: int = 3) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out)


def test_vision_stage_layout(tmp_path: Path) -> None:
    vit, img_proj, text_proj = _module(1), _module(2, 3, 2), _module(3, 3, 2)
    optimizer = torch.optim.AdamW([*vit.parameters(), *img_proj.parameters(),
                                   *text_proj.parameters()], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    optimizer.step()
    scheduler.step()
    path = tmp_path / "vision_step_40.pt"
    torch.save({"vit": vit.state_dict(), "img_proj": img_proj.state_dict(),
                "text_proj": text_proj.state_dict(), "text_embed": _module(4).state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": 40, "best_val_loss": 1.5}, path)

    new = [_module(11), _module(12, 3, 2), _module(13, 3, 2)]
    new_opt = torch.optim.AdamW([p for m in new for p in m.parameters()], lr=1e-3)
    new_sched = torch.optim.lr_scheduler.StepLR(new_opt, step_size=2)
    result = ckptkit.resume(path, model=new[0], img_proj=new[1], text_proj=new[2],
                            optimizer=new_opt, scheduler=new_sched)
    assert result.restored == ("model", "img_proj", "text_proj", "optimizer", "scheduler")
    assert result.missing == ()
    assert result.unused == ("text_embed",)
    assert result.step == 40
    for old, fresh in zip((vit, img_proj, text_proj), new):
        _assert_same(_params(fresh), _params(old))
    assert new_sched.last_epoch == 1

    # A projector that does not fit stops the resume before the encoder is overwritten.
    vit_target, before = _module(21), _params(_module(21))
    with pytest.raises(StateMismatchError, match="entry 'text_proj'"):
        ckptkit.resume(path, model=vit_target, text_proj=_module(22, 5, 2))
    _assert_same(_params(vit_target), before)


def test_vocoder_stage_layout_via_keywords(tmp_path: Path) -> None:
    generator, mpd, msd = _module(1), _module(2), _module(3)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=2e-4)
    opt_d = torch.optim.AdamW([*mpd.parameters(), *msd.parameters()], lr=2e-4)
    scheduler_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=0.9)
    scheduler_d = torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.9)
    x = torch.ones(2, 4)
    (generator(x).sum() + mpd(x).sum() + msd(x).sum()).backward()
    for opt, sched in ((opt_g, scheduler_g), (opt_d, scheduler_d)):
        opt.step()
        sched.step()
    path = tmp_path / "vocoder_step_7.pt"
    torch.save({"generator": generator.state_dict(), "mpd": mpd.state_dict(),
                "msd": msd.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "scheduler_g": scheduler_g.state_dict(),
                "scheduler_d": scheduler_d.state_dict()}, path)

    g, p, s = _module(11), _module(12), _module(13)
    og = torch.optim.AdamW(g.parameters(), lr=2e-4)
    od = torch.optim.AdamW([*p.parameters(), *s.parameters()], lr=2e-4)
    sg = torch.optim.lr_scheduler.ExponentialLR(og, gamma=0.9)
    sd = torch.optim.lr_scheduler.ExponentialLR(od, gamma=0.9)
    result = ckptkit.resume(path, model=g, mpd=p, msd=s, opt_g=og, opt_d=od,
                            scheduler_g=sg, scheduler_d=sd, optimizer=None)
    assert set(result.restored) == {"model", "mpd", "msd", "opt_g", "opt_d", "scheduler_g",
                                    "scheduler_d"}
    assert result.missing == () and result.unused == ()
    assert result.step == 7  # not stored: taken from the file name
    assert sg.get_last_lr() == scheduler_g.get_last_lr()
    assert torch.equal(og.state_dict()["state"][0]["exp_avg"],
                       opt_g.state_dict()["state"][0]["exp_avg"])
    assert len(od.state_dict()["state"]) == 4
    _assert_same(_params(g), _params(generator))

    # Asking for a piece the stage never saves reports it instead of failing.
    result = ckptkit.resume(path, model=_module(5), scaler=torch.amp.GradScaler("cpu"))
    assert result.missing == ("scaler",)
    assert set(result.unused) == {"mpd", "msd", "opt_g", "opt_d", "scheduler_g", "scheduler_d"}


def test_talker_and_omni_layouts_pick_stage_entry(tmp_path: Path) -> None:
    talker, rvq = _module(1), _module(2, 2, 2)
    torch.save({"rvq": rvq.state_dict(), "talker": talker.state_dict()}, tmp_path / "t.pt")
    target, target_rvq = _module(9), _module(8, 2, 2)
    result = ckptkit.resume(tmp_path / "t.pt", model=target, rvq=target_rvq)
    assert result.restored == ("model", "rvq")
    _assert_same(_params(target), _params(talker))

    # sft_omni: "thinker" is the model; the projectors come by name.
    thinker = _module(3)
    torch.save({"thinker": thinker.state_dict(), "proj_a": _module(4).state_dict(),
                "proj_v": _module(5).state_dict()}, tmp_path / "omni.pt")
    result = ckptkit.resume(tmp_path / "omni.pt", model=_module(0), proj_a=_module(0))
    assert result.restored == ("model", "proj_a")
    assert result.unused == ("proj_v",)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    trained = _mlp()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    state = {prefix + k: v for k, v in trained.state_dict().items()}
    torch.save({"model": state, "step": 3}, tmp_path / "c.pt")
    fresh = _mlp()
    assert ckptkit.resume(tmp_path / "c.pt", model=fresh).restored == ("model",)
    _assert_same(_params(fresh), _params(trained))


def test_compiled_target_gets_prefix_added(tmp_path: Path) -> None:
    """A plain state dict into a torch.compile-style wrapper whose keys carry _orig_mod."""
    trained = _mlp()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod = _mlp()

    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(2.0)
    torch.save({"model": trained.state_dict()}, tmp_path / "c.pt")
    wrapper = Wrapper()
    ckptkit.resume(tmp_path / "c.pt", model=wrapper)
    _assert_same(_params(wrapper._orig_mod), _params(trained))


def test_mismatched_model_is_a_clear_error_not_random_weights(tmp_path: Path) -> None:
    saved = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1),
                                torch.nn.Linear(1, 1))
    torch.save({"model": saved.state_dict()}, tmp_path / "c.pt")
    target = _mlp()
    before = _params(target)
    with pytest.raises(StateMismatchError) as info:
        ckptkit.resume(tmp_path / "c.pt", model=target)
    err = info.value
    assert isinstance(err, FormatError)
    assert err.entry == "model"
    assert err.unexpected_keys == ["3.weight", "3.bias"]
    assert "2 unexpected keys (3.weight, 3.bias)" in str(err)
    _assert_same(_params(target), before)

    # Shapes: a wider model never loads, not even non-strictly.
    torch.save({"model": torch.nn.Sequential(torch.nn.Linear(8, 32)).state_dict()},
               tmp_path / "w.pt")
    with pytest.raises(StateMismatchError, match=r"0\.weight \(32, 8\) vs \(16, 8\)"):
        ckptkit.resume(tmp_path / "w.pt", model=_mlp(), strict=False)

    # Non-strict with nothing in common would be random weights: still an error.
    torch.save({"model": {"other.weight": torch.zeros(2)}}, tmp_path / "n.pt")
    with pytest.raises(StateMismatchError, match="no key in common"):
        ckptkit.resume(tmp_path / "n.pt", model=_mlp(), strict=False)


def test_non_strict_loads_matching_keys_with_a_warning(tmp_path: Path) -> None:
    trained = _mlp()
    state = dict(trained.state_dict())
    del state["2.bias"]
    torch.save({"model": state}, tmp_path / "c.pt")
    fresh = _mlp()
    with pytest.warns(UserWarning, match="1 missing key"):
        ckptkit.resume(tmp_path / "c.pt", model=fresh, strict=False)
    assert torch.equal(fresh[0].weight, trained[0].weight)


def test_optimizer_for_other_parameters_is_a_clear_error(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    fresh = _mlp()
    wrong = torch.optim.AdamW(list(fresh.parameters())[:2])
    with pytest.raises(StateMismatchError, match="entry 'optimizer' does not fit the AdamW"):
        ckptkit.resume(tmp_path / "c.pt", model=fresh, optimizer=wrong)


def test_custom_class_is_refused_unless_unsafe(tmp_path: Path) -> None:
    model = _mlp()
    path = tmp_path / "c.pt"
    torch.save({"model": model.state_dict(), "config": TrainConfig(), "step": 2}, path)
    with pytest.raises((UnsafeContentError, FormatError)) as info:
        ckptkit.resume(path, model=_mlp())
    assert "unsafe=True" in str(info.value)
    assert "TrainConfig" in str(info.value)
    fresh = _mlp()
    result = ckptkit.resume(path, model=fresh, unsafe=True)
    assert result.unused == ("config",)
    _assert_same(_params(fresh), _params(model))


def test_missing_model_entry_is_not_found(tmp_path: Path) -> None:
    opt = torch.optim.AdamW(_mlp().parameters())
    path = tmp_path / "c.pt"
    torch.save({"optimizer": opt.state_dict(), "step": 4}, path)
    with pytest.raises(NotFoundError, match="no model weights") as info:
        ckptkit.resume(path, model=_mlp())
    assert "optimizer, step" in str(info.value)

