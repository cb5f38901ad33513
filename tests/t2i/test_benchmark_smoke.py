"""The benchmark scripts run in their tiny CPU smoke modes (so they do not rot)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_t2i_gpu_benchmark_tiny_mode_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("t2i_gpu", os.path.join(ROOT, "benchmarks", "t2i_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    res = mod.main(["--tiny", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    assert out.exists() and [r["method"] for r in res["rows"]] == ["sa_ac", "ddpo_is"]
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
    assert set(data["methods"]) == {"sa_ac", "ddpo_sf", "ddpo_is", "dpok"}
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
