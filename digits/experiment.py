"""The digits experiment: pretrain, fine-tune with four methods, evaluate, plot, benchmark table.

``python -m digits.experiment [--quick] [--out DIR] [--cache DIR]`` (or :func:`main` with an argv list).

1. Pretrained model (:mod:`digits.pretrain`, cached by config hash) and two classifiers trained on the
   training split only (:mod:`digits.rewards`): the **reward classifier** (seed 0) and an independent
   **evaluation classifier** (seed 1) used for accuracy, diversity and the Frechet distance, so a policy that
   exploits the reward classifier is not also graded by it.
2. Fine-tuning through :func:`t2i.trainer.make_trainer` (same rollouts, kernels, reward interface, LoRA) with
   ``sa_ac``, ``ddpo_sf``, ``ddpo_is`` and ``dpok``; the ten prompts ``"a handwritten digit k"``; reward
   ``digit_prob`` (p(prompted digit)); the same reward-query budget (``epochs x samples per epoch``) and
   the same learning rate for every method; several seeds.
3. Evaluation of every final policy on the same prompts and noise (``n_eval`` images): reward, path KL to
   the pretrained sampler (exact per-step Gaussian KL summed over steps, nats), diversity (mean pairwise
   distance of evaluation-classifier features within a prompt), Frechet distance of evaluation-classifier
   features to the held-out test digits ("FD"), evaluation-classifier accuracy; plus the reward under
   DPM-Solver++ and under the probability-flow ODE (DDIM eta=0) at evaluation.
4. Step-count sweep: the same runs (seed 0) with K = 10, 20, 50, 100 training steps; each path trains on
   ``train_steps_per_path`` of its K steps (``train.timestep_fraction``), so the compute of the updates and
   the query budget are the same for every K.
5. Figures ``digits_fig1_reward_vs_queries.png``, ``digits_fig2_steps.png``, ``digits_fig3_solver.png``,
   ``digits_fig4_grids.png`` and ``results.json`` / ``benchmark.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import torch

from sa_theory.algorithms.checkpoint import atomic_write_json

from .data import ALL_PROMPTS
from .evaluate import evaluate_policy
from .pretrain import PretrainConfig, cache_root, pretrain, pretrain_info

__all__ = ["ExperimentConfig", "QUICK", "run_finetune", "evaluate_policy", "run_experiment", "main"]

METHODS = ("sa_ac", "ddpo_sf", "ddpo_is", "dpok")


@dataclass
class ExperimentConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    methods: tuple = METHODS
    seeds: tuple = (0, 1, 2)
    num_steps: int = 10  # K of the main comparison
    step_counts: tuple = (10, 20, 50, 100)  # K of the sweep (seed 0)
    train_steps_per_path: int = 10  # steps trained per path (timestep_fraction = this / K)
    epochs: int = 12
    batch_size: int = 16  # samples (reward queries) per epoch
    minibatch: int = 8
    steps_per_backward: int = 0  # train.steps_per_backward: 0 = a minibatch's trained steps in one UNet pass
    learning_rate: float = 3e-3
    lora_rank: int = 4
    guidance_scale: float = 1.0
    beta: float = 0.01  # KL weight (sa_ac, dpok)
    kl_penalty: float = 0.1  # sa_ac trust region (path KL to the old policy)
    clip_range: float = 0.1  # ddpo_is (summed log-probs)
    ratio_clamp: float = 0.1  # dpok
    value_width: int = 16
    n_eval: int = 60  # evaluation images (6 per digit)
    eval_solver_steps: int = 10  # DPM-Solver++ / ODE steps at evaluation
    classifier_steps: int = 1500
    reward: str = "digit_bold"  # "digit_bold" (style: thick strokes) or "digit_prob" (prompted digit)
    sa_ac_estimator: str = "likelihood_ratio"  # sa_ac's train.estimator ("value_gradient": R4 with critic costates)
    kl_weighting: str = "chain"  # train.kl_weighting: the regulariser's per-step KL ("continuous": Girsanov rate)
    value_fit: str = "joint"  # value.fit: the critic's loss in every actor backward, or "separate" (its own phase)
    value_epochs: int = 1  # value.epochs: passes of the separate critic phase


def QUICK() -> ExperimentConfig:  # noqa: N802
    """A reduced experiment: tiny pretraining, 2 methods, 1 seed, few epochs (default-suite test size)."""
    return ExperimentConfig(
        pretrain=PretrainConfig(num_train_steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=20),
        methods=("sa_ac", "ddpo_is"),
        seeds=(0,),
        num_steps=4,
        step_counts=(4,),
        train_steps_per_path=4,
        epochs=4,
        batch_size=8,
        minibatch=8,
        n_eval=40,
        eval_solver_steps=4,
        classifier_steps=300,
    )


# --------------------------------------------------------------------------- assets
def prepare_assets(ec: ExperimentConfig, cache_dir: str | None = None) -> dict:
    """Pretrained model folder, reward / evaluation classifiers (cached) and their info."""
    from .rewards import classifier_path, load_classifier

    t0 = time.time()
    folder = pretrain(ec.pretrain, cache_dir)
    t_pre = time.time() - t0
    root = cache_root(cache_dir)
    clf_cfg = {"steps": ec.classifier_steps}
    target = "bold" if ec.reward == "digit_bold" else "digit"
    reward_clf, rinfo = load_classifier(root, 0, {**clf_cfg, "target": target})
    digit_clf, dinfo = load_classifier(root, 0, clf_cfg)
    eval_clf, einfo = load_classifier(root, 1, clf_cfg)
    return {
        "model": folder,
        "pretrain_info": pretrain_info(folder),
        "pretrain_wall_s_this_call": t_pre,
        "reward_name": ec.reward,
        "reward_classifier_path": classifier_path(root, 0, {**clf_cfg, "target": target}),
        "digit_classifier": digit_clf,
        "digit_classifier_info": dinfo,
        "reward_classifier": reward_clf,
        "eval_classifier": eval_clf,
        "reward_classifier_info": rinfo,
        "eval_classifier_info": einfo,
    }


def make_config(ec: ExperimentConfig, assets: dict, method: str, seed: int, K: int, out_dir: str):
    from t2i.config import Config

    c = Config()
    c.model.pretrained = assets["model"]
    c.model.lora_rank, c.model.lora_alpha = ec.lora_rank, float(ec.lora_rank)
    c.sample.sampler, c.sample.eta, c.sample.num_steps = "ddim", 1.0, K
    c.sample.guidance_scale = ec.guidance_scale
    c.sample.batch_size, c.sample.num_batches_per_epoch = ec.batch_size, 1
    c.sample.eval_num_steps = K
    c.train.method, c.train.seed, c.train.num_epochs = method, seed, ec.epochs
    c.train.batch_size, c.train.gradient_accumulation_steps = ec.minibatch, 1
    c.train.learning_rate = ec.learning_rate
    c.train.timestep_fraction = min(1.0, ec.train_steps_per_path / K)
    c.train.steps_per_backward = ec.steps_per_backward
    c.train.beta = ec.beta if method in ("sa_ac", "dpok") else 0.0
    c.train.kl_penalty = ec.kl_penalty
    c.train.estimator = ec.sa_ac_estimator
    c.train.kl_weighting = ec.kl_weighting
    c.train.clip_range, c.train.ratio_clamp = ec.clip_range, ec.ratio_clamp
    c.value.kind = {"sa_ac": "residual", "dpok": "critic"}.get(method, "none")
    c.value.width, c.value.learning_rate = ec.value_width, 1e-3
    c.value.fit, c.value.epochs = ec.value_fit, ec.value_epochs
    c.reward.name, c.reward.weights_path = ec.reward, assets["reward_classifier_path"]
    c.prompts = list(ALL_PROMPTS)
    c.log.output_dir = out_dir
    c.log.save_every, c.log.keep_last, c.log.image_every = 0, 1, 0
    c.log.tensorboard, c.log.progress = False, False
    # the training-time path-KL curve is read at the main K only (benchmark_table's reward at a KL level); at the
    # sweep's other K a method whose loss needs no reference (ddpo_* with beta = 0) skips that pretrained forward
    # per sampling step (same training: it only fed the curve; the final evaluation measures the KL regardless)
    c.log.reference_kl = K == ec.num_steps
    c.log.overwrite = True  # the experiment owns these scratch run folders and regenerates them on a re-run
    return c


def finetune_key(ec: ExperimentConfig, method: str, seed: int, K: int) -> str:
    """What determines a :func:`run_finetune` result (its training and its evaluation): every field of ``ec`` but
    the lists of runs (``methods``, ``seeds``, ``step_counts``), and ``method``, ``seed``, ``K``. Two experiments'
    runs with equal keys are the same run (runs are deterministic); :func:`digits.flow_experiment.run_flow_experiment`
    reuses the digits experiment's VP runs by this key instead of repeating them."""
    fields = {k: v for k, v in dataclasses.asdict(ec).items() if k not in ("methods", "seeds", "step_counts")}
    blob = json.dumps({"ec": fields, "method": method, "seed": seed, "K": K}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_finetune(
    ec: ExperimentConfig, assets: dict, method: str, seed: int, K: int, out_dir: str, evaluate: bool = True
) -> dict:
    """One fine-tuning run through :func:`t2i.trainer.make_trainer`; its per-epoch history and final metrics."""
    from t2i.trainer import make_trainer

    cfg = make_config(ec, assets, method, seed, K, out_dir)
    t0 = time.time()
    tr = make_trainer(cfg)
    hist = tr.train()
    t_train = time.time() - t0
    res = {
        "method": method,
        "seed": seed,
        "K": K,
        "key": finetune_key(ec, method, seed, K),
        "train_time_s": t_train,
        "queries": [(i + 1) * ec.batch_size for i in range(len(hist))],
        "reward": [h["reward_mean"] for h in hist],
        "reward_se": [h["reward_se"] for h in hist],
        "path_kl": [h.get("path_kl_mean") for h in hist],  # None: not recorded (``log.reference_kl`` false)
    }
    if evaluate:
        t1 = time.time()
        res["final"] = evaluate_policy(tr.pipe, tr.kernel, assets, ec)
        res["eval_time_s"] = time.time() - t1
    return res


# --------------------------------------------------------------------------- the whole experiment
def _strip_images(r: dict) -> dict:
    r = dict(r)
    if "final" in r:
        r["final"] = {k: v for k, v in r["final"].items() if k != "images"}
    return r


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_dir(out: str, m: str, s: int, K: int) -> str:
    return os.path.join(out, "runs", f"{m}_s{s}_K{K}")


#: the method name of a pretrained-model evaluation job (see :func:`_run_jobs`)
PRETRAINED = "pretrained"


def pretrained_eval(ec: ExperimentConfig, assets: dict, K: int) -> dict:
    """:func:`evaluate_policy` of the pretrained model (LoRA added, then disabled) on DDIM eta = 1 with K steps."""
    from t2i.models import add_lora, load_pipeline
    from t2i.scheduling import make_kernel

    t0 = time.time()
    pipe = load_pipeline(assets["model"])
    add_lora(pipe.unet, ec.lora_rank, init_seed=0)  # evaluated with adapters disabled = the pretrained model
    _, kern = make_kernel(pipe.scheduler.config, "ddim", K, 1.0)
    ev = evaluate_policy(pipe, kern, assets, ec, use_pretrained=True)
    return {"method": PRETRAINED, "K": K, "eval": ev, "eval_time_s": time.time() - t0}


def _one(ec: ExperimentConfig, assets: dict, m: str, s: int | None, K: int, out: str) -> dict:
    return pretrained_eval(ec, assets, K) if m == PRETRAINED else run_finetune(ec, assets, m, s, K,
                                                                                _run_dir(out, m, s, K))


def _job(ec: ExperimentConfig, cache_dir: str | None, m: str, s: int | None, K: int, out: str) -> dict:
    """One job in a worker process (assets come from the cache the parent filled): a fine-tuning run, or (``m`` =
    :data:`PRETRAINED`) the pretrained model's evaluation at K."""
    return _one(ec, prepare_assets(ec, cache_dir), m, s, K, out)


def _run_jobs(ec, assets, jobs, out, cache_dir, workers: int):
    """Yield the results of ``jobs`` ((method, seed, K) triples; method :data:`PRETRAINED`: the pretrained model's
    evaluation): in order in this process if ``workers`` is 1, else as they finish in ``workers`` spawned processes
    with one torch thread each (the most expensive runs, largest K, are submitted first, the short pretrained
    evaluations last, so the pool stays balanced)."""
    if workers <= 1:
        for m, s, K in jobs:
            yield _one(ec, assets, m, s, K, out)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    order = sorted(jobs, key=lambda j: (j[0] == PRETRAINED, -j[2]))
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=(1,)) as pool:
        futs = [pool.submit(_job, ec, cache_dir, m, s, K, out) for m, s, K in order]
        for f in cf.as_completed(futs):
            yield f.result()


def run_experiment(
    ec: ExperimentConfig, out: str, cache_dir: str | None = None, part: str = "all", workers: int = 1, on_done=None
) -> dict:
    """Run ``part`` ("main": methods x seeds at K = ``num_steps``; "sweep": seed 0 at the other step counts;
    "all"), writing ``results_<part>.json`` after every run (so a partial run still gives data). ``workers``
    > 1 runs the fine-tuning runs in that many processes (one torch thread each)."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    assets = prepare_assets(ec, cache_dir)
    info = {
        "pretrain": {k: v for k, v in assets["pretrain_info"].items() if k != "config"},
        "pretrain_config": assets["pretrain_info"].get("config"),
        "reward": ec.reward,
        "reward_classifier_test_accuracy": assets["reward_classifier_info"]["test_accuracy"],
        "digit_classifier_test_accuracy": assets["digit_classifier_info"]["test_accuracy"],
        "eval_classifier_test_accuracy": assets["eval_classifier_info"]["test_accuracy"],
        "experiment_config": {k: v for k, v in dataclasses.asdict(ec).items() if k != "pretrain"},
    }
    res: dict = {"info": info, "pretrained": {}, "runs": []}
    path = os.path.join(out, f"results_{part}.json")
    grids: dict = {}
    # pretrained reference at every K used
    Ks = sorted({ec.num_steps} | (set(ec.step_counts) if part in ("all", "sweep") else set()))
    if part in ("all", "main"):
        Ks = sorted(set(Ks) | {ec.num_steps})
    jobs = [(PRETRAINED, None, K) for K in Ks]  # in the pool with the runs (no core idles while they run)
    t_pretrained = 0.0
    if part in ("all", "main"):
        jobs += [(m, s, ec.num_steps) for s in ec.seeds for m in ec.methods]
    if part in ("all", "sweep"):
        jobs += [(m, ec.seeds[0], K) for K in ec.step_counts if K != ec.num_steps for m in ec.methods]
    for r in _run_jobs(ec, assets, jobs, out, cache_dir, workers):
        if r["method"] == PRETRAINED:
            K, ev = r["K"], r["eval"]
            if K == ec.num_steps:
                grids["pretrained"] = ev["images"]
            res["pretrained"][str(K)] = {k: v for k, v in ev.items() if k != "images"}
            t_pretrained += r["eval_time_s"]
            if on_done is not None and len(res["pretrained"]) == len(Ks):
                on_done("digits/pretrained_eval", t_pretrained)
            continue
        m, s, K = r["method"], r["seed"], r["K"]
        if K == ec.num_steps and s == ec.seeds[0]:
            grids[m] = r["final"]["images"]
        res["runs"].append(_strip_images(r))
        res["wall_s"] = time.time() - t0
        if on_done is not None:  # (job key, seconds): the overall progress bar of figures.reproduce
            on_done(f"digits/{m}_s{s}_K{K}", r["train_time_s"] + r.get("eval_time_s", 0.0))
        f = r["final"]
        print(
            f"[{time.time() - t0:6.0f} s] {m:8s} seed {s} K {K:3d}: reward {f['reward_mean']:.3f} +- "
            f"{f['reward_se']:.3f}  KL {f['path_kl_mean']:.2f}  FD {f['fd']:.1f}"
            f"  div {f['diversity_mean']:.2f} "
            f"(train {r['train_time_s']:.0f} s)",
            flush=True,
        )
        atomic_write_json(path, res)
    res["pretrained"] = dict(sorted(res["pretrained"].items(), key=lambda kv: int(kv[0])))
    if grids:
        torch.save(grids, os.path.join(out, f"grids_{part}.pt"))
    res["wall_s"] = time.time() - t0
    atomic_write_json(path, res)
    return res


def load_results(out: str) -> dict:
    """Merge ``results_*.json`` of ``out`` (main and sweep parts)."""
    merged: dict = {"runs": [], "pretrained": {}}
    for part in ("all", "main", "sweep"):
        p = os.path.join(out, f"results_{part}.json")
        if os.path.isfile(p):
            with open(p) as f:
                r = json.load(f)
            merged["info"] = r["info"]
            merged["pretrained"].update(r["pretrained"])
            merged["runs"] += r["runs"]
            merged.setdefault("wall_s", {})[part] = r.get("wall_s")
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m digits.experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="reduced experiment (tiny pretraining, 2 methods)")
    ap.add_argument("--out", default=None, help="output folder (default: figures/ for PNGs, runs/digits)")
    ap.add_argument(
        "--cache", default=None, help="model cache (default $SA_CACHE or ~/.cache/scores-as-actions)"
    )
    ap.add_argument(
        "--part",
        default="all",
        choices=("all", "main", "sweep", "figures"),
        help="run part of the experiment ('figures' only re-plots existing results)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    ap.add_argument(
        "--workers", type=int, default=1, help="parallel fine-tuning processes (2 on a 2-core CPU)"
    )
    ap.add_argument(
        "--fig-dir", default=None, help="where the PNGs go (default: figures/, or --out if given)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ec = QUICK() if args.quick else ExperimentConfig()
    out = args.out or os.path.join("runs", "digits_quick" if args.quick else "digits")
    if args.part != "figures":
        if args.workers < 1:
            ap.error("--workers must be >= 1")
        run_experiment(ec, out, args.cache, args.part, args.workers)
    from .figures import make_all

    repo_figs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "figures")
    fig_dir = args.fig_dir or args.out or (out if args.quick else repo_figs)
    make_all(out, fig_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
