"""The GPU benchmark script runs in its tiny CPU smoke mode (so it does not rot)."""

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
