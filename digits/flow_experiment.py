"""The digits experiment on a rectified-flow model: ``sa_ac`` vs Flow-GRPO vs DDPO-IS, and VP vs flow for ``sa_ac``.

``python -m digits.flow_experiment [--quick] [--out DIR] [--cache DIR] [--workers N]``

* Flow model: :mod:`digits.pretrain_flow` (tiny SD3 transformer on 8x8 pixels, cached / shipped).
* Same budget and settings as :mod:`digits.experiment` (``ExperimentConfig``: 12 epochs x 16 reward queries,
  LoRA rank 4, the same learning rate, reward ``digit_bold``, KL weight ``beta``); on the flow model the
  sampler is the flow kernel (``sample.sampler="flow"``, eta = 1: the reverse SDE; the step from t = 1 is the
  ODE step, masked). ``flow_grpo``: groups of ``group_size`` = 4 images per prompt (so 4 prompts x 4 images
  per epoch), our units (summed log-probs, exact per-step KL, ``beta`` as for ``sa_ac``), PPO clip
  ``clip_range``. ``ddpo_is``: as in the digits experiment (no KL term).
* VP: the existing UNet digits model's ``sa_ac`` through :func:`digits.experiment.run_finetune` at the same K.
* K in ``step_counts`` (10, 20, 50); seeds 0, 1, 2 at K = 10, ``sweep_seeds`` at the other K. Each path trains on
  ``train_steps_per_path`` of its steps, as in the digits experiment.
* Evaluation: :func:`digits.evaluate.evaluate_policy` (60 fixed prompts / noises): reward, chain path KL
  (exact, nats), continuous-time KL, evaluation-classifier accuracy, FD, diversity.
* Output: ``results.json`` in ``--out`` (default ``benchmarks/results/digits_flow``) and the figures
  ``figures/digits_flow_fig1_methods.png``, ``figures/digits_flow_fig2_steps.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass, field

import torch

from sa_theory.algorithms.checkpoint import atomic_write_json

from .experiment import PRETRAINED, QUICK, ExperimentConfig, finetune_key, make_config, prepare_assets, run_finetune
from .pretrain_flow import QUICK_FLOW, FlowPretrainConfig, flow_pretrain_info, pretrain_flow

__all__ = ["FlowExperimentConfig", "QUICK_FLOW_EXPERIMENT", "make_flow_config", "run_flow_finetune",
           "run_flow_experiment", "main"]

FLOW_METHODS = ("sa_ac", "flow_grpo", "ddpo_is")
TARGET = 0.95  # training-reward level for "queries to target"
EARLY = 64  # reward queries at which the training reward is also summarised (a third of the budget)
LABELS = {"sa_ac": "continuous-time AC (ours)", "flow_grpo": "Flow-GRPO", "ddpo_is": "DDPO-IS",
          "vp_sa_ac": "continuous-time AC on VP (UNet)"}


@dataclass
class FlowExperimentConfig:
    base: ExperimentConfig = field(default_factory=lambda: ExperimentConfig(step_counts=(10, 20, 50)))
    flow: FlowPretrainConfig = field(default_factory=FlowPretrainConfig)
    methods: tuple = FLOW_METHODS
    group_size: int = 4  # flow_grpo images per prompt
    vp: bool = True  # also run the UNet (VP) model's sa_ac at every K
    sweep_seeds: tuple = (0, 1, 2)  # seeds at the K other than base.num_steps (which uses base.seeds)


def QUICK_FLOW_EXPERIMENT() -> FlowExperimentConfig:  # noqa: N802
    """Test size: QUICK pretraining (UNet and flow), K = 4, 1 seed, few epochs."""
    return FlowExperimentConfig(base=QUICK(), flow=QUICK_FLOW(), sweep_seeds=(0,))


def make_flow_config(fc: FlowExperimentConfig, assets: dict, method: str, seed: int, K: int, out_dir: str):
    """The digits experiment's :func:`~digits.experiment.make_config` moved onto the flow model."""
    c = make_config(fc.base, assets, method, seed, K, out_dir)
    c.model.pretrained, c.model.family = assets["flow_model"], "sd3"
    c.sample.sampler, c.sample.eval_sampler = "flow", "flow"
    c.sample.flow_noise, c.sample.flow_noise_value, c.sample.flow_at_one = "eta", 1.0, "ode"
    c.log.reference_kl = False  # no output reads the training-time KL curve; ddpo_is (beta = 0) skips that forward
    if method == "flow_grpo":
        c.sample.group_size = fc.group_size
        c.train.beta = fc.base.beta
    return c


def run_flow_finetune(fc: FlowExperimentConfig, assets: dict, method: str, seed: int, K: int, out_dir: str,
                      evaluate: bool = True) -> dict:
    """One fine-tuning run of the flow model through :func:`t2i.trainer.make_trainer`; history and final metrics."""
    from t2i.trainer import make_trainer

    from .evaluate import evaluate_policy

    cfg = make_flow_config(fc, assets, method, seed, K, out_dir)
    t0 = time.time()
    tr = make_trainer(cfg)
    hist = tr.train()
    res = {"model": "flow", "method": method, "seed": seed, "K": K, "train_time_s": time.time() - t0,
           "queries": [(i + 1) * fc.base.batch_size for i in range(len(hist))],
           "reward": [h["reward_mean"] for h in hist], "reward_se": [h["reward_se"] for h in hist],
           "path_kl": [h.get("path_kl_mean") for h in hist],  # None where not recorded (ddpo_is)
           "logprob_parity_max": max(float(h.get("logprob_parity_max", 0.0)) for h in hist)}
    if evaluate:
        t1 = time.time()
        res["final"] = {k: v for k, v in evaluate_policy(tr.pipe, tr.kernel, assets, fc.base, solvers=False).items()
                        if k != "images"}
        res["eval_time_s"] = time.time() - t1
    return res


def flow_assets(fc: FlowExperimentConfig, cache_dir: str | None = None) -> dict:
    assets = prepare_assets(fc.base, cache_dir)
    t0 = time.time()
    assets["flow_model"] = pretrain_flow(fc.flow, cache_dir)
    assets["flow_pretrain_wall_s_this_call"] = time.time() - t0
    assets["flow_pretrain_info"] = flow_pretrain_info(assets["flow_model"])
    return assets


def _job(fc, cache_dir, model, m, s, K, out):
    torch.set_num_threads(1)
    assets = flow_assets(fc, cache_dir)
    if m == PRETRAINED:
        t0 = time.time()
        ev = _pretrained_eval(fc, assets, K, model)
        return {"model": model, "method": PRETRAINED, "K": K, "eval": ev, "eval_time_s": time.time() - t0}
    d = os.path.join(out, "runs", f"{model}_{m}_s{s}_K{K}")
    if model == "flow":
        return run_flow_finetune(fc, assets, m, s, K, d)
    r = run_finetune(fc.base, assets, m, s, K, d)
    r["final"] = {k: v for k, v in r["final"].items() if k != "images"}
    return {**r, "model": "vp"}


def _pretrained_eval(fc: FlowExperimentConfig, assets: dict, K: int, model: str = "flow") -> dict:
    """Evaluation of the pretrained ``model`` ("flow": eta = 1 flow kernel; "vp": the UNet on DDIM eta = 1) at K."""
    from t2i.flow_models import add_transformer_lora, load_pixel_sd3_pipeline
    from t2i.models import add_lora, load_pipeline
    from t2i.scheduling import make_flow_kernel, make_kernel

    from .evaluate import evaluate_policy

    if model == "flow":
        pipe = load_pixel_sd3_pipeline(assets["flow_model"])
        add_transformer_lora(pipe.transformer, fc.base.lora_rank, init_seed=0)  # disabled = the pretrained model
        _, kern = make_flow_kernel(pipe.scheduler.config, K, "eta", 1.0, "ode")
    else:
        pipe = load_pipeline(assets["model"])
        add_lora(pipe.unet, fc.base.lora_rank, init_seed=0)
        _, kern = make_kernel(pipe.scheduler.config, "ddim", K, 1.0)
    ev = evaluate_policy(pipe, kern, assets, fc.base, use_pretrained=True, solvers=False)
    return {k: v for k, v in ev.items() if k != "images"}


def run_flow_experiment(fc: FlowExperimentConfig, out: str, cache_dir: str | None = None, workers: int = 1,
                        fig_dir: str | None = "figures", on_done=None, reuse_runs: list | None = None) -> dict:
    """All runs (flow methods x seeds at K = ``base.num_steps``, ``sweep_seeds`` at the other K, VP ``sa_ac`` likewise),
    ``results.json`` rewritten after every run, then the two figures. ``reuse_runs``: finished runs of the digits
    experiment (its ``results["runs"]``); a VP run with the same :func:`~digits.experiment.finetune_key` is taken
    from there (marked ``"reused": True``) instead of being trained again."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    ec = fc.base
    assets = flow_assets(fc, cache_dir)
    info = {k: v for k, v in assets["flow_pretrain_info"].items()}
    res = {"info": {"flow_pretrain": info, "flow_config": dataclasses.asdict(fc)}, "pretrained": {}, "runs": []}
    Ks = sorted({ec.num_steps, *ec.step_counts})
    # the pretrained evaluations run in the pool with the fine-tuning runs (no core idles while they run)
    jobs = [(model, PRETRAINED, None, K) for K in Ks for model in (("flow", "vp") if fc.vp else ("flow",))]
    pre_keys = [f"{model}_K{K}" for model, _, _, K in jobs]
    t_pretrained = 0.0
    jobs += [("flow", m, s, ec.num_steps) for s in ec.seeds for m in fc.methods]
    jobs += [("flow", m, s, K) for K in Ks if K != ec.num_steps for s in fc.sweep_seeds for m in fc.methods]
    if fc.vp:
        jobs += [("vp", "sa_ac", s, ec.num_steps) for s in ec.seeds]
        jobs += [("vp", "sa_ac", s, K) for K in Ks if K != ec.num_steps for s in fc.sweep_seeds]
    done = {r["key"]: r for r in reuse_runs or () if "key" in r}
    keys = {j: finetune_key(ec, *j[1:]) for j in jobs if j[0] == "vp" and j[1] != PRETRAINED}
    reused = [{**done[k], "model": "vp", "reused": True} for k in keys.values() if k in done]
    jobs = [j for j in jobs if keys.get(j) not in done]
    path = os.path.join(out, "results.json")
    for r in itertools.chain(reused, _run(fc, cache_dir, jobs, out, workers)):
        if r["method"] == PRETRAINED:
            res["pretrained"][f"{r['model']}_K{r['K']}"] = r["eval"]
            t_pretrained += r["eval_time_s"]
            if len(res["pretrained"]) == len(pre_keys):
                res["pretrained"] = {k: res["pretrained"][k] for k in pre_keys}
                if on_done is not None:
                    on_done("flow/pretrained_eval", t_pretrained)
            continue
        res["runs"].append(r)
        res["wall_s"] = time.time() - t0
        if on_done is not None:  # (job key, seconds): the overall progress bar of figures.reproduce
            on_done(f"flow/{r['model']}_{r['method']}_s{r['seed']}_K{r['K']}",
                    0.0 if r.get("reused") else r["train_time_s"] + r.get("eval_time_s", 0.0))
        f = r["final"]
        how = "the digits experiment's run" if r.get("reused") else f"train {r['train_time_s']:.0f} s"
        print(f"[{time.time() - t0:6.0f} s] {r['model']:4s} {r['method']:9s} seed {r['seed']} K {r['K']:3d}: reward "
              f"{f['reward_mean']:.3f} +- {f['reward_se']:.3f}  chain KL {f['path_kl_mean']:.2f}  ct KL "
              f"{f['path_kl_ct_mean']:.2f}  acc {f['eval_accuracy']:.2f} ({how})", flush=True)
        atomic_write_json(path, res)
    res["summary"] = summarize(res)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    if fig_dir:
        flow_figures(res, fig_dir)
    return res


def _run(fc, cache_dir, jobs, out, workers):
    if workers <= 1:
        for j in jobs:
            yield _job(fc, cache_dir, *j, out)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        order = sorted(jobs, key=lambda j: (j[1] == PRETRAINED, -j[3]))  # the short pretrained evaluations last
        futs = [pool.submit(_job, fc, cache_dir, *j, out) for j in order]
        for f in cf.as_completed(futs):
            yield f.result()


def summarize(res: dict) -> dict:
    """``{"<model>_<method>_K<K>": {metric: [mean, se over seeds], "n": seeds}}`` of the final metrics."""
    from sa_theory.kl import mean_se

    groups: dict = {}
    for r in res["runs"]:
        groups.setdefault(f"{r['model']}_{r['method']}_K{r['K']}", []).append(r)
    out = {}
    for key, rs in sorted(groups.items()):
        row = {"n": len(rs)}
        for m in ("reward_mean", "path_kl_mean", "path_kl_ct_mean", "eval_accuracy", "fd", "diversity_mean"):
            row[m] = list(mean_se([float(r["final"][m]) for r in rs]))
        par = [float(r["logprob_parity_max"]) for r in rs if "logprob_parity_max" in r]
        row["logprob_parity_max"] = max(par) if par else None  # None: not recorded (the VP runs)
        hit = [next((q for q, v in zip(r["queries"], r["reward"]) if v >= TARGET), None) for r in rs]
        early = [r["reward"][r["queries"].index(EARLY)] for r in rs if EARLY in r["queries"]]
        if early:
            mu, se = mean_se(early)
            row[f"train_reward_at_{EARLY}"] = [mu, se if len(early) > 1 else None]
        reached = [h for h in hit if h is not None]  # [mean over the seeds reaching it (None: none), how many]
        row["queries_to_target"] = [sum(reached) / len(reached) if reached else None, len(reached)]
        out[key] = row
    return out


def flow_figures(res: dict, fig_dir: str = "figures") -> list[str]:
    """``digits_flow_fig1_methods.png`` (training reward vs reward queries per method on the flow model at
    K = ``num_steps``, mean +- SE over seeds) and ``digits_flow_fig2_steps.png`` (final evaluation reward and
    chain path KL vs K per method, flow and VP ``sa_ac``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    os.makedirs(fig_dir, exist_ok=True)
    K0 = res["info"]["flow_config"]["base"]["num_steps"]
    runs = res["runs"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in res["info"]["flow_config"]["methods"]:
        rs = [r for r in runs if r["model"] == "flow" and r["method"] == m and r["K"] == K0]
        if not rs:
            continue
        y = np.array([r["reward"] for r in rs])
        mu = y.mean(0)
        se = y.std(0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else np.zeros_like(mu)
        q = rs[0]["queries"]
        ax.plot(q, mu, marker="o", ms=3, label=f"{LABELS[m]} (n={len(rs)})")
        ax.fill_between(q, mu - se, mu + se, alpha=0.2)
    ax.set_xlabel("reward queries")
    ax.set_ylabel("training reward (digit_bold, on-policy batch)")
    ax.set_title(f"Flow-matching digits model, K = {K0}: mean +- SE over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = os.path.join(fig_dir, "digits_flow_fig1_methods.png")
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    summ = summarize(res)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = [("flow", m) for m in res["info"]["flow_config"]["methods"]] + [("vp", "sa_ac")]
    for i, (model, m) in enumerate(keys):
        pts = sorted((int(k.rsplit("_K", 1)[1]), v) for k, v in summ.items()
                     if k.startswith(f"{model}_{m}_K"))
        if not pts:
            continue
        label = LABELS["vp_sa_ac"] if model == "vp" else LABELS[m]
        style = "--" if model == "vp" else "-"
        for ax, metric in zip(axes, ("reward_mean", "path_kl_mean")):
            Ks = [k * (1 + 0.025 * (i - 1.5)) for k, _ in pts]  # small offsets: error bars stay apart
            mu = [v[metric][0] for _, v in pts]
            se = [0.0 if v["n"] < 2 else v[metric][1] for _, v in pts]
            ax.errorbar(Ks, mu, yerr=se, ls=style, marker="o", ms=4, capsize=3, label=label)
    pre = res.get("pretrained", {})
    for model, style in (("flow", "k:"), ("vp", "k-.")):
        pk = sorted((int(k.split("_K")[1]), v["reward_mean"]) for k, v in pre.items() if k.startswith(f"{model}_K"))
        if pk:
            axes[0].plot([k for k, _ in pk], [v for _, v in pk], style, label=f"pretrained {model} model")
    axes[0].set_ylabel("final reward (60 eval images)")
    axes[1].set_ylabel("chain path KL to pretrained (nats)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks([10, 20, 50])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("sampling steps K")
    axes[1].set_yticks([1, 2, 5, 10, 20, 50, 100])
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=7, loc="center right")
    fcd = res["info"]["flow_config"]
    fig.suptitle(f"Step sweep: final metrics, mean +- SE over seeds (K = {K0}: {len(fcd['base']['seeds'])} seeds, "
                 f"other K: {len(fcd.get('sweep_seeds', (0,)))})")
    fig.tight_layout()
    p2 = os.path.join(fig_dir, "digits_flow_fig2_steps.png")
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m digits.flow_experiment", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="test-size version")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/digits_flow)")
    ap.add_argument("--cache", default=None, help="model cache (default $SA_CACHE or ~/.cache/scores-as-actions)")
    ap.add_argument("--workers", type=int, default=2, help="fine-tuning processes (one torch thread each)")
    ap.add_argument("--figures", default=None, help="figure folder (default figures/, --quick: none)")
    ap.add_argument("--reuse-digits", default=None, metavar="DIR",
                    help="results folder of the digits experiment: its VP sa_ac runs with the same settings are "
                         "reused instead of trained again (e.g. runs/digits)")
    args = ap.parse_args(argv)
    fc = QUICK_FLOW_EXPERIMENT() if args.quick else FlowExperimentConfig()
    args.figures = args.figures if args.figures is not None else ("" if args.quick else "figures")
    out = args.out or os.path.join("benchmarks", "results", "digits_flow" + ("_quick" if args.quick else ""))
    t0 = time.time()
    reuse = None
    if args.reuse_digits:
        from .experiment import load_results

        reuse = load_results(args.reuse_digits)["runs"]
    res = run_flow_experiment(fc, out, args.cache, args.workers, args.figures or None, reuse_runs=reuse)
    for k, v in res["summary"].items():
        print(f"{k:24s} reward {v['reward_mean'][0]:.3f} +- {v['reward_mean'][1]:.3f}  chain KL "
              f"{v['path_kl_mean'][0]:.2f} +- {v['path_kl_mean'][1]:.2f}  ct KL {v['path_kl_ct_mean'][0]:.2f}  "
              f"acc {v['eval_accuracy'][0]:.2f}  queries to {TARGET} {v['queries_to_target'][0] or '-'} "
              f"({v['queries_to_target'][1]}/{v['n']})  (n={v['n']})")
    print(f"wall {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
