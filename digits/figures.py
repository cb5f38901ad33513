"""Figures and the benchmark table of the digits experiment, from ``results_*.json`` (no training here).

``make_all(results_dir, fig_dir)`` writes ``digits_fig1_reward_vs_queries.png``, ``digits_fig2_steps.png``,
``digits_fig3_solver.png``, ``digits_fig4_grids.png`` into ``fig_dir`` and ``benchmark.json`` into
``results_dir``; missing data (e.g. a sweep that was not run) leave a panel marked "not run".
"""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sa_theory.kl import mean_se  # noqa: E402

__all__ = ["make_all", "benchmark_table"]

LABELS = {"sa_ac": "continuous-time AC (ours)", "ddpo_sf": "DDPO-SF", "ddpo_is": "DDPO-IS", "dpok": "DPOK"}
COLORS = {"sa_ac": "C0", "ddpo_sf": "C1", "ddpo_is": "C2", "dpok": "C3"}
DPI = 100


def _smooth(y, w=3):
    y = np.asarray(y, dtype=float)
    return np.array([y[max(0, i - w + 1) : i + 1].mean() for i in range(len(y))])


def _main_runs(res, K):
    return [r for r in res["runs"] if r["K"] == K]


def fig1(res, K, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in LABELS:
        runs = [r for r in _main_runs(res, K) if r["method"] == m]
        if not runs:
            continue
        q = np.array(runs[0]["queries"])
        R = np.array([r["reward"] for r in runs])
        mu = R.mean(0)
        se = R.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mu)
        ax.plot(q, mu, color=COLORS[m], label=f"{LABELS[m]} ({len(runs)} seeds)")
        ax.fill_between(q, mu - se, mu + se, color=COLORS[m], alpha=0.2)
    pre = res["pretrained"].get(str(K))
    if pre:
        ax.axhline(pre["reward_mean"], color="k", ls=":", label="pretrained (eval)")
    ax.set_xlabel("reward queries")
    ax.set_ylabel(f"reward ({res['info']['reward']}), on-policy batch mean")
    ax.set_title(f"Digits: reward vs queries (K={K} DDIM eta=1 steps;\nband = +-1 SE over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _by_k(res, m, key):
    out = {}
    for r in res["runs"]:
        if r["method"] == m and r["seed"] == min(x["seed"] for x in res["runs"]):
            out[r["K"]] = (r["final"][key], r["final"].get(key.replace("_mean", "_se"), float("nan")))
    return dict(sorted(out.items()))


def fig2(
    res,
    path,
    keys=("reward_mean", "path_kl_mean"),
    titles=("final reward (DDIM eta=1, K steps)", "path KL to pretrained (nats)"),
    suptitle="Digits: final reward and KL vs training steps K (seed 0)",
):
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, key, title in zip(np.atleast_1d(axes), keys, titles):
        for m in LABELS:
            d = _by_k(res, m, key)
            if not d:
                continue
            ks = list(d)
            ax.errorbar(
                ks,
                [v[0] for v in d.values()],
                [v[1] for v in d.values()],
                marker="o",
                color=COLORS[m],
                label=LABELS[m],
                capsize=3,
            )
        pre = {int(k): v.get(key) for k, v in res["pretrained"].items() if v.get(key) is not None}
        if pre and key != "path_kl_mean":
            ks = sorted(pre)
            ax.plot(ks, [pre[k] for k in ks], "k:", marker="x", label="pretrained")
        ax.set_xscale("log")
        ax.set_xticks([10, 20, 50, 100])
        ax.set_xticklabels(["10", "20", "50", "100"])
        ax.set_xlabel("sampling steps K used in training")
        ax.set_title(title, fontsize=10)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def fig4(grids, path, n_per=4):
    """Rows: pretrained and each method; same prompts (digits 0..9) and noise."""
    import torch

    names = [k for k in ["pretrained", *LABELS] if k in grids]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.1 * len(names) * n_per / 2 + 0.5))
    for ax, name in zip(np.atleast_1d(axes), names):
        im = grids[name][:, 0]  # (N, H, W) in [0, 1]; image i has digit i % 10
        N = min(im.shape[0], 10 * n_per)
        H = im.shape[-1]
        canvas = torch.ones(n_per * (H + 1), 10 * (H + 1))
        for i in range(N):
            r, c = divmod(i, 10)
            canvas[r * (H + 1) : r * (H + 1) + H, c * (H + 1) : c * (H + 1) + H] = im[i]
        ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([(H + 1) * c + H / 2 for c in range(10)])
        ax.set_xticklabels([str(c) for c in range(10)], fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(LABELS.get(name, name).replace(" (ours)", "\n(ours)"), fontsize=7)
    fig.suptitle(
        "Digits: pretrained vs fine-tuned, same prompts (column = prompted digit) and noise", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def benchmark_table(res, K, target=0.6, kl_level=5.0) -> dict:
    """Per method (main runs at K): queries to reach ``target`` (3-epoch running mean of the on-policy
    reward; mean over the seeds that reach it), reward at path KL ``kl_level`` (linear interpolation along
    the training curve, first crossing), final eval metrics with SE over seeds, and the relative spread
    (max - min) / mean of the final reward across step counts (seed 0)."""
    out = {"target_reward": target, "kl_level_nats": kl_level, "K": K, "methods": {}}
    for m in LABELS:
        runs = [r for r in _main_runs(res, K) if r["method"] == m]
        if not runs:
            continue
        qs, at_kl = [], []
        for r in runs:
            y = _smooth(r["reward"])
            hit = np.nonzero(y >= target)[0]
            qs.append(r["queries"][hit[0]] if len(hit) else None)
            kl, rw = np.asarray(r["path_kl"]), np.asarray(r["reward"])
            cross = np.nonzero(kl >= kl_level)[0]
            if len(cross) and cross[0] > 0:
                i = cross[0]
                w = (kl_level - kl[i - 1]) / max(1e-12, kl[i] - kl[i - 1])
                at_kl.append(float(rw[i - 1] + w * (rw[i] - rw[i - 1])))
            else:
                at_kl.append(None)
        reached = [q for q in qs if q is not None]
        fin = {
            k: mean_se([r["final"][k] for r in runs])
            for k in (
                "reward_mean",
                "path_kl_mean",
                "diversity_mean",
                "fd",
                "eval_accuracy",
                "digit_prob_mean",
                "reward_dpmsolver_mean",
                "reward_ode_mean",
            )
        }
        sweep = _by_k(res, m, "reward_mean")
        vals = [v[0] for v in sweep.values()]
        out["methods"][m] = {
            "seeds": len(runs),
            "queries_to_target_per_seed": qs,
            "queries_to_target_mean_over_reaching": float(np.mean(reached)) if reached else None,
            "seeds_reaching_target": len(reached),
            "reward_at_kl_level_per_seed": at_kl,
            "final": {k: {"mean": v[0], "se_over_seeds": v[1]} for k, v in fin.items()},
            "final_reward_by_K_seed0": {str(k): v[0] for k, v in sweep.items()},
            "final_reward_rel_spread_over_K": (
                float((max(vals) - min(vals)) / np.mean(vals)) if len(vals) > 1 else None
            ),
            "train_time_s_mean": float(np.mean([r["train_time_s"] for r in runs])),
        }
    return out


def make_all(results_dir: str, fig_dir: str) -> dict:
    import torch

    from .experiment import load_results

    res = load_results(results_dir)
    if not res.get("runs"):
        raise FileNotFoundError(f"no results_*.json with runs in {results_dir!r}")
    K = res["info"]["experiment_config"]["num_steps"]
    os.makedirs(fig_dir, exist_ok=True)
    fig1(res, K, os.path.join(fig_dir, "digits_fig1_reward_vs_queries.png"))
    fig2(res, os.path.join(fig_dir, "digits_fig2_steps.png"))
    fig2(
        res,
        os.path.join(fig_dir, "digits_fig3_solver.png"),
        keys=("reward_dpmsolver_mean", "reward_ode_mean"),
        titles=(
            "final reward, DPM-Solver++ at evaluation",
            "final reward, probability-flow ODE (DDIM eta=0)",
        ),
        suptitle="Digits: policies trained with K DDIM eta=1 steps, evaluated with other solvers (seed 0)",
    )
    grids = {}
    for part in ("all", "main"):
        p = os.path.join(results_dir, f"grids_{part}.pt")
        if os.path.isfile(p):
            grids.update(torch.load(p, weights_only=True))
    if grids:
        fig4(grids, os.path.join(fig_dir, "digits_fig4_grids.png"))
    bench = benchmark_table(res, K)
    bench["pretrained"] = res["pretrained"]
    bench["info"] = res["info"]
    bench["wall_s"] = res.get("wall_s")
    with open(os.path.join(results_dir, "benchmark.json"), "w") as f:
        json.dump(bench, f, indent=1)
    print(format_benchmark(bench))
    return bench


def format_benchmark(bench: dict) -> str:
    """The benchmark as a Markdown table (mean +- SE over seeds)."""
    K, tgt, lvl = bench["K"], bench["target_reward"], bench["kl_level_nats"]
    lines = [
        f"| method (K={K}) | final reward | path KL (nats) | FD | diversity | queries to reward {tgt} "
        f"(seeds reaching) | reward at KL {lvl:g} | reward spread over K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in bench["methods"].items():
        f = r["final"]

        def ms(key, f=f):
            return f"{f[key]['mean']:.3f} ± {f[key]['se_over_seeds']:.3f}"

        q = r["queries_to_target_mean_over_reaching"]
        at = [x for x in r["reward_at_kl_level_per_seed"] if x is not None]
        lines.append(
            f"| {LABELS.get(m, m)} | {ms('reward_mean')} | {ms('path_kl_mean')} | {f['fd']['mean']:.1f} | "
            f"{f['diversity_mean']['mean']:.1f} | {'-' if q is None else f'{q:.0f}'} "
            f"({r['seeds_reaching_target']}/{r['seeds']}) | "
            f"{(f'{sum(at) / len(at):.3f} ({len(at)} seeds)') if at else '-'} | "
            f"{100 * r['final_reward_rel_spread_over_K']:.0f}% |"
        )
    return "\n".join(lines)
