"""The digits experiment (issue #6): data, cached pretraining, rewards, a reduced end-to-end run.

The default suite trains a very small model (``digits.experiment.QUICK()``: 150 pretraining steps) into a
temporary cache shared by the session (``$TMPDIR/sa_digits_test_cache``; reused by config hash), then runs
``sa_ac`` for a few iterations through ``t2i.trainer.Trainer`` and checks that the reward rises and the path
KL is finite. The full experiment is ``-m slow``.
"""

import math
import os
import tempfile
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

TEST_CACHE = os.path.join(tempfile.gettempdir(), "sa_digits_test_cache")


@pytest.fixture(scope="module")
def quick_assets():
    from digits.experiment import QUICK, prepare_assets

    ec = QUICK()
    return ec, prepare_assets(ec, TEST_CACHE)


def test_data_split_is_fixed_and_in_range():
    from digits.data import ALL_PROMPTS, digit_of_prompt, load_split

    x, y = load_split("train")
    xt, yt = load_split("test", resolution=16)
    assert x.shape[1:] == (1, 8, 8) and xt.shape[1:] == (1, 16, 16)
    assert len(x) + len(xt) == 1797 and float(x.min()) >= -1 and float(x.max()) <= 1
    assert set(y.tolist()) == set(range(10)) == set(yt.tolist())
    assert [digit_of_prompt(p) for p in ALL_PROMPTS] == list(range(10))
    assert torch.equal(load_split("train")[0], x)


def test_pretrained_model_is_cached_by_config_hash_and_loads_in_t2i(quick_assets):
    from digits.pretrain import config_hash, pretrain
    from t2i.models import PixelPipeline, decode_latents, load_pipeline

    ec, assets = quick_assets
    t0 = time.time()
    assert pretrain(ec.pretrain, TEST_CACHE) == assets["model"]  # second call: cache hit
    assert time.time() - t0 < 5
    assert os.path.basename(assets["model"]) == config_hash(ec.pretrain)
    other = type(ec.pretrain)(**{**ec.pretrain.__dict__, "seed": 1})
    assert config_hash(other) != config_hash(ec.pretrain)
    assert os.path.isfile(os.path.join(assets["model"], "unet", "config.json"))
    pipe = load_pipeline(assets["model"])
    assert isinstance(pipe, PixelPipeline)
    img = decode_latents(pipe, torch.rand(2, 1, 8, 8) * 2 - 1)
    assert img.shape == (2, 3, 8, 8) and 0 <= float(img.min()) and float(img.max()) <= 1


def test_rewards_classifiers_trained_on_real_digits_only(quick_assets):
    from digits.data import ALL_PROMPTS, load_split
    from t2i.rewards import make_reward

    ec, assets = quick_assets
    assert assets["digit_classifier_info"]["test_accuracy"] > 0.85  # held-out real digits
    x, y = load_split("test")
    imgs = ((x + 1) / 2).expand(-1, 3, -1, -1)[:40]
    prompts = [ALL_PROMPTS[int(k)] for k in y[:40]]
    bold = make_reward("digit_bold", weights_path=assets["reward_classifier_path"])
    r = bold(imgs, prompts)
    assert r.shape == (40,) and float(r.min()) >= 0 and float(r.max()) <= 1 and bold.differentiable
    thick = (imgs * 1.3).clamp(0, 1)  # more ink -> bolder
    assert float(bold(thick, prompts).mean()) > float(r.mean())
    jpeg = make_reward("jpeg_compress")(imgs, prompts)
    assert jpeg.shape == (40,) and torch.isfinite(jpeg).all()


def test_reduced_experiment_reward_rises_and_kl_is_finite(quick_assets, tmp_path):
    """sa_ac, 4 iterations of 8 samples: final policy vs pretrained on the same 40 prompts/noise.
    SE of the difference: Welch, sqrt(s1^2/n + s0^2/n) (conservative: the samples share the noise)."""
    from digits.experiment import evaluate_policy, run_finetune
    from t2i.models import add_lora, load_pipeline
    from t2i.scheduling import make_kernel

    ec, assets = quick_assets
    pipe = load_pipeline(assets["model"])
    add_lora(pipe.unet, ec.lora_rank, init_seed=0)
    _, kern = make_kernel(pipe.scheduler.config, "ddim", ec.num_steps, 1.0)
    pre = evaluate_policy(pipe, kern, assets, ec, use_pretrained=True, solvers=False)
    r = run_finetune(ec, assets, "sa_ac", 0, ec.num_steps, str(tmp_path / "run"))
    fin = r["final"]
    se = math.hypot(fin["reward_se"], pre["reward_se"])
    assert fin["reward_mean"] - pre["reward_mean"] > 3 * se, (pre["reward_mean"], fin["reward_mean"], se)
    assert math.isfinite(fin["path_kl_mean"]) and fin["path_kl_mean"] > 0
    assert all(math.isfinite(v) for v in r["path_kl"])
    for k in ("diversity_mean", "fd", "eval_accuracy", "reward_dpmsolver_mean", "reward_ode_mean"):
        assert math.isfinite(fin[k]), k


@pytest.mark.slow
def test_full_experiment_runs(tmp_path):
    """All methods, 3 seeds, the step sweep and figures, 2 worker processes (measured 19.4 min on 2 cores, plus
    7 min of pretraining on a cold cache)."""
    import json

    from digits.experiment import main

    assert main(["--out", str(tmp_path), "--workers", "2"]) == 0
    for name in ("fig1_reward_vs_queries", "fig2_steps", "fig3_solver", "fig4_grids"):
        assert os.path.isfile(tmp_path / f"digits_{name}.png")
    bench = json.load(open(tmp_path / "benchmark.json"))
    assert set(bench["methods"]) == {"sa_ac", "ddpo_sf", "ddpo_is", "dpok"}
    pre = bench["pretrained"][str(bench["K"])]["reward_mean"]
    for m, r in bench["methods"].items():
        assert r["seeds"] == 3 and math.isfinite(r["final"]["path_kl_mean"]["mean"]), m
    assert bench["methods"]["sa_ac"]["final"]["reward_mean"]["mean"] > pre
