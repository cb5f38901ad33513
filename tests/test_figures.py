"""Every figure script runs in quick mode and writes a non-empty PNG of the promised size."""

from __future__ import annotations

import importlib

import matplotlib.image as mpimg
import pytest

from figures.make_all import FIGURES


@pytest.mark.parametrize("num", sorted(FIGURES))
def test_figure_runs_in_quick_mode(tmp_path, num):
    mod = importlib.import_module(FIGURES[num])
    res = mod.run(str(tmp_path), quick=True)
    img = mpimg.imread(res["path"])
    assert img.shape[1] >= 800 and img.shape[0] >= 400
    assert img.std() > 0.01  # not blank


def test_make_all_prints_a_summary_table(tmp_path, capsys):
    from figures.make_all import make_all

    make_all(str(tmp_path), quick=True, only=[5])
    out = capsys.readouterr().out
    assert "fig5_estimator_variance.png" in out and "total" in out


def test_make_all_runs_figures_in_worker_processes_and_rejects_bad_input(tmp_path, capsys):
    from figures.make_all import make_all

    done = []
    rows = make_all(str(tmp_path), quick=True, only=[7, 5], workers=2, on_done=lambda k, s: done.append((k, s)))
    assert sorted(k for k, _ in done) == ["toy/fig5", "toy/fig7"] and all(s > 0 for _, s in done)
    from figures.reproduce import expected_jobs

    assert {k for k, _ in done} <= set(expected_jobs(skip_digits=True))  # the overall bar's keys
    assert [r["figure"] for r in rows] == [7, 5]  # summary in the requested order, whatever finished first
    assert (tmp_path / "fig5_estimator_variance.png").is_file() and (tmp_path / "fig7_value_ablation.png").is_file()
    assert "2 worker(s)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'only'"):
        make_all(str(tmp_path), quick=True, only=[99])
    with pytest.raises(ValueError, match="'workers'"):
        make_all(str(tmp_path), quick=True, only=[5], workers=0)


def test_reproduce_calibration_times_fixed_workloads_and_leaves_threads_and_rng_alone():
    import torch

    from figures.reproduce import calibrate, machine_info

    before, rng = torch.get_num_threads(), torch.get_rng_state()
    speed = calibrate(repeats=1)
    assert set(speed) == {"python_s", "torch_s", "toy_s", "unet_s"} and all(0 < v < 60 for v in speed.values())
    assert torch.get_num_threads() == before and torch.equal(torch.get_rng_state(), rng)
    assert set(calibrate(repeats=1, digits=False)) == {"python_s", "torch_s", "toy_s"}
    info = machine_info()
    assert set(info) == {"cores", "cpu", "torch_cpu_capability"} and info["torch_cpu_capability"]


def test_queries_benchmark_runs_in_quick_mode(tmp_path, capsys):
    """``benchmarks/bench_queries.py --quick`` (not a test of its numbers): both evaluation grids are reported
    and every objective is finite."""
    import json
    import os
    import sys

    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        import bench_queries
    finally:
        sys.path.remove(bench_dir)
    bench_queries.main(["--quick", "--iterations", "4", "--methods", "sa_ac", "ddpo_is",
                        "--json", str(tmp_path / "q.json")])
    rows = json.load(open(tmp_path / "q.json"))
    assert [r["algo"] for r in rows] == ["sa_ac", "ddpo_is"]
    for r in rows:
        for grid in ("train", "fine"):
            assert len(r[grid]["curve"]) == 2 and all(abs(J) < 10 for J in r[grid]["curve"])
    assert "worst / best" in capsys.readouterr().out


def test_ablation_benchmark_runs_in_quick_mode_and_reports_the_chain_floor(tmp_path):
    """``benchmarks/ablation_lq.py --quick --only ...`` (smoke, not its numbers): the rows asked for and the floor,
    which is ``euler_chain_class_optimum`` at N = 10 relative to the class optimum (6.1% below)."""
    import importlib.util
    import os

    from toy_problems.train import affine_class_optimum, build, euler_chain_class_optimum

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "ablation_lq.py")
    spec = importlib.util.spec_from_file_location("ablation_lq", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--quick", "--only", "exact costates", "--workers", "1", "--out", str(tmp_path)])
    assert [t["row"] for t in res["table"]] == ["exact costates, left point", "exact costates, next state"]
    prob = build("sa_ac", "gauss2d", {"policy": "affine", "pieces": 4, "progress": False}).prob
    assert res["chain_floor"]["10"] == euler_chain_class_optimum(prob, 4, 10)[0]
    assert abs(res["class_optimum"] - affine_class_optimum(prob, 4)[0]) < 1e-12
    assert 0.055 < (res["class_optimum"] - res["chain_floor"]["10"]) / abs(res["class_optimum"]) < 0.07
    assert os.path.isfile(tmp_path / "ablation.json") and os.path.isfile(tmp_path / "ablation.png")


def test_the_memoised_start_evaluation_is_the_exact_evaluation_of_the_untrained_policy():
    """``train_curve``'s first point comes from a per-process memo only for the zero affine policy on a
    linear-Gaussian problem (equal floats to a fresh exact evaluation); another beta, piece count or a trained
    ``theta`` is evaluated afresh."""
    import torch

    from figures import _common
    from toy_problems.train import build

    def setup(beta, pieces):
        return build("ddpo_is", "gauss2d", {"policy": "affine", "pieces": pieces, "beta": beta, "progress": False})

    _common._START_TERMS.clear()
    a, b, c = setup(1.0, 4), setup(1.0, 4), setup(0.5, 4)
    ta = _common._start_terms(a)
    assert ta == a.evaluate() and _common._start_terms(b) == ta and len(_common._START_TERMS) == 1
    assert _common._start_terms(c) == c.evaluate() and len(_common._START_TERMS) == 2  # its own entry
    with torch.no_grad():
        b.policy.theta.add_(0.05)
    assert _common._start_terms(b) == b.evaluate() != ta and len(_common._START_TERMS) == 2
