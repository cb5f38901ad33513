"""Run folders never lose or misstate data (issue 17): checksummed checkpoints with fallback, checked resume,
no silent overwrite, Ctrl-C checkpoints, periodic checkpoints; toy trainer + ``sa-toy``, image trainer, figures.

Every refusal is checked for (a) a message naming the field or file and (b) the run folder being byte-for-byte
unchanged afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal

import pytest
import torch

from sa_theory.algorithms import CheckpointCorruptError, TrainingInterrupted, load_checkpoint, save_checkpoint
from sa_theory.algorithms.checkpoint import resolve_checkpoint
from sa_theory.algorithms.toy_task import ToyTask
from toy_problems.cli import main as toy_main
from toy_problems.train import build

SMALL = {"progress": False, "batch_size": 16, "num_steps": 5, "seed": 3}
CLI_SMALL = ["--batch_size", "16", "--num_steps", "5", "--progress", "false", "--eval_paths", "64"]


def snapshot(folder) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder`` (to prove nothing was changed or lost)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _params(trainer):
    return [p.detach().clone() for p in trainer.policy.parameters()] + \
        [p.detach().clone() for p in (trainer.value.parameters() if trainer.value is not None else [])]


def _latest(ck) -> dict:
    """The state in the checkpoint that ``ck/latest`` names."""
    return load_checkpoint(os.path.join(resolve_checkpoint(str(ck)), "state.pt"))


def _interrupt_at(monkeypatch, iteration: int, sig=signal.SIGINT):
    """Send ourselves ``sig`` in the middle of the run, right after iteration ``iteration`` finished its update."""
    orig = ToyTask.record

    def patched(self, *args):
        rec = orig(self, *args)
        if self.iteration == iteration:
            os.kill(os.getpid(), sig)
        return rec

    monkeypatch.setattr(ToyTask, "record", patched)


# ---------------------------------------------------------------------------------------------- checksums
def test_checkpoint_checksum_detects_truncation_and_alteration_naming_the_file(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.arange(1000.0)})
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000.0))  # control: intact file loads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointCorruptError, match="ck.pt.*SHA-256"):
        load_checkpoint(path)
    path.write_bytes(data[:-10] + bytes(10))  # same length, altered payload
    with pytest.raises(CheckpointCorruptError, match="ck.pt"):
        load_checkpoint(path)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one_naming_both_and_stays_exact(tmp_path, capsys):
    """The toys' checkpoints are the image runs' layout (checkpoint-EEEEEE folders, ``latest``, ``keep_last``)."""
    ov = {**SMALL, "num_epochs": 4}
    full = build("sa_ac", "gauss2d", ov)
    full.trainer.train()
    ck = tmp_path / "checkpoints"
    first = build("sa_ac", "gauss2d", {**ov, "checkpoint_dir": str(ck), "checkpoint_every": 1})
    first.trainer.train(until=3)
    assert sorted(os.listdir(ck)) == ["checkpoint-000002", "checkpoint-000003", "latest"]  # keep_last = 2
    assert _latest(ck)["iteration"] == 3
    state = ck / "checkpoint-000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:300])  # the latest is truncated (e.g. the disk filled up)
    before = snapshot(tmp_path)
    second = build("sa_ac", "gauss2d", {**ov, "checkpoint_dir": str(ck), "checkpoint_every": 1})
    assert second.trainer.resume() and second.trainer.iteration == 2
    err = capsys.readouterr().err
    assert "checkpoint-000003" in err and "checkpoint-000002" in err and "falling back" in err
    assert snapshot(tmp_path) == before  # the damaged folder is kept for inspection, nothing else touched
    second.trainer.train()
    for a, b in zip(_params(full.trainer), _params(second.trainer)):
        assert torch.equal(a, b)
    assert second.trainer.history == full.trainer.history
    # all damaged: a clear error naming them, nothing loaded
    third = build("sa_ac", "gauss2d", {**ov, "checkpoint_dir": str(ck)})
    for d in ("checkpoint-000003", "checkpoint-000004"):
        (ck / d / "state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint-000004.*checkpoint-000003"):
        third.trainer.resume()


# ---------------------------------------------------------------------------------------------- toy trainer
def test_fresh_toy_run_refuses_to_append_to_an_existing_log_unless_overwrite(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"epoch": 0}\n')
    s = build("sa_ac", "gauss2d", {**SMALL, "num_epochs": 1, "log_path": str(log)})
    with pytest.raises(FileExistsError, match="'log_path'.*m.jsonl"):
        s.trainer.train()
    assert log.read_text() == '{"epoch": 0}\n'
    s = build("sa_ac", "gauss2d", {**SMALL, "num_epochs": 1, "log_path": str(log), "overwrite": True})
    s.trainer.train()
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [0]


def test_default_checkpoints_are_periodic_so_a_crash_loses_at_most_10_percent(tmp_path, monkeypatch):
    ck = tmp_path / "checkpoints"
    s = build("sa_ac", "gauss2d", {**SMALL, "num_epochs": 20, "checkpoint_dir": str(ck)})
    assert s.trainer.checkpoint_interval == 2
    orig = ToyTask.collect

    def crash(self, it):
        if it == 5:
            raise RuntimeError("power cut")
        return orig(self, it)

    monkeypatch.setattr(ToyTask, "collect", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        s.trainer.train()
    assert _latest(ck)["iteration"] == 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_checkpoints_after_the_current_iteration_and_resume_is_exact(tmp_path, monkeypatch, sig):
    ov = {**SMALL, "num_epochs": 4, "checkpoint_every": -1}
    full = build("ddpo_is", "gauss2d", ov)
    full.trainer.train()
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    run = build("ddpo_is", "gauss2d", {**ov, "checkpoint_dir": str(ck), "log_path": str(log)})
    _interrupt_at(monkeypatch, 2, sig)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=rf"{sig.name}.*iteration 2/4.*ck/checkpoint-000002.*resume"):
        run.trainer.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert _latest(ck)["iteration"] == 2  # only the end-of-run checkpoint was configured
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [0, 1]
    monkeypatch.undo()
    again = build("ddpo_is", "gauss2d", {**ov, "checkpoint_dir": str(ck), "log_path": str(log)})
    assert again.trainer.resume()
    again.trainer.train()
    for a, b in zip(_params(full.trainer), _params(again.trainer)):
        assert torch.equal(a, b)
    assert [json.loads(x) for x in log.read_text().splitlines()] == full.trainer.history


def test_resume_after_a_kill_mid_log_write_and_with_too_few_iterations(tmp_path, capsys):
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    ov = {**SMALL, "num_epochs": 3, "checkpoint_dir": str(ck), "log_path": str(log)}
    build("sa_ac", "gauss2d", ov).trainer.train(until=2)
    with open(log, "a") as fh:
        fh.write('{"epoch": 2, "rew')  # killed while writing epoch 2's record
    short = build("sa_ac", "gauss2d", {**ov, "num_epochs": 1})
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"'num_epochs' \(1\) is below the checkpoint's epoch 2"):
        short.trainer.resume()
    assert snapshot(tmp_path) == before
    s = build("sa_ac", "gauss2d", ov)
    assert s.trainer.resume() and s.trainer.iteration == 2
    assert "m.jsonl" in capsys.readouterr().err
    s.trainer.train()
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- sa-toy
def test_sa_toy_refuses_a_non_empty_out_and_resume_without_checkpoint_losing_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--problem", "gauss2d", "--steps", "2", *CLI_SMALL, "--out", str(out)]
    assert toy_main(args) == 0
    before = snapshot(out)
    assert {"config.json", "metrics.jsonl", "checkpoints/latest", "final.json"} <= set(before)
    capsys.readouterr()
    assert toy_main(args) == 2  # the same command again: refused
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and str(out) in err and "--overwrite" in err and "--resume" in err
    assert snapshot(out) == before
    # a run folder with a log but no checkpoint: --resume says so instead of restarting and deleting the log
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    assert toy_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "checkpoints/latest" in err and snapshot(out) == before
    assert toy_main([*args, "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err and snapshot(out) == before
    # the explicit flag replaces the run
    assert toy_main([*args, "--steps", "3", "--overwrite"]) == 0
    assert [json.loads(x)["epoch"] for x in open(out / "metrics.jsonl")] == [0, 1, 2]


def test_sa_toy_resume_refuses_other_settings_naming_them_and_reports_allowed_changes(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--algo", "sa_ac", *CLI_SMALL, "--out", str(out)]
    assert toy_main([*base, "--problem", "gauss2d", "--steps", "2"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    for extra, field in ((["--problem", "gmm2d"], "toy.problem"),
                         (["--problem", "gauss2d", "--learning_rate", "0.5"], "learning_rate"),
                         (["--problem", "gauss2d", "--policy", "affine"], "toy.policy")):
        assert toy_main([*base, *extra, "--steps", "3", "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot resume") and field in err and err.count("\n") == 1
        assert snapshot(out) == before  # config.json, log and checkpoints untouched by the failed resume
    assert toy_main(["train", "--algo", "ddpo_is", *CLI_SMALL, "--out", str(out), "--problem", "gauss2d",
                     "--steps", "3", "--resume"]) == 2
    assert "algo" in capsys.readouterr().err and snapshot(out) == before
    assert toy_main([*base, "--problem", "gauss2d", "--steps", "3", "--resume"]) == 0
    assert "num_epochs changed from 2 to 3 (applied)" in capsys.readouterr().err
    assert json.load(open(out / "config.json"))["train"]["num_epochs"] == 3
    assert [json.loads(x)["epoch"] for x in open(out / "metrics.jsonl")] == [0, 1, 2]


def test_sa_toy_ctrl_c_saves_and_prints_a_resume_command_that_works(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--problem", "gauss2d", "--steps", "4", *CLI_SMALL, "--out", str(out)]
    _interrupt_at(monkeypatch, 2)
    assert toy_main(args) == 130
    err = capsys.readouterr().err
    assert "SIGINT" in err and "checkpoints/checkpoint-000002" in err
    cmd = shlex.split(err.split("To continue: ", 1)[1].strip())
    assert cmd[0] == "sa-toy" and cmd[-1] == "--resume"
    monkeypatch.undo()
    assert toy_main(cmd[1:]) == 0
    assert [json.loads(x)["epoch"] for x in open(out / "metrics.jsonl")] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- figures
def test_quick_figures_never_write_over_the_committed_ones(tmp_path):
    from figures.make_all import FIGURES_DIR, QUICK_OUT, make_all

    assert os.path.realpath(QUICK_OUT) != os.path.realpath(FIGURES_DIR)
    before = snapshot(FIGURES_DIR)
    with pytest.raises(ValueError, match="'out_dir'.*committed"):
        make_all(FIGURES_DIR, quick=True, only=[5])
    assert snapshot(FIGURES_DIR) == before


# ---------------------------------------------------------------------------------------------- sa-t2i trainer
T2I_FAST = {"sample.num_steps": 2, "sample.batch_size": 2, "train.batch_size": 2, "train.num_epochs": 1,
            "log.save_every": 1}


def _t2i(tmp_path, **over):
    from t2i.trainer import make_trainer

    from .t2i.conftest import tiny_config

    cfg = tiny_config(tmp_path, "sa_ac", **{**T2I_FAST, **over})
    cfg.log.output_dir = str(tmp_path / "run")
    return make_trainer(cfg)


@pytest.fixture
def t2i_env():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_t2i_refuses_an_existing_run_folder_and_a_changed_resume_before_building(tmp_path, t2i_env, monkeypatch):
    import t2i.task as trmod

    _t2i(tmp_path).train()
    run = tmp_path / "run"
    before = snapshot(run)
    built = []
    monkeypatch.setattr(trmod, "build_pipeline", lambda *a, **k: built.append(1) / 0)  # must not be reached
    with pytest.raises(FileExistsError, match="log.output_dir.*run.*metrics.jsonl.*checkpoints.*overwrite"):
        _t2i(tmp_path)
    with pytest.raises(ValueError, match=r"train\.method: checkpoint has 'sa_ac', requested 'dpok'"):
        _t2i(tmp_path, **{"resume_from": "auto", "train.method": "dpok"})
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        _t2i(tmp_path, **{"resume_from": "auto", "train.learning_rate": 0.5, "train.num_epochs": 2})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _t2i(tmp_path, **{"resume_from": str(tmp_path / "nowhere")})
    assert not built and snapshot(run) == before
    monkeypatch.undo()
    tr = _t2i(tmp_path, **{"log.overwrite": True})  # the explicit flag replaces the run
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    tr.train()
    assert [json.loads(x)["epoch"] for x in open(run / "metrics.jsonl")] == [0]


def test_t2i_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, t2i_env, capsys):
    from sa_theory.algorithms import CheckpointCorruptError

    _t2i(tmp_path, **{"train.num_epochs": 2}).train()
    ckpts = tmp_path / "run" / "checkpoints"
    bad = ckpts / "checkpoint-000002"
    assert (bad / "checksums.sha256").is_file() and (ckpts / "checkpoint-000001").is_dir()
    opt = bad / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:64])  # truncated
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint-000002.*optimizer\.bin"):
        _t2i(tmp_path, **{"resume_from": str(bad), "train.num_epochs": 3})  # named explicitly: no fallback
    assert snapshot(tmp_path / "run") == before
    capsys.readouterr()
    (ckpts / "latest").write_text("")  # the pointer is damaged too (e.g. a full disk)
    tr = _t2i(tmp_path, **{"resume_from": "auto", "train.num_epochs": 3})
    out = capsys.readouterr().out
    assert all(s in out for s in ("checkpoint-000002", "optimizer.bin", "falling back", "checkpoint-000001"))
    assert tr.state.epoch == 1
    assert [json.loads(x)["epoch"] for x in open(tmp_path / "run" / "metrics.jsonl")] == [0]


class _SigintOnce:
    def __init__(self):
        from t2i.rewards import Brightness

        self.inner, self.sent = Brightness(), False

    def to(self, device):
        return self

    def __call__(self, images, prompts):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(images, prompts)


def test_t2i_sigint_finishes_the_epoch_saves_and_says_how_to_resume(tmp_path, t2i_env):
    from t2i.rewards import register_reward

    register_reward("sigint_once", lambda **kw: _SigintOnce())
    tr = _t2i(tmp_path, **{"train.num_epochs": 3, "log.save_every": 0, "reward.name": "sigint_once"})
    with pytest.raises(TrainingInterrupted, match=r"SIGINT.*epoch 1/3.*checkpoint-000001.*resume_from='auto'"):
        tr.train()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "checkpoint-000001" / "checksums.sha256").is_file()
    resumed = _t2i(tmp_path, **{"train.num_epochs": 3, "resume_from": "auto", "reward.name": "sigint_once"})
    assert resumed.state.epoch == 1


def test_quick_figure5_headline_is_never_nan(tmp_path, monkeypatch):
    """The headline is the cost ratio at the largest N where both costs are finite, else says why there is none
    (the quick figure itself, with its populated cost panel, runs in tests/test_figures.py)."""
    import math

    import figures.fig5_estimator_variance as fig5

    def study(finite_at):
        recs = [dict(estimator=e, N=n, work_to_error=(1.0 if e == "value_gradient" else 5.0) if n in finite_at
                     else math.inf) for e in ("value_gradient", "ddpo_sf") for n in (10, 40)]
        return {"records": recs}

    monkeypatch.setattr(fig5, "plot_study", lambda s, p: None)
    calls = []
    monkeypatch.setattr(fig5, "run_study", lambda **kw: calls.append(kw) or study({10}))
    res = fig5.run(str(tmp_path), quick=True)
    assert res["ddpo_sf/value_gradient cost ratio at N=10"] == 5.0 and calls[0]["eps_rel"] == 0.4
    monkeypatch.setattr(fig5, "run_study", lambda **kw: study(set()))
    res = fig5.run(str(tmp_path), quick=True)
    assert res["ddpo_sf/value_gradient cost ratio"].startswith("n/a")


def test_a_single_checkpoint_file_of_older_versions_still_resumes(tmp_path):
    ov = {**SMALL, "num_epochs": 2}
    old = build("sa_ac", "gauss2d", ov)
    old.trainer.train(until=1)
    state = old.trainer.state_dict()
    state["config"] = {{"num_epochs": "iterations", "num_steps": "sampler_steps"}.get(k, k): v
                       for k, v in state["config"].items()}  # an older version's names
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    new = build("sa_ac", "gauss2d", ov)
    assert new.trainer.resume(str(tmp_path / "checkpoint.pt")) and new.trainer.iteration == 1
    assert not new.trainer.resume(str(tmp_path / "nothing-here"))
