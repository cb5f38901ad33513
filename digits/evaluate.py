"""Evaluation of a digits policy (or the pretrained model) on fixed prompts and noise.

Metrics: reward (the experiment's reward classifier), path KL to the pretrained sampler (the kernel's exact
per-step Gaussian KL summed over steps, nats per path), evaluation-classifier accuracy, p(prompted digit),
diversity (mean pairwise distance of evaluation-classifier features within a prompt), Frechet distance of
those features to the held-out test digits ("FD"), and the reward / FD under DPM-Solver++ and the
probability-flow ODE (DDIM eta = 0; UNet pipelines only).
Flow (SD3-class) pipelines are evaluated on their flow kernel. Every mean comes with its standard error (``*_se``).
"""

from __future__ import annotations

import torch

from sa_theory.kl import mean_se

from .data import ALL_PROMPTS, load_split

__all__ = ["evaluate_policy"]


@torch.no_grad()
def evaluate_policy(
    pipe,
    kernel,
    assets: dict,
    ec,
    use_pretrained: bool = False,
    seed: int = 12345,
    solvers: bool = True,
) -> dict:
    """Metrics of the current policy (or the pretrained model) on fixed prompts and noise."""
    import contextlib

    from t2i.environments import FlowEnvironment, UNetEnvironment
    from t2i.models import denoiser, is_flow_pipeline, pretrained
    from t2i.rollout import sample_images, sample_rollout

    from .rewards import BoldReward, DigitProbReward, accuracy, classifier_features, frechet_distance

    n = ec.n_eval
    prompts = [ALL_PROMPTS[i % 10] for i in range(n)]
    labels = torch.tensor([i % 10 for i in range(n)])
    cls = BoldReward if ec.reward == "digit_bold" else DigitProbReward
    R = cls(model=assets["reward_classifier"])
    P = DigitProbReward(model=assets["digit_classifier"])
    ev = assets["eval_classifier"]
    flow = is_flow_pipeline(pipe)  # SD3-class (digits.pretrain_flow): flow kernel, no UNet solvers
    ctx = pretrained(denoiser(pipe)) if use_pretrained else contextlib.nullcontext()
    out: dict = {}
    with ctx:
        gen = torch.Generator().manual_seed(seed)
        env = (FlowEnvironment if flow else UNetEnvironment)(pipe, kernel, ec.guidance_scale)
        b = sample_rollout(env, prompts, gen, record_reference=not use_pretrained)
        imgs = b.images
        r = R(imgs, prompts)
        out["reward_mean"], out["reward_se"] = mean_se(r)
        kl = b.path_kl if b.path_kl is not None else torch.zeros(n)
        out["path_kl_mean"], out["path_kl_se"] = mean_se(kl)  # exact KL of the K-step chain
        kl_ct = b.path_kl_ct if b.path_kl_ct is not None else torch.zeros(n)
        out["path_kl_ct_mean"], out["path_kl_ct_se"] = mean_se(kl_ct)  # continuous-time (Girsanov) estimate
        out["eval_accuracy"] = accuracy(ev, imgs, labels)
        out["digit_prob_mean"], out["digit_prob_se"] = mean_se(P(imgs, prompts))
        feats = classifier_features(ev, imgs)
        per_prompt = []
        for k in range(10):
            f = feats[labels == k]
            if len(f) > 1:
                per_prompt.append(float(torch.cdist(f, f).sum() / (len(f) * (len(f) - 1))))
        out["diversity_mean"], out["diversity_se"] = mean_se(per_prompt)
        test_x, _ = load_split("test", 8)
        test_feats = ev.features(test_x)
        out["fd"] = frechet_distance(feats, test_feats)
        out["images"] = imgs[:40].cpu()
        if solvers and not flow:
            for name, sampler, eta in (("dpmsolver", "dpmsolver++", 0.0), ("ode", "ddim", 0.0)):
                g2 = torch.Generator().manual_seed(seed + 1)
                im = sample_images(pipe, prompts, sampler, ec.eval_solver_steps, ec.guidance_scale, g2, eta)
                out[f"reward_{name}_mean"], out[f"reward_{name}_se"] = mean_se(R(im, prompts))
                out[f"fd_{name}"] = frechet_distance(classifier_features(ev, im), test_feats)
    return out
