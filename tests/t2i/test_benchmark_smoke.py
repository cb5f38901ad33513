"""The benchmark scripts run in their tiny CPU smoke modes (so they do not rot)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("frozen", [False, True])
def test_t2i_gpu_benchmark_tiny_mode_runs(tmp_path, frozen):
    spec = importlib.util.spec_from_file_location("t2i_gpu", os.path.join(ROOT, "benchmarks", "t2i_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    res = mod.main(["--tiny", "--workdir", str(tmp_path / "w"), "--out", str(out)] + ["--frozen-uncond"] * frozen)
    suffix = "_frozen_uncond" * frozen
    assert out.exists() and [r["method"] for r in res["rows"]] == ["sa_ac" + suffix, "ddpo_is" + suffix]
    assert all(r["train_samples_per_s"] > 0 and r["sampling_images_per_s"] > 0 for r in res["rows"])
    assert res["rows"][0]["unet_fwd_tflops_cfg_batch"] > 0


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_t2i_cost_benchmark_quick_counts_forwards_from_the_config_arithmetic(tmp_path):
    """bench_t2i_cost --quick: JSON schema, and the UNet forward rows counted by the hook agree with what the
    tiny_cpu preset implies. Per image: sampling = K steps x (1 + CFG) policy rows, plus at most one
    reference pass of the same size; training (ddpo_is) = one policy forward of (1 + CFG) rows per trained
    step. Counting UNet calls instead of batch rows, or missing the CFG half, breaks these equalities."""
    import json
    import math

    from t2i.config import get_preset

    out = tmp_path / "cost.json"
    mod = _load_benchmark("bench_t2i_cost")
    mod.main(["--quick", "--no-warmup", "--out", str(out)])
    data = json.loads(out.read_text())
    c = mod.make_config("ddpo_is", str(tmp_path), quick=True)
    assert c.model.pretrained == get_preset("tiny_cpu").model.pretrained == "tiny"
    K, rows = c.sample.num_steps, 1 + (c.sample.guidance_scale != 1.0)
    n = c.sample.batch_size * c.sample.num_batches_per_epoch * c.train.num_epochs
    policy_sampling = K * rows * n
    policy_training = round(K * c.train.timestep_fraction) * rows * n * c.train.num_inner_epochs
    assert rows == 2 and data["config"]["policy_sampling_forwards"] == policy_sampling
    assert set(data["methods"]) == {"sa_ac", "ddpo_sf", "ddpo_is", "dpok", "ddpo_is_noref", "sa_ac_frozen_uncond",
                                    "ddpo_is_noref_frozen_uncond"}
    # model.lora_uncond false: the reference shares the policy's (pretrained) unconditional rows: 3/2 of the
    # policy rows with the reference, the policy rows without it; the update pass recomputes both halves
    frozen = {m: data["methods"][m + "_frozen_uncond"] for m in ("sa_ac", "ddpo_is_noref")}
    assert frozen["sa_ac"]["forwards_sampling"] == 3 * policy_sampling // 2
    assert frozen["ddpo_is_noref"]["forwards_sampling"] == policy_sampling
    assert frozen["sa_ac"]["forwards_training"] == data["methods"]["sa_ac"]["forwards_training"]
    assert frozen["ddpo_is_noref"]["forwards_training"] == policy_training
    assert data["ratio_sa_ac_frozen_uncond_over_ddpo_is_noref_frozen_uncond"]["forwards"] == (
        frozen["sa_ac"]["forwards"] / frozen["ddpo_is_noref"]["forwards"])
    # DDPO-IS without the reference pass samples exactly the policy rows; with it, twice as many
    assert data["methods"]["ddpo_is_noref"]["forwards_sampling"] == policy_sampling
    assert data["methods"]["ddpo_is"]["forwards_sampling"] == data["methods"]["sa_ac"]["forwards_sampling"] == \
        2 * policy_sampling
    for m, r in data["methods"].items():
        for key in ("forwards_per_query", "seconds_per_query", "cpu_seconds_per_query", "peak_mem_mb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (m, key)
        for key in ("forwards", "forwards_sampling", "forwards_training", "queries"):
            assert isinstance(r[key], int) and r[key] > 0, (m, key)
        assert r["queries"] == n and r["forwards"] == r["forwards_sampling"] + r["forwards_training"]
        assert r["forwards_per_query"] == r["forwards"] / n
        assert policy_sampling <= r["forwards_sampling"] <= 2 * policy_sampling, m
        assert r["forwards_training"] >= policy_training, m
    assert data["methods"]["ddpo_is"]["forwards_training"] == policy_training
    q = data["ratio_sa_ac_over_ddpo_is"]
    assert (
        q["forwards"]
        == data["methods"]["sa_ac"]["forwards_per_query"] / data["methods"]["ddpo_is"]["forwards_per_query"]
    )


def test_t2i_gpu_benchmark_sd35m_tiny_mode_reports_every_method_and_step_count(tmp_path):
    """--arch sd35m --tiny: the SD3.5-M code path (trainer on the sd35m_* presets, flow sampler, row counting,
    FLOP counting, MFU, JSON) on the tiny SD3 pipeline. Every (K, method) cell has sampling, training and MFU
    fields; a rollout calls the transformer with CFG's doubled batch for the policy and the reference at every
    step (4 K B rows); the MFU is the counted FLOPs over time and peak."""
    import json
    import math

    out = tmp_path / "sd35m.json"
    mod = _load_benchmark("t2i_gpu")
    res = mod.main(["--tiny", "--arch", "sd35m", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["arch"] == "sd35m" and data["tiny"] and data["steps"] == [2, 4] and not data["skipped"]
    assert [(r["steps"], r["method"]) for r in data["rows"]] == [(K, m) for K in (2, 4) for m in ("sa_ac", "flow_grpo")]
    assert data["text_tokens"] == 77 + 16 and data["transformer_params"] > 0  # tiny: T5 length 16
    B, peak = data["batch"], data["peak_tflops"] * 1e12
    for r in data["rows"]:
        assert "error" not in r, r
        for key in ("sampling_images_per_s", "train_samples_per_s", "sampling_mfu", "mfu", "train_iter_s",
                    "transformer_fwd_tflops_per_row", "train_tflops"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["method"], key)
        for key in ("sampling_peak_gb", "train_peak_gb"):
            assert key in r  # NaN on CPU
        assert r["rows_sampling"] == 4 * r["steps"] * B and r["rows_train_grad"] > 0
        assert r["rows_train_no_grad"] >= r["rows_sampling"]  # the epoch's own rollout
        flops = r["transformer_fwd_tflops_per_row"] * 1e12 * (r["rows_train_no_grad"] + 3 * r["rows_train_grad"])
        assert math.isclose(r["train_tflops"] * 1e12, flops, rel_tol=1e-9)
        assert math.isclose(r["mfu"], flops / r["train_iter_s"] / peak, rel_tol=1e-9)
    assert res["rows"][0]["method"] == "sa_ac"


def test_sd35m_transformer_config_is_sd35_medium_on_the_meta_device():
    """The hard-coded SD3.5-Medium transformer, built on the meta device (no memory): 2.24 B parameters (2.2-2.5 B),
    24 joint blocks of width 24 x 64 = 1536, dual attention in blocks 0-12; at 512 px (latent 64x64 -> 1024
    patches) with 333 text tokens it maps (1, 16, 64, 64) to itself at ~2.44 TFLOP per row."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    arch = _load_benchmark("t2i_gpu_arch")
    m = arch.sd35m_transformer("meta")
    n = sum(p.numel() for p in m.parameters())
    assert 2.2e9 <= n <= 2.5e9, n
    assert len(m.transformer_blocks) == 24 and m.config.caption_projection_dim == 1536 == m.inner_dim
    assert [i for i, b in enumerate(m.transformer_blocks) if b.use_dual_attention] == list(range(13))
    m.register_to_config(sample_size=64)
    with torch.device("meta"):
        x, e, p = torch.randn(1, 16, 64, 64), torch.randn(1, 333, 4096), torch.randn(1, 2048)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = m(hidden_states=x, timestep=torch.full((1,), 500.0, device="meta"), encoder_hidden_states=e,
                pooled_projections=p, return_dict=False)[0]
    assert out.shape == (1, 16, 64, 64) and out.device.type == "meta"
    assert 2.3e12 <= fc.get_total_flops() <= 2.6e12, fc.get_total_flops()


def test_t2i_gpu_benchmark_sd35m_wall_clock_guard_skips_cells_and_keeps_results(tmp_path):
    """--time-budget: a cell predicted (from the seconds per step so far) to end past the budget is skipped and
    named in the JSON with the reason; the finished cell stays. (2 s: the first tiny cell, K = 2, runs; the
    K = 40 one is predicted at 20x its time.)"""
    import json

    out = tmp_path / "sd35m.json"
    _load_benchmark("t2i_gpu").main(["--tiny", "--arch", "sd35m", "--methods", "flow_grpo", "--steps", "20", "400",
                                     "--time-budget", "2", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["steps"] == [2, 40] and [(r["steps"], "error" in r) for r in data["rows"]] == [(2, False)]
    assert [(s["steps"], s["method"]) for s in data["skipped"]] == [(40, "flow_grpo")]
    assert "predicted" in data["skipped"][0]["reason"]
