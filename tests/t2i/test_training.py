"""Training on the tiny pipeline: only LoRA changes, exact resume, fail-fast configs."""

import json
import math
import os

import pytest
import torch

from t2i.config import apply_overrides, get_preset, validate
from t2i.models import lora_state_dict
from t2i.rewards import Brightness, register_reward
from t2i.trainer import lora_hash, make_trainer

from .conftest import tiny_config

FAST = {"sample.num_steps": 2, "sample.batch_size": 2, "train.batch_size": 2, "train.num_epochs": 1}


def _frozen_state(trainer):
    p = trainer.pipe
    out = {f"unet.{k}": v.clone() for k, v in p.unet.state_dict().items() if "lora_" not in k}
    out.update({f"vae.{k}": v.clone() for k, v in p.vae.state_dict().items()})
    out.update({f"text.{k}": v.clone() for k, v in p.text_encoder.state_dict().items()})
    return out


@pytest.mark.parametrize("method", ["sa_ac", "ddpo_is", "dpok"])
def test_one_iteration_changes_only_lora_weights(tmp_path, method):
    tr = make_trainer(tiny_config(tmp_path, method, **FAST))
    frozen = _frozen_state(tr)
    lora0 = {k: v.clone() for k, v in lora_state_dict(tr.pipe.unet).items()}
    m = tr.train_iteration()
    assert m["updates"] == 1 and torch.isfinite(torch.tensor(m["train/loss"]))
    after = _frozen_state(tr)
    assert after.keys() == frozen.keys()
    for k in frozen:
        assert torch.equal(frozen[k], after[k]), f"non-LoRA tensor {k} changed"
    lora1 = lora_state_dict(tr.pipe.unet)
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0), "LoRA weights did not change"
    for k in ("reward_mean", "reward_se", "path_kl_mean", "diversity_pixels"):
        assert k in m


def _strip(records):
    """Records without wall-clock fields, as JSON text (so NaN == NaN)."""
    return [
        json.dumps({k: v for k, v in r.items() if not k.startswith("time_")}, sort_keys=True) for r in records
    ]


@pytest.mark.parametrize("fit", ["joint", "separate"])
def test_checkpoint_kill_resume_gives_identical_next_steps(tmp_path, fit):
    over = {**FAST, "train.num_epochs": 2, "value.kind": "residual", "value.fit": fit, "value.epochs": 2}
    full = make_trainer(tiny_config(tmp_path / "a", "sa_ac", **over))
    hist_full = full.train()
    # interrupted: one epoch, checkpoint, "kill" (drop the object), fresh object resumes from `latest`
    half = make_trainer(tiny_config(tmp_path / "b", "sa_ac", **{**over, "train.num_epochs": 1}))
    half.train()
    run_dir = half.cfg.log.output_dir
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == "checkpoint-000001"
    assert os.path.isfile(
        os.path.join(run_dir, "checkpoints", "checkpoint-000001", "pytorch_lora_weights.safetensors")
    )
    del half
    resumed = make_trainer(tiny_config(tmp_path / "b", "sa_ac", **{**over, "resume_from": "auto"}))
    assert resumed.state.epoch == 1 and resumed.state.global_step == 1
    hist_res = resumed.train()
    assert lora_hash(resumed.pipe.unet) == lora_hash(full.pipe.unet)
    for a, b in zip(full.value.state_dict().values(), resumed.value.state_dict().values()):
        assert torch.equal(a, b)
    assert _strip(hist_res) == _strip(hist_full[1:])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = [json.loads(ln) for ln in f]
    assert _strip(logged) == _strip(hist_full)


def test_lora_checkpoint_loads_into_a_diffusers_pipeline(tmp_path):
    from t2i.models import build_tiny_pipeline

    tr = make_trainer(tiny_config(tmp_path, "ddpo_is", **FAST))
    tr.train()
    ckpt = os.path.join(tr.cfg.log.output_dir, "checkpoints", "checkpoint-000001")
    pipe = build_tiny_pipeline(0)
    pipe.load_lora_weights(ckpt)
    ours = {k: v for k, v in tr.pipe.unet.state_dict().items() if "lora_A" in k}
    theirs = {k: v for k, v in pipe.unet.state_dict().items() if "lora_A" in k}
    assert len(theirs) == len(ours) > 0
    assert all(
        torch.equal(a, b) for a, b in zip(sorted(ours.items()), sorted(theirs.items())) if a[0] == b[0]
    )


@pytest.mark.parametrize(
    "over,field",
    [
        ({"reward.name": "nope"}, "reward.name"),
        ({"reward.name": "aesthetic", "reward.clip_path": "/nonexistent"}, "reward.clip_path"),
        ({"reward.name": "aesthetic"}, "reward.weights_path"),
        ({"sample.batch_size": 3, "train.batch_size": 2}, "train.batch_size"),
        ({"train.beta": -1}, "train.beta"),
        ({"sample.eta": 0}, "sample.eta"),
        ({"train.method": "ppo"}, "train.method"),
        ({"train.method": "dpok", "value.kind": "none"}, "value.kind"),
        ({"train.steps_per_backward": -1}, "train.steps_per_backward"),
    ],
)
def test_bad_configs_fail_fast_naming_the_field(over, field):
    cfg = apply_overrides(get_preset("tiny_cpu"), {k: str(v) for k, v in over.items()})
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate(cfg)


def test_unknown_cli_field_and_bad_type_are_named(capsys):
    from t2i.cli import main, parse_overrides

    with pytest.raises(ValueError, match="train.bogus"):
        apply_overrides(get_preset("tiny_cpu"), parse_overrides(["--train.bogus", "1"]))
    with pytest.raises(ValueError, match="nosection.x"):
        apply_overrides(get_preset("tiny_cpu"), {"nosection.x": "1"})
    with pytest.raises(ValueError, match="train.num_epochs"):
        apply_overrides(get_preset("tiny_cpu"), {"train.num_epochs": "many"})
    # the CLI: one "error: ..." line naming the field (no traceback), exit status 2; --debug re-raises
    assert main(["train", "--config", "tiny_cpu", "--train.bogus", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.bogus" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["train", "--config", "nope"]) == 2
    assert "unknown config preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="train.bogus"):
        main(["train", "--config", "tiny_cpu", "--train.bogus", "3", "--debug"])
    cfg = apply_overrides(
        get_preset("sd15_sa_ac"), parse_overrides(["--train.beta=0.5", "--prompts", "a|b c"])
    )
    assert cfg.train.beta == 0.5 and cfg.prompts == ["a", "b c"]


class NaNReward(Brightness):
    name = "nan_reward"

    def __call__(self, images, prompts):
        r = super().__call__(images, prompts)
        r[0] = float("nan")
        return r


def test_nan_reward_raises_floating_point_error_naming_the_reward(tmp_path):
    register_reward("nan_reward", lambda **kw: NaNReward())
    tr = make_trainer(
        tiny_config(tmp_path, "sa_ac", **{**FAST, "reward.name": "nan_reward", "sample.num_steps": 1})
    )
    with pytest.raises(FloatingPointError, match="nan_reward"):
        tr.train_iteration()


def test_bf16_mixed_precision_and_gradient_checkpointing_train_fp32_lora_on_cpu(tmp_path):
    """model.mixed_precision='bf16' (CPU autocast) + gradient checkpointing: frozen weights are bf16, LoRA
    parameters stay fp32 and are the only ones that change, the loss is finite."""
    from accelerate.state import AcceleratorState

    over = {**FAST, "model.mixed_precision": "bf16", "model.gradient_checkpointing": True,
            "value.kind": "none", "log.save_every": 0}
    AcceleratorState._reset_state(True)  # the process-wide accelerate state was set by earlier tests
    try:
        _check_bf16_trainer(make_trainer(tiny_config(tmp_path, "sa_ac", **over)))
    finally:
        AcceleratorState._reset_state(True)


def _check_bf16_trainer(tr):
    unet = tr.pipe.unet
    assert unet.is_gradient_checkpointing
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    frozen = [p for n, p in unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    before = {n: p.detach().clone() for n, p in lora.items()}
    frozen0 = [p.detach().clone() for p in frozen]
    m = tr.train_iteration()
    assert math.isfinite(m["train/loss"])
    assert any(not torch.equal(before[n], p) for n, p in lora.items())
    assert all(torch.equal(a, p) for a, p in zip(frozen0, frozen))


def test_ddpo_return_and_reference_recording_follow_beta_as_on_the_toys(tmp_path):
    """DDPO's return is R - beta * sum_k lambda_k (sampled log-ratios, the toys' definition) with beta > 0, the
    reward with beta = 0; with ``log.reference_kl false`` a beta = 0 DDPO run skips the reference pass (no
    pretrained actions recorded, no path-KL metrics) and trains bitwise as with it (same rewards, same LoRA
    weights: the pass only feeds the monitoring); sa_ac always records it."""
    two = {**FAST, "train.num_epochs": 2}
    over = {**two, "log.reference_kl": "false"}
    tr = make_trainer(tiny_config(tmp_path / "a", "ddpo_is", **over, **{"train.beta": 0.0}))
    assert not tr.method.needs_reference
    b = tr.sample_epoch(torch.Generator().manual_seed(0))
    assert b.ref_actions is None and b.sampled_log_ratio is None
    assert torch.equal(tr.method.path_return(b, b.rewards), b.rewards)
    m = tr.train_iteration()
    assert "path_kl_mean" not in m and m["updates"] == 1
    # two iterations (at the first the zero-initialised LoRA policy is the reference itself): the same run with the
    # reference recorded ends bitwise equal; a second control with beta = 0.3 differs, so the comparison can fail
    m = tr.train_iteration()
    lora = lora_state_dict(tr.pipe.unet)
    for name, beta, same in (("a_ref", 0.0, True), ("a_beta", 0.3, False)):
        ref = make_trainer(tiny_config(tmp_path / name, "ddpo_is", **two, **{"train.beta": beta}))
        ref.train_iteration()
        m_ref = ref.train_iteration()
        assert math.isfinite(m_ref["path_kl_mean"]) and m_ref["reward_mean"] == m["reward_mean"]
        lora_ref = lora_state_dict(ref.pipe.unet)
        assert lora.keys() == lora_ref.keys() and all(torch.equal(lora[k], lora_ref[k]) for k in lora) == same, name
    tr = make_trainer(tiny_config(tmp_path / "b", "ddpo_is", **over, **{"train.beta": 0.5}))
    assert tr.method.needs_reference
    b = tr.sample_epoch(torch.Generator().manual_seed(0))
    lam = (b.log_probs - b.ref_log_probs).sum(0)
    torch.testing.assert_close(tr.method.path_return(b, b.rewards), b.rewards - 0.5 * lam)
    assert make_trainer(tiny_config(tmp_path / "c", "sa_ac", **over)).method.needs_reference


def test_renamed_field_loads_from_old_configs_and_the_cli_names_the_new_one():
    from t2i.config import config_from_dict, config_to_dict

    d = config_to_dict(get_preset("sd15_sa_ac"))
    d["train"]["max_path_kl"] = d["train"].pop("early_stop_path_kl")
    assert config_from_dict(d).train.early_stop_path_kl == 5.0
    with pytest.raises(ValueError, match="early_stop_path_kl"):
        apply_overrides(get_preset("tiny_cpu"), {"train.max_path_kl": "1"})


def test_lr_warms_up_linearly_over_optimizer_updates(tmp_path):
    """``train.lr_warmup_steps`` = 3: the LR after update u is ``lr * min(1, (u + 1) / 3)`` (the toy trainers'
    ``lr_lambda``); one update per epoch here."""
    tr = make_trainer(tiny_config(tmp_path, "ddpo_is", **{**FAST, "train.num_epochs": 4, "train.lr_warmup_steps": 3}))
    lr = tr.cfg.train.learning_rate
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(lr / 3)  # before the first update
    hist = tr.train()
    assert [h["updates"] for h in hist] == [1, 1, 1, 1]
    assert [h["lr"] for h in hist] == pytest.approx([lr * min(1.0, (u + 2) / 3) for u in range(4)])


def test_separate_critic_phase_fits_the_value_model_before_the_advantages(tmp_path):
    """``value.fit='separate'``: before the advantages, ``value.epochs`` critic updates with the critic's own
    optimizer lower its regression loss on the epoch's targets and leave the LoRA alone; the advantages are then
    the reward-to-go minus the *fitted* critic's values, and the actor's loss carries no critic term."""
    from sa_theory.estimators import reward_to_go

    over = {**FAST, "value.kind": "critic", "value.fit": "separate", "value.epochs": 4,
            "value.learning_rate": 1e-2}
    tr = make_trainer(tiny_config(tmp_path, "sa_ac", **over))
    assert tr.method.cfg.value_coef == 0 and len(tr.opt.param_groups) == 1
    v0 = {k: v.clone() for k, v in tr.value.state_dict().items()}
    lora0 = lora_hash(tr.pipe.unet)
    batch, gen, _ = tr.rollouts()
    method, rb, plan, metrics = tr.prepare(batch, gen)
    assert metrics["value_updates"] == 4 and lora_hash(tr.pipe.unet) == lora0

    def critic_mse():
        with torch.no_grad():
            return sum(float(method.critic_loss(rb, k, coef=1.0)) for k in range(rb.num_steps)) / rb.num_steps

    fitted = {k: v.clone() for k, v in tr.value.state_dict().items()}
    after = critic_mse()
    with torch.no_grad():
        V = method.all_values(rb)
        expected = reward_to_go(rb.rewards, method.kl_steps(rb), method.cfg.beta) - V
    torch.testing.assert_close(rb.step_data["adv"], method._clip_adv(expected), rtol=0, atol=1e-6)
    tr.value.load_state_dict(v0)
    before = critic_mse()
    tr.value.load_state_dict(fitted)
    assert after < 0.5 * before, (before, after)  # measured 0.229 -> 0.042
    rec = tr.train_iteration()  # the epoch again, with the update and its record
    assert rec["train/critic_loss"] == 0.0 and rec["value_loss"] > 0
