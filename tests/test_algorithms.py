"""Training algorithms: convergence to the closed-form truth, exact resume, configs, CLI, logs, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from sa_theory.algorithms import (
    DDPOISConfig,
    GreedyPolicy,
    SAACConfig,
    describe,
    from_dict,
    load_checkpoint,
    override,
    save_checkpoint,
    to_dict,
)
from toy_problems.cli import main as cli_main
from toy_problems.cli import parse_overrides
from toy_problems.train import affine_class_optimum, build, make_critic, make_problem, mixture_statistics

FAST = {"progress": False}


def _params(trainer):
    out = [p.detach().clone() for p in trainer.policy.parameters()]
    if trainer.value is not None:
        out += [p.detach().clone() for p in trainer.value.parameters()]
    return out


# ------------------------------------------------------------------------------------------ configs / CLI
def test_renamed_config_fields_are_refused_naming_the_image_name_and_load_from_old_dicts():
    from sa_theory.algorithms.config import RENAMED

    for old, new in RENAMED.items():
        with pytest.raises(KeyError, match=f"{old!r} was renamed to {new!r}"):
            override(SAACConfig(), {old: "2"})
    cfg = from_dict({"algo": "sa_ac", "lr": 0.5, "epochs": 3, "grad_accum": 2, "adam_eps": 1e-6})
    assert (cfg.learning_rate, cfg.num_inner_epochs, cfg.gradient_accumulation_steps, cfg.adam_epsilon) == \
        (0.5, 3, 2, 1e-6)
    cfg = from_dict({"algo": "sa_ac", "iterations": 7, "sampler_steps": 9, "lr_warmup": 2})
    assert (cfg.num_epochs, cfg.num_steps, cfg.lr_warmup_epochs) == (7, 9, 2)


def test_toy_and_image_configs_share_one_vocabulary_of_qualified_names():
    """Toy fields have qualified names ``section.field``; wherever the quantity is the same as an image config field
    the name is the image's, and overrides / the CLI accept them (``split_overrides`` routes the model part)."""
    from sa_theory.algorithms.config import DPOKConfig, qualified_names
    from t2i.config import Config
    from toy_problems.train import ToyConfig, split_overrides

    image = {f"{sec.name}.{f.name}" for sec in dataclasses.fields(Config)
             if dataclasses.is_dataclass(getattr(Config(), sec.name)) for f in dataclasses.fields(getattr(Config(),
                                                                                                       sec.name))}
    toy = set().union(*(qualified_names(c).values() for c in (SAACConfig, DDPOISConfig, DPOKConfig, ToyConfig)))
    same = {"train.seed", "train.num_epochs", "train.gradient_accumulation_steps", "train.num_inner_epochs",
            "train.learning_rate", "train.adam_epsilon", "train.max_grad_norm", "train.beta", "train.kl_penalty",
            "train.early_stop_path_kl", "train.estimator", "train.clip_range", "train.ratio_clamp",
            "sample.batch_size", "sample.num_steps", "value.kind", "value.width", "value.loss", "value.learning_rate",
            "value.fit", "value.epochs", "log.overwrite", "log.progress"}
    assert same <= toy & image, same - (toy & image)
    cfg, tc = split_overrides("sa_ac", {"train.num_epochs": "3", "sample.num_steps": "7", "value.learning_rate": "0.1",
                                        "value.fit": "joint", "value.kind": "residual", "model.pieces": "2",
                                        "env.problem": "gmm2d", "learning_rate": "0.01"})
    assert (cfg.num_epochs, cfg.num_steps, cfg.value_lr, cfg.value_fit, cfg.learning_rate) == (3, 7, 0.1, "joint", 0.01)
    assert (tc.critic, tc.pieces, tc.problem) == ("residual", 2, "gmm2d")
    with pytest.raises(KeyError, match="'train.num_epoch'"):
        split_overrides("sa_ac", {"train.num_epoch": "3"})
    assert "train.num_epochs (int) = 200" in describe(SAACConfig)


def test_config_override_converts_types_and_names_unknown_fields():
    cfg = override(SAACConfig(), {"learning_rate": "3e-3", "num_steps": "25", "progress": "false",
                                  "max_path_kl": "0.5"})
    assert (cfg.learning_rate, cfg.num_steps, cfg.progress, cfg.max_path_kl) == (3e-3, 25, False, 0.5)
    assert override(cfg, {"max_path_kl": "none"}).max_path_kl is None
    with pytest.raises(KeyError, match="'learning_rte'"):
        override(SAACConfig(), {"learning_rte": 1.0})
    with pytest.raises(ValueError, match="'num_steps'"):
        override(SAACConfig(), {"num_steps": "2.5"})
    with pytest.raises(ValueError, match="'progress'"):
        override(SAACConfig(), {"progress": "maybe"})
    assert from_dict(to_dict(cfg)) == cfg


def test_every_config_field_is_documented():
    for cls in (SAACConfig, DDPOISConfig):
        for line in describe(cls).splitlines()[1:]:
            assert "# " in line and len(line.split("# ", 1)[1]) > 5, line


def test_cli_parses_any_field_and_alias():
    ov = parse_overrides(["--steps", "7", "--set", "beta=2", "--kl-penalty=0.5", "--progress", "false"])
    assert ov == {"num_epochs": "7", "beta": "2", "kl_penalty": "0.5", "progress": "false"}
    ov = parse_overrides(["--train.num_epochs", "7", "--sample.num_steps=3"])
    assert ov == {"train.num_epochs": "7", "sample.num_steps": "3"}


def test_cli_train_writes_jsonl_checkpoint_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--batch_size", "32", "--num_steps", "10", "--progress", "false", "--eval_paths", "256",
              "--out", str(out)]
    args = ["train", "--algo", "sa_ac", "--problem", "gauss2d", "--steps", "3", *common]
    assert cli_main(args) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert "closed-form optimum" in capsys.readouterr().out
    assert cli_main(["train", "--algo", "sa_ac", "--problem", "gauss2d", "--steps", "5", *common, "--resume"]) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3, 4]


def test_cli_unknown_field_is_an_error_naming_it(capsys):
    assert cli_main(["train", "--algo", "sa_ac", "--no_such_knob", "1"]) == 2
    assert "no_such_knob" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ logging / errors
@pytest.mark.parametrize("algo", ["sa_ac", "ddpo_sf", "ddpo_is", "dpok"])
def test_jsonl_log_has_the_promised_metrics_in_the_image_namespace(tmp_path, algo):
    log = tmp_path / "m.jsonl"
    s = build(algo, "gauss2d", {**FAST, "num_epochs": 2, "batch_size": 16, "num_steps": 8, "log_path": str(log)})
    s.trainer.train()
    recs = [json.loads(line) for line in open(log)]
    assert len(recs) == 2
    for key in ("reward_mean", "reward_se", "path_kl_mean", "path_kl_se", "objective_mean", "objective_se",
                "train/grad_norm", "train/actor_loss", "queries", "epoch", "lr", "beta", "updates",
                "logprob_parity_max"):
        assert key in recs[-1], key
        assert np.isfinite(recs[-1][key])
    assert [r["queries"] for r in recs] == [16, 32]  # one reward query per path
    assert [r["epoch"] for r in recs] == [0, 1]
    r = recs[-1]
    assert r["objective_mean"] == pytest.approx(r["reward_mean"] - r["beta"] * r["path_kl_mean"])
    # the same names as an image record (t2i.task.ImageTask.record) for the same quantities
    assert not {"reward", "path_kl", "objective", "iteration", "grad_norm"} & set(r)


def test_nan_reward_raises_floating_point_error_naming_the_reward():
    s = build("sa_ac", "gauss2d", {**FAST, "num_epochs": 1, "batch_size": 8, "num_steps": 5})
    s.env.reward = lambda x, cond=None: torch.full((x.shape[0],), float("nan"), dtype=x.dtype)
    with pytest.raises(FloatingPointError, match="reward"):
        s.trainer.train()


def test_policies_start_at_the_pretrained_score():
    for policy in ("residual", "affine"):
        s = build("sa_ac", "gmm2d" if policy == "residual" else "gauss2d", {**FAST, "policy": policy})
        y = torch.randn(64, 2)
        for tau in (0.0, 0.5, 0.99):
            t = torch.tensor(tau)
            assert torch.equal(s.policy(t, y), s.env.pretrained_action(t, y))


def test_pathwise_costate_options_are_validated_and_run():
    with pytest.raises(ValueError, match="'costate'"):
        build("sa_ac", "gauss2d", {**FAST, "costate": "adjoint"})
    with pytest.raises(ValueError, match="solver='euler'"):
        build("sa_ac", "gauss2d", {**FAST, "costate": "pathwise", "solver": "heun"})
    with pytest.raises(ValueError, match="'value_grad_coef'"):
        build("sa_ac", "gauss2d", {**FAST, "value_grad_coef": -1.0})
    with pytest.raises(ValueError, match="'value_lr_schedule'"):
        build("sa_ac", "gauss2d", {**FAST, "value_lr_schedule": "step"})
    with pytest.raises(ValueError, match="'lr_schedule'"):
        build("sa_ac", "gauss2d", {**FAST, "lr_schedule": "step"})
    for ov in ({"costate": "pathwise"}, {"value_grad_coef": 1.0}):
        s = build("sa_ac", "gmm2d", {**FAST, **ov, "num_epochs": 2, "batch_size": 16, "num_steps": 6})
        hist = s.trainer.train()
        assert len(hist) == 2 and np.isfinite(hist[-1]["objective_mean"]) and np.isfinite(hist[-1]["value_loss"])


def test_critic_costates_sit_at_the_step_s_next_state_or_its_left_point_and_estimator_is_validated():
    """``costate='critic_next'`` (default) gives step k the critic's gradient at (tau_{k+1}, Y_{k+1}), 'critic' at
    (tau_k, Y_k), both with the critic's values at the left points; bad names and a non-Euler likelihood-ratio
    estimator raise naming the field."""
    from sa_theory.algorithms import values_on_grid

    with pytest.raises(ValueError, match="'estimator'"):
        build("sa_ac", "gauss2d", {**FAST, "estimator": "reinforce"})
    with pytest.raises(ValueError, match="solver='euler'"):
        build("sa_ac", "gauss2d", {**FAST, "estimator": "likelihood_ratio", "solver": "heun"})
    assert SAACConfig().costate == "critic_next"
    grads = {}
    for where in ("critic_next", "critic"):
        s = build("sa_ac", "gauss2d", {**FAST, "costate": where, "batch_size": 8, "num_steps": 5})
        batch = s.trainer.collect(0)
        v, p = s.trainer.critic.costates(batch)
        rows = slice(1, 6) if where == "critic_next" else slice(0, 5)
        y = batch.states[rows].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(values_on_grid(s.trainer.value, batch.taus[rows], y).sum(), y)
        torch.testing.assert_close(p, g)
        torch.testing.assert_close(v, values_on_grid(s.trainer.value, batch.taus[:5], batch.states[:5]).detach())
        grads[where] = p
    assert not torch.allclose(grads["critic_next"], grads["critic"])
    s = build("sa_ac", "gauss2d", {**FAST, "estimator": "likelihood_ratio", "num_epochs": 2, "batch_size": 16,
                                   "num_steps": 6})
    hist = s.trainer.train()
    assert len(hist) == 2 and np.isfinite(hist[-1]["objective_mean"]) and hist[-1]["train/grad_norm"] > 0


def test_baselines_require_euler_transition_densities():
    with pytest.raises(ValueError, match="solver='euler'"):
        build("ddpo_is", "gauss2d", {**FAST, "solver": "heun"})


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": torch.arange(3)})
    save_checkpoint(path, {"a": torch.arange(4)})
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(4))
    assert os.listdir(tmp_path) == ["ck.pt"]
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("algo,extra", [
    ("sa_ac", {"tau_subset": 4, "lr_schedule": "cosine", "beta_schedule": "linear", "beta_warmup": 3,
               "gradient_accumulation_steps": 2, "critic": "residual", "critic_x0_input": True,
               "value_lr_schedule": "cosine",
               "final_distill_steps": 5, "final_distill_paths": 40}),
    ("ddpo_is", {"lr_warmup_epochs": 2}),
    ("dpok", {}),
])
def test_resume_is_bitwise_exact(tmp_path, algo, extra):
    """Kill after k iterations, resume in a NEW trainer: same parameters and metrics as 2k in one go."""
    k = 3
    ov = {**FAST, "num_epochs": 2 * k, "batch_size": 16, "num_steps": 8, "seed": 7, **extra}
    full = build(algo, "gauss2d", ov)
    full.trainer.train()

    ck = tmp_path / "checkpoints"
    first = build(algo, "gauss2d", {**ov, "checkpoint_dir": str(ck), "log_path": str(tmp_path / "m.jsonl")})
    first.trainer.train(until=k)
    # the process dies here (after iteration k); only the checkpoint and the log survive
    del first
    second = build(algo, "gauss2d", {**ov, "checkpoint_dir": str(ck), "log_path": str(tmp_path / "m.jsonl"),
                                     "seed": 7})
    assert second.trainer.resume()
    assert second.trainer.iteration == k
    second.trainer.train()

    for a, b in zip(_params(full.trainer), _params(second.trainer)):
        assert torch.equal(a, b)
    assert full.trainer.history == second.trainer.history
    logged = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert logged == full.trainer.history


def test_resume_drops_log_records_written_after_the_checkpoint(tmp_path):
    ck, log = tmp_path / "checkpoints", tmp_path / "m.jsonl"
    ov = {**FAST, "num_epochs": 4, "batch_size": 8, "num_steps": 5, "checkpoint_dir": str(ck),
          "log_path": str(log), "checkpoint_every": 2}
    s = build("sa_ac", "gauss2d", ov)
    s.trainer.train(until=2)  # checkpoint at iteration 2
    s.trainer.train(until=3)  # iteration 3 is logged, then the run dies before the next checkpoint
    shutil.rmtree(ck / "checkpoint-000003")  # (the end-of-call checkpoint at 3 is undone to simulate that)
    (ck / "latest").write_text("checkpoint-000002")
    assert [json.loads(line)["epoch"] for line in open(log)] == [0, 1, 2]
    s2 = build("sa_ac", "gauss2d", ov)
    assert s2.trainer.resume() and s2.trainer.iteration == 2
    assert [json.loads(line)["epoch"] for line in open(log)] == [0, 1]


# ------------------------------------------------------------------------------------------ convergence
@pytest.fixture(scope="module")
def lg_problem():
    return make_problem("gauss2d", 1.0)


def _train_lg(iterations, pieces, batch_size=128, lr=0.02, seed=0, problem="gauss2d"):
    s = build("sa_ac", problem, {**FAST, "policy": "affine", "pieces": pieces, "num_epochs": iterations,
                                 "batch_size": batch_size, "learning_rate": lr, "lr_schedule": "cosine", "seed": seed})
    s.trainer.train()
    return s


def _check_lg_convergence(prob, s, pieces, rel_tol, law_tol, gap_tol=0.05):
    """Objective within ``rel_tol`` of the closed-form optimum of the piecewise-affine class (exact
    evaluation, no Monte Carlo), >= 1 - ``gap_tol`` of the gap pretrained -> optimum closed (measured:
    97.3% with 1 piece; the rest is the learned critic's gradient bias at the actor's fixed point -- the
    N=20 chain's own optimum closes 99.2%, so it is not discretisation), terminal
    mean/cov within ``law_tol`` of the class optimum's; the class optimum's law is itself compared with
    the fixed-init optimal law a* (theory.md R2: not the tilt) for M >= 4 pieces."""
    J_opt, theta_opt = affine_class_optimum(prob, pieces)
    got = prob.exact_terms(s.policy.theta_numpy(), pieces)
    J_pre = prob.exact_objective(np.zeros(prob.n_params(1)), 1)
    assert abs(got["objective"] - J_opt) <= rel_tol * abs(J_opt)
    assert (got["objective"] - J_pre) / (J_opt - J_pre) >= 1 - gap_tol
    best = prob.exact_terms(theta_opt, pieces)
    np.testing.assert_allclose(got["mean"], best["mean"], atol=law_tol)
    np.testing.assert_allclose(got["cov"], best["cov"], atol=law_tol)
    return got, best


def test_actor_critic_reaches_the_affine_class_optimum_on_a_2d_gaussian(lg_problem):
    """1 piece (constant K, k): within 2% of the class optimum after 60 iterations of 128 paths."""
    _check_lg_convergence(lg_problem, _train_lg(60, pieces=1), 1, rel_tol=0.02, law_tol=0.05)


def test_actor_critic_with_the_joint_critic_loss_reaches_the_affine_class_optimum(lg_problem):
    """``value_fit='joint'`` (the image default): the critic is fitted only by its regression loss inside each actor
    update (4 Adam steps per iteration instead of the separate phase's 20, hence value_lr 1e-2), and the actor still
    reaches the class optimum within 2% (measured 1.35%, gap closed 96.9%; MC targets; TD(0) 1.1%). Negative
    control: leaving the critic loss out of the update (the critic stays at its initialisation) closes 3% of the gap
    (measured), far outside the tolerance."""
    s = build("sa_ac", "gauss2d", {**FAST, "policy": "affine", "pieces": 1, "num_epochs": 60, "batch_size": 128,
                                   "learning_rate": 0.02, "lr_schedule": "cosine", "seed": 0, "value_fit": "joint",
                                   "value_lr": 1e-2})
    assert s.trainer.joint_value and len(s.trainer.optimizer.param_groups) == 2
    v0 = [p.detach().clone() for p in s.trainer.value.parameters()]
    s.trainer.train()
    assert "value_loss" not in s.trainer.history[-1] and s.trainer.history[-1]["train/critic_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(v0, s.trainer.value.parameters()))
    _check_lg_convergence(lg_problem, s, 1, rel_tol=0.02, law_tol=0.05)


def test_joint_critic_fit_is_validated_and_trains_the_dpok_baseline():
    with pytest.raises(ValueError, match="'value_fit'"):
        build("sa_ac", "gauss2d", {**FAST, "value_fit": "both"})
    with pytest.raises(ValueError, match="'value_fit'.*value_grad_coef"):
        build("sa_ac", "gmm2d", {**FAST, "value_fit": "joint", "value_grad_coef": 1.0})
    s = build("dpok", "gauss2d", {**FAST, "value_fit": "joint", "num_epochs": 3, "batch_size": 16,
                                  "num_steps": 6})
    v0 = [p.detach().clone() for p in s.trainer.value.parameters()]
    hist = s.trainer.train()
    assert all(np.isfinite(h["train/critic_loss"]) and h["train/critic_loss"] > 0 for h in hist)
    assert any(not torch.equal(a, b) for a, b in zip(v0, s.trainer.value.parameters()))


@pytest.mark.slow
def test_actor_critic_reaches_the_4_piece_class_optimum_and_the_fixed_init_optimal_law(lg_problem):
    s = _train_lg(150, pieces=4, batch_size=256, lr=0.01)
    got, best = _check_lg_convergence(lg_problem, s, 4, rel_tol=0.02, law_tol=0.05)
    m_star, C_star = lg_problem.optimal_terminal_law(init_optimised=False)  # fixed init, not the tilt
    np.testing.assert_allclose(got["mean"], m_star, atol=0.08)
    np.testing.assert_allclose(got["cov"], C_star, atol=0.08)


@pytest.mark.slow
def test_actor_critic_on_the_memory_ou_problem_targets_the_fixed_init_optimum():
    """OU b=1, T=1 remembers Y_0: the learned terminal mean must approach the fixed-init optimum, whose
    mean differs from the tilt's (theory.md R2)."""
    prob = make_problem("ou2d", 1.0)
    s = _train_lg(150, pieces=4, batch_size=256, lr=0.01, problem="ou2d")
    got = prob.exact_terms(s.policy.theta_numpy(), 4)
    m_fixed, _ = prob.optimal_terminal_law(init_optimised=False)
    m_tilt, _ = prob.tilted_law()
    assert np.linalg.norm(got["mean"] - m_fixed) < np.linalg.norm(got["mean"] - m_tilt)


def _gmm_check(s, n=8192, steps=None, policy=None):
    """Soft-assignment weights and means of learned (``policy``, default the trained one) vs exact (fixed-init
    optimum) terminal samples, and their combined (independent-sample) Monte-Carlo standard errors."""
    prob = s.prob
    W, M, C = prob.tilted_law()
    ev = s.trainer.evaluate(n, steps=steps or s.cfg.num_steps, return_samples=True, beta=prob.beta,
                            policy=policy)
    x = ev["final"].double().numpy()
    ex = prob.sample_optimal_terminal(n, rng=123)
    w_hat, m_hat = mixture_statistics(x, W, M, C)
    w_ex, m_ex = mixture_statistics(ex, W, M, C)
    se_w = np.sqrt(2 * W * (1 - W) / n)
    se_m = np.sqrt(2 * np.einsum("kii->ki", C) / (n * W[:, None]))
    return w_hat, w_ex, m_hat, m_ex, se_w, se_m, W, M


@pytest.mark.slow
def test_residual_mlp_policy_reaches_the_unrestricted_optimum_on_a_2d_gaussian():
    s = build("sa_ac", "gauss2d", {**FAST, "num_epochs": 300, "batch_size": 256, "learning_rate": 3e-3,
                                   "lr_schedule": "cosine", "num_steps": 50})
    s.trainer.train()
    ev = s.evaluate(steps=200, n_paths=16384)
    J_star = s.prob.optimal_objective()
    assert abs(ev["objective"] - J_star) <= 0.02 * abs(J_star) + 4 * ev["objective_se"]


def test_actor_with_exact_costates_reaches_the_tilted_mixture():
    """The actor step alone (trust-region surrogate, residual MLP policy) on the Gaussian mixture, with the
    critic replaced by the exact value gradient p = beta (a* - s) = grad V*: the learned terminal law's
    mode weights and means match exact samples of the tilted mixture within 4 combined Monte-Carlo SE
    (16384 paths each, evaluated with 200 Euler steps; the N = 200 chain of a* itself is within 1.5 SE).
    Measured: weights 0.0695 / 0.501 / 0.430 against 0.0656 / 0.504 / 0.431. This checks the actor and
    the policy class. With the critic learned in the loop, the critic's greedy policy is within 4 SE (next
    test) but the actor network lags it (small-mode weight 0.073-0.080 over seeds and critic settings) until it is
    distilled onto that greedy policy at the end (``final_distill_steps``); with
    the sampled pathwise costates (``costate='pathwise'``, the N-step chain's gradient) 0.092-0.098."""
    s = build("sa_ac", "gmm2d", {**FAST, "num_epochs": 300, "batch_size": 256, "num_steps": 20,
                                 "learning_rate": 1e-2, "lr_schedule": "cosine", "num_inner_epochs": 8,
                                 "kl_penalty": 0.1, "critic": "tweedie"})
    prob = s.prob
    pre, opt = prob.action_fns()

    def exact_costates(batch):
        N = batch.taus.numel() - 1
        p = torch.stack([prob.beta * (opt(batch.taus[k], batch.states[k]) - pre(batch.taus[k], batch.states[k]))
                         for k in range(N)])
        return torch.zeros(p.shape[:2], dtype=p.dtype), p.detach()

    s.trainer.critic.costates = exact_costates
    s.trainer.train()
    w_hat, w_ex, m_hat, m_ex, se_w, se_m, W, _ = _gmm_check(s, n=16384, steps=200)
    assert np.all(np.abs(w_hat - w_ex) < 4 * se_w), (w_hat, w_ex, se_w)
    assert np.all(np.abs(m_hat - m_ex) < 4 * se_m), (m_hat, m_ex, se_m)
    # sensitivity: the pretrained weights are > 15 SE from the tilted ones (and the learned critics' small-mode
    # weight, 0.073-0.080, is 2-5 SE off)
    assert np.all(np.abs(prob.weights - W) > 15 * se_w)


def test_full_actor_critic_on_the_mixture_reaches_the_tilted_mixture():
    """The full actor-critic (critic learned in the loop; figure-6 settings ``GMM_SA_AC``: residual critic seeing
    x0_hat, 300 iterations x 256 paths, N = 20, then 4000 steps distilling the actor onto the final critic's greedy
    policy s + grad V_psi / beta): the actor's terminal law and the greedy policy's both have the exact tilted
    mixture's mode weights and means within 4 combined Monte-Carlo SE (16384 paths each, 200 Euler steps).
    Measured (seeds 0 / 1), small-mode weight against 0.0656 for the exact samples (exact W 0.0683, SE 0.0028):
    actor 0.0705 / 0.0711, greedy 0.0702 / 0.0706; largest |z| over weights and means 2.4 / 3.1 (actor),
    2.6 / 2.9 (greedy); seeds 2 / 3: actor 3.7 / 2.5, greedy 3.6 / 2.8 (the distilled actor follows its critic;
    what is left is the critic's error). Without the distillation the actor lags its critic: 0.0754 / 0.0788,
    |z| 3.5 / 4.7 (sa_ac module docstring). Negative controls: the pretrained weights are > 15 SE off; the greedy
    policy of the *pretrained* value r(x0_hat) 8.5 SE off; with beta off by 25% in the greedy formula, 16 SE."""
    from figures._common import GMM_SA_AC

    s = build("sa_ac", "gmm2d", {**FAST, **GMM_SA_AC, "num_epochs": 300, "batch_size": 256, "num_steps": 20})
    s.trainer.train()
    prob, tr = s.prob, s.trainer
    last = tr.history[-1]
    assert last["distill_kl_after"] < 0.2 * last["distill_kl_before"], last  # measured 0.0009 vs 0.021 nats/path
    for policy in (None, tr.greedy_policy()):  # the distilled actor, the critic's greedy policy
        w_hat, w_ex, m_hat, m_ex, se_w, se_m, W, _ = _gmm_check(s, n=16384, steps=200, policy=policy)
        assert np.all(np.abs(w_hat - w_ex) < 4 * se_w), (policy, w_hat, w_ex, se_w)
        assert np.all(np.abs(m_hat - m_ex) < 4 * se_m), (policy, m_hat, m_ex, se_m)
    assert np.all(np.abs(prob.weights - W) > 15 * se_w)
    pretrained_value = make_critic(prob, dataclasses.replace(s.toy, critic="tweedie"))
    for wrong in (GreedyPolicy(pretrained_value, tr.env.pretrained_action, prob.beta),
                  tr.greedy_policy(beta=1.25 * prob.beta)):  # a wrong formula (beta off by 25%) fails too
        w_bad = _gmm_check(s, n=16384, steps=200, policy=wrong)[0]
        assert np.any(np.abs(w_bad - w_ex) > 4 * se_w), (w_bad, w_ex)
    with pytest.raises(ValueError, match="beta"):
        tr.greedy_policy(beta=0.0)


def test_distill_loss_is_the_per_path_sum_of_the_steps_girsanov_kl():
    r"""``distill_loss`` (all steps in one call) is :math:`\sum_k \frac{w_k d\tau}{2}|\mu_\theta(\tau_k, Y_k) - a_k|^2`
    per path, with :math:`w_k` the SDE's KL weight rate at the step's left point, written out here step by step in
    numpy (1e-5 relative in the policy's float32); half the weight fails it, and so does the next grid point's."""
    from sa_theory.algorithms.distill import distill_loss

    s = build("sa_ac", "gmm2d", {**FAST, "num_epochs": 1, "batch_size": 8, "num_steps": 6, "critic": "tweedie",
                                 "policy": "residual"})
    tr, g = s.trainer, torch.Generator().manual_seed(3)
    dt = next(tr.policy.parameters()).dtype
    N, B, dtau = 6, 8, float(s.prob.schedule.T) / 6
    taus = torch.arange(N + 1, dtype=dt) * dtau
    states, target = (torch.randn(N, B, 2, generator=g, dtype=torch.float64).to(dt) for _ in range(2))
    got = distill_loss(tr, taus[:-1], dtau, states, target).detach().double().numpy()
    with torch.no_grad():
        mu = torch.stack([tr.policy(taus[k], states[k]) for k in range(N)]).double().numpy()
    w = np.array([float(tr.env.sde.kl_weight_rate(taus[k].double())) for k in range(N + 1)])
    sq = ((mu - target.double().numpy()) ** 2).sum(-1)  # (N, B)
    exact = (0.5 * w[:N, None] * dtau * sq).sum(0)
    np.testing.assert_allclose(got, exact, rtol=1e-12 if dt == torch.float64 else 1e-5)
    for wrong in (0.25 * w[:N, None] * dtau * sq, 0.5 * w[1:, None] * dtau * sq):
        assert np.abs(wrong.sum(0) - got).max() > 1e-3 * np.abs(exact).max()


def test_distill_reproduces_its_target_policy_and_validates_its_arguments():
    """``Trainer.distill(target)`` regresses the actor onto ``target`` on its own fresh paths (no reward
    queries): from the pretrained actor onto the exact optimal action a* of the mixture (2000 steps, 4096 paths)
    the actor's terminal law has the tilted mixture's weights and means within 4 combined SE (16384 paths, 200
    steps; measured small-mode weight 0.0694, |z| <= 1.4; the pretrained law is > 15 SE off), and the held-out
    path KL to the target drops from 0.60 to 0.0045 nats per path. Bad arguments raise naming the field."""
    s = build("sa_ac", "gmm2d", {**FAST, "num_epochs": 1, "batch_size": 256, "num_steps": 20,
                                 "critic": "tweedie"})
    tr = s.trainer
    _, opt = s.prob.action_fns()
    queries = tr.queries
    out = tr.distill(target=opt, steps=2000, paths=4096, lr=1e-2)
    assert tr.queries == queries
    assert out["distill_kl_after"] < 0.02 * out["distill_kl_before"], out
    w_hat, w_ex, m_hat, m_ex, se_w, se_m, W, _ = _gmm_check(s, n=16384, steps=200)
    assert np.all(np.abs(w_hat - w_ex) < 4 * se_w), (w_hat, w_ex, se_w)
    assert np.all(np.abs(m_hat - m_ex) < 4 * se_m), (m_hat, m_ex, se_m)
    for kw, name in (({"steps": 0}, "final_distill_steps"), ({"steps": 1, "paths": 0}, "final_distill_paths"),
                     ({"steps": 1, "lr": 0.0}, "final_distill_lr")):
        with pytest.raises(ValueError, match=name):
            tr.distill(target=opt, **kw)
    with pytest.raises(ValueError, match="final_distill_steps"):
        build("sa_ac", "gmm2d", {**FAST, "final_distill_steps": -1})
    with pytest.raises(ValueError, match="final_distill_lr"):  # at construction, not after the training run
        build("sa_ac", "gmm2d", {**FAST, "final_distill_steps": 5, "final_distill_lr": 0.0})


def test_log_ratio_value_targets_are_unbiased_and_nearly_deterministic_at_the_optimum():
    """``value_loss='mc_cv'``: R - beta sum_{j>=k} lambda_j (sampled Euler log-ratios) has the same mean as the
    'mc' target R - beta sum l_j (their difference is a martingale: |mean| < 4 SE), and under the optimal policy
    a* it is V*(tau_k, Y_k) up to O(dtau): its spread around the closed-form V* is a small fraction of the 'mc'
    target's. Negative control: under a non-optimal policy (s + 2(a* - s)) the variance reduction is gone."""
    from torch import nn

    class Fixed(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f, self.dummy = f, nn.Parameter(torch.zeros(()))

        def forward(self, tau, y, cond=None):
            return self.f(tau, y, cond)

    s = build("sa_ac", "gmm2d", {**FAST, "batch_size": 4096, "num_steps": 100, "value_loss": "mc_cv",
                                 "critic": "tweedie"})
    prob, tr = s.prob, s.trainer
    pre, opt = prob.action_fns()

    def spreads(policy):
        tr.policy = Fixed(policy)
        batch = tr.collect(0)
        cv = tr.critic.value_targets(batch, prob.beta)
        tr.critic.cfg = override(tr.cfg, {"value_loss": "mc"})
        mc = tr.critic.value_targets(batch, prob.beta)
        tr.critic.cfg = tr.cfg
        out = []
        for k in (0, 50):
            d = (cv[k] - mc[k]).double().numpy()
            assert abs(d.mean()) < 4 * d.std(ddof=1) / np.sqrt(d.size), (k, d.mean(), d.std())
            v_star = prob.optimal_value(float(batch.taus[k]), batch.states[k].double().numpy())
            out.append(np.std(cv[k].double().numpy() - v_star) / np.std(mc[k].double().numpy() - v_star))
        return np.array(out)

    ratio = spreads(opt)
    assert np.all(ratio < 0.25), ratio
    bad = spreads(lambda tau, y, cond=None: pre(tau, y) + 2 * (opt(tau, y) - pre(tau, y)))
    assert np.all(bad > 0.5), bad
    with pytest.raises(ValueError, match="mc_cv"):
        build("sa_ac", "gauss2d", {**FAST, "value_loss": "mc_cv", "solver": "heun"})


def test_toy_early_stop_on_the_path_kl_to_the_old_policy_cuts_the_actor_updates():
    """``early_stop_path_kl`` (the images' trust-region early stop) on a toy: the first update of an iteration is at
    the sampling policy (KL to old 0), so with a tiny threshold every iteration stops after its second of four."""
    over = {**FAST, "num_epochs": 2, "num_inner_epochs": 4, "batch_size": 16, "num_steps": 5}
    hist = build("sa_ac", "gauss2d", {**over, "early_stop_path_kl": 1e-12}).trainer.train()
    assert [(h["updates"], h["early_stopped"]) for h in hist] == [(2, True), (2, True)]
    hist = build("sa_ac", "gauss2d", over).trainer.train()
    assert [(h["updates"], h["early_stopped"]) for h in hist] == [(4, False), (4, False)]
    with pytest.raises(ValueError, match="early_stop_path_kl"):
        build("sa_ac", "gauss2d", {**over, "early_stop_path_kl": -1.0})
