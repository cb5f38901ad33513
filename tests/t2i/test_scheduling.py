"""The diffusers adapter of the core kernels: pinned against diffusers' schedulers' ``step``, SD1.5's real scheduler
config for every step count, and DDPM training on the tiny pipeline."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sa_theory import kernels as core
from sa_theory.kernels import family_kl_factor
from sa_theory.kl import gaussian_log_prob, gaussian_mean_kl
from t2i.scheduling import DiscreteVPSchedule, kernel_from_scheduler, make_kernel, score_from_eps

SD_SCHED = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    steps_offset=1,
)


def ddim(steps, set_alpha_to_one=False):
    s = DDIMScheduler(set_alpha_to_one=set_alpha_to_one, **SD_SCHED)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_ddim_mean_and_std_equal_scheduler_step(eta, dtype, tol):
    sch = ddim(10)
    if dtype == torch.float64:  # diffusers keeps alphas_cumprod in float32; make its arithmetic float64 too
        sch.alphas_cumprod, sch.final_alpha_cumprod = (
            sch.alphas_cumprod.double(),
            sch.final_alpha_cumprod.double(),
        )
    kern = kernel_from_scheduler(sch, eta)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(sch.timesteps):
        x = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
        eps = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
        mean_ref = sch.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        action = score_from_eps(eps, float(kern.alphabar[k]))
        assert torch.allclose(kern.mean(k, x, action), mean_ref, atol=tol, rtol=0)
        z = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
        with_noise = sch.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        std_ref = ((with_noise - mean_ref) / z).median()  # std * z / z
        assert abs(float(std_ref) - kern.std(k)) < 10 * tol
        # the mean is affine in the action with the recorded coefficients
        assert torch.allclose(kern.c_x[k] * x + kern.slope(k) * action, mean_ref, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_ddpm_mean_and_std_equal_scheduler_step_with_seeded_noise(dtype, tol):
    sch = DDPMScheduler(**SD_SCHED)
    sch.set_timesteps(10)
    if dtype == torch.float64:
        sch.alphas_cumprod = sch.alphas_cumprod.double()
    kern = kernel_from_scheduler(sch)
    g = torch.Generator().manual_seed(1)
    for k, t in enumerate(sch.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
        eps = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
        out = sch.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=dtype)
        ours = kern.mean(k, x, score_from_eps(eps, float(kern.alphabar[k]))) + kern.std(k) * z
        if kern.stochastic[k]:
            assert torch.allclose(ours, out, atol=tol, rtol=0)
        else:  # SD1.5's last step (timestep 1 -> "-1"): diffusers adds its clamped std 1e-10 of noise, we add none
            assert k == kern.num_steps - 1 and int(t) == 1 and kern.alphabar_prev[k] == 1.0
            assert torch.allclose(ours, out, atol=tol + core.DETERMINISTIC_STD * float(z.abs().max()), rtol=0)


def test_timestep_to_vp_time_reproduces_alphas_cumprod():
    sch = ddim(50)
    vp = DiscreteVPSchedule(alphas_cumprod=tuple(sch.alphas_cumprod.double().tolist()))
    i = np.arange(1000)
    t = vp.t_of_timestep(i)
    assert np.allclose(vp.alphabar(t), sch.alphas_cumprod.double().numpy(), rtol=1e-12, atol=0)
    # alpha_t = sqrt(alphabar), sigma_t^2 = 1 - alphabar, torch path agrees with numpy path
    tt = torch.tensor(t)
    assert torch.allclose(vp.alpha(tt) ** 2, sch.alphas_cumprod.double(), rtol=1e-12)
    assert torch.allclose(vp.marginal_var(tt), 1 - sch.alphas_cumprod.double(), rtol=1e-10)
    # g^2 integrates to B: sum over unit intervals of g2 * (1/M) = -log alphabar
    mid = (i + 0.5) / 1000
    assert np.allclose(np.cumsum(vp.g2(mid)) / 1000, -np.log(sch.alphas_cumprod.double().numpy()), rtol=1e-10)
    assert math.isclose(vp.t_of_alphabar(float(sch.alphas_cumprod[500])), t[500], rel_tol=1e-9)


def test_kl_weight_is_effective_g2_dtau_in_the_fine_step_limit():
    """w_k = slope^2/std^2 -> B(t_k) - B(t_{k+1}) as steps grow (continuous-time limit; the continuous weight is it),
    wherever the step is small against the noise level (dB << 1 - alphabar; checked on t >= 0.1)."""
    errs = []
    for n in (20, 100, 500):
        k = kernel_from_scheduler(ddim(n), 1.0)
        s = k.schedule
        dB = np.array([s.B(a) - s.B(b) for a, b in zip(k.t, k.t_prev)])
        assert np.allclose(dB, k.delta_B, rtol=1e-10) and np.allclose(k.ct_kl_weights, dB, rtol=1e-10)
        sel = k.t >= 0.1
        rel = np.abs(k.kl_weights[sel] / dB[sel] - 1)
        errs.append(rel.max())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05


def test_log_prob_is_the_gaussian_density_summed_over_dims_and_mean_variant_fails():
    sch = ddim(10)
    kern = kernel_from_scheduler(sch, 1.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn_like(x)
    k = 3
    mean = kern.mean(k, x, score_from_eps(eps, float(kern.alphabar[k])))
    x1 = mean + kern.std(k) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    lp = kern.log_prob(k, x1, mean)
    std = kern.std(k)
    D = x[0].numel()
    closed = (-0.5 * ((x1 - mean) / std) ** 2).flatten(1).sum(1) - D * (
        math.log(std) + 0.5 * math.log(2 * math.pi)
    )
    assert torch.allclose(lp, closed, rtol=0, atol=1e-9)
    td = torch.distributions.Normal(mean.flatten(1), std).log_prob(x1.flatten(1)).sum(1)
    assert torch.allclose(lp, td, atol=1e-9)
    # DDPO's patched scheduler averaged over pixels: that quantity is NOT the log-density
    mean_variant = torch.distributions.Normal(mean.flatten(1), std).log_prob(x1.flatten(1)).mean(1)
    assert not torch.allclose(mean_variant, closed, atol=1e-3)
    assert torch.allclose(gaussian_log_prob(x1, mean, std), closed, atol=1e-9)


def test_step_kl_equals_squared_mean_gap_and_girsanov_form():
    kern = kernel_from_scheduler(ddim(10), 1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    e1, e2 = torch.randn_like(x), torch.randn_like(x)
    for k in range(kern.num_steps):
        # the action is the score a = -eps / sqrt(1 - alphabar)
        a1, a2 = score_from_eps(e1, kern.alphabar[k]), score_from_eps(e2, kern.alphabar[k])
        m1, m2 = kern.mean(k, x, a1), kern.mean(k, x, a2)
        kl = kern.step_kl(k, a1, a2)  # (w_k / 2) |a1 - a2|^2
        closed = ((m1 - m2) ** 2).flatten(1).sum(1) / (2 * kern.std(k) ** 2)
        assert torch.allclose(kl, closed, rtol=1e-8)
        # and it is the KL of the two Gaussians (torch.distributions)
        p = torch.distributions.Normal(m1.flatten(1), kern.std(k))
        q = torch.distributions.Normal(m2.flatten(1), kern.std(k))
        assert torch.allclose(kl, torch.distributions.kl_divergence(p, q).sum(1), rtol=1e-8)
        assert torch.allclose(kl, gaussian_mean_kl(m1, m2, kern.std(k)), rtol=1e-8)
        # a per-pixel-mean "KL" is off by the dimension D
        assert not torch.allclose(kl, closed / x[0].numel(), rtol=1e-3)


def test_deterministic_steps_are_masked_and_clipping_is_refused():
    kern = kernel_from_scheduler(ddim(5, set_alpha_to_one=True), 1.0)
    assert not kern.stochastic[-1] and kern.stochastic[:-1].all()
    x = torch.randn(2, 4, 4, 4)
    assert torch.equal(kern.log_prob(4, x, x), torch.zeros(2))
    s = DDIMScheduler(**{**SD_SCHED, "clip_sample": True})
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="clip_sample"):
        kernel_from_scheduler(s, 1.0)
    with pytest.raises(ValueError, match="no log-probabilities"):
        make_kernel(s.config, "dpmsolver++", 5)
    # diffusers' DDIM steps to t - M//K, which is not the next timestep of a "linspace" grid: refused
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        make_kernel({**SD_SCHED, "timestep_spacing": "linspace"}, "ddim", 10)


#: Stable Diffusion v1.5's scheduler/scheduler_config.json, verbatim (a PNDMScheduler; no download)
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def test_every_training_sampler_on_sd15_has_finite_sane_kl_weights_for_every_step_count():
    """For K = 1..1000 on SD1.5's config: where diffusers' timesteps are valid (all but K = 1000, whose
    steps_offset=1 puts the first timestep at 1000, out of range: the kernel refuses it naming 'timesteps'),
    every per-step KL weight is finite and >= 0; a step to zero noise (DDPM's "timestep -1") is deterministic;
    on stochastic steps the chain weight is at least the continuous one F(e) delta_k and exceeds it at most
    6x the step's noise-variance ratio (1 - alphabar_k)/(1 - alphabar_{k+1}) (the expansion in
    sa_theory.kernels; measured max 5.0 at eta_DDIM = 0.5, 2.5 at eta = 1); no weight above 1e4 (the largest
    genuine one, 1.1e3, is K = 2's jump from timestep 501 to 1). The diffusers-clamped variance 1e-20 of
    DDPM's last step, taken as random, gives ~1e14: the negative control."""
    samplers = [
        ("ddim", 0.0, DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)),
        ("ddim", 0.5, DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)),
        ("ddim", 1.0, DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)),
        ("ddpm", 1.0, DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG, variance_type="fixed_small")),
    ]
    vp = DiscreteVPSchedule(alphas_cumprod=tuple(samplers[0][2].alphas_cumprod.double().tolist()))
    refused = []
    for name, eta, sch in samplers:
        for n in range(1, 1001):
            sch.set_timesteps(n)
            if int(sch.timesteps.max()) >= 1000:
                with pytest.raises(ValueError, match="'timesteps' must lie in"):
                    kernel_from_scheduler(sch, eta, schedule=vp)
                refused.append((name, n))
                continue
            kern = kernel_from_scheduler(sch, eta, schedule=vp)
            w, st = kern.kl_weights, kern.stochastic
            assert np.all(np.isfinite(w)) and np.all(w >= 0) and np.all(np.isfinite(kern.ct_kl_weights))
            assert not np.any(st & (kern.alphabar_prev >= 1.0)), (name, eta, n)
            assert w.max() < 1e4, (name, eta, n)
            if eta == 0.0:
                assert not st.any() and not w.any()
                continue
            ratio = w[st] / (family_kl_factor(kern.family_eta) * kern.delta_B[st])
            noise_ratio = (1 - kern.alphabar[st]) / (1 - kern.alphabar_prev[st])
            assert np.all(ratio >= 1 - 1e-9) and np.all(ratio <= 6 * noise_ratio), (name, eta, n)
    assert refused == [(name, 1000) for name in ("ddim", "ddim", "ddim", "ddpm")]
    # negative control: DDPM's step to timestep -1 with diffusers' clamped variance, taken as random
    sch = samplers[-1][2]
    sch.set_timesteps(10)
    kern = kernel_from_scheduler(sch)
    clamped = float(sch._get_variance(int(sch.timesteps[-1])))
    assert clamped == pytest.approx(1e-20) and kern.slope(9) ** 2 / clamped > 1e13 and kern.kl_weight(9) == 0


def test_ddpm_training_on_the_tiny_pipeline_has_a_path_kl_like_ddim_eta1(tmp_path):
    """The issue: DDPM training logged a path KL of 7e12 nats (the last step's weight 2.9e14). Now two epochs
    of sa_ac with DDPM and with DDIM (eta = 1) on the tiny pipeline give finite path KLs of the same order."""
    from t2i.trainer import make_trainer

    from .conftest import tiny_config

    out = {}
    for sampler in ("ddpm", "ddim"):
        over = {"sample.sampler": sampler, "train.num_epochs": 2, "sample.num_steps": 3, "sample.batch_size": 2}
        cfg = tiny_config(tmp_path / sampler, "sa_ac", **over)
        hist = make_trainer(cfg).train()
        out[sampler] = hist[-1]
        for h in hist:
            assert math.isfinite(h["train/loss"]) and abs(h["train/loss"]) < 1e3
    for key in ("path_kl_mean", "path_kl_ct_mean"):
        a, b = out["ddpm"][key], out["ddim"][key]
        assert 0 < a < 1e3 and 0 < b < 1e3 and 0.1 < a / b < 10, (key, a, b)


def test_rollouts_record_both_kls_and_methods_regularise_with_the_configured_one(tiny_pipe, tmp_path):
    """sample_rollout records the chain KL and the continuous-time KL per step; a method's per-step KL term (and
    its recorded KLs for the return) is the one named by train.kl_weighting."""
    from sa_theory.algorithms.methods import make_method
    from t2i.config import method_config
    from t2i.environments import UNetEnvironment
    from t2i.models import lora_parameters
    from t2i.rollout import sample_rollout

    from .conftest import tiny_config

    saved = [p.detach().clone() for p in lora_parameters(tiny_pipe.unet)]
    g = torch.Generator().manual_seed(5)
    try:
        with torch.no_grad():  # move the policy away from the pretrained model
            for p in lora_parameters(tiny_pipe.unet):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        _, kern = make_kernel(tiny_pipe.scheduler.config, "ddim", 4, 1.0)
        env = UNetEnvironment(tiny_pipe, kern, 3.0)
        batch = sample_rollout(env, ["a cat", "a dog"], torch.Generator().manual_seed(0))
        assert torch.all(batch.kl_steps > 0) and torch.all(batch.kl_steps_ct > 0)
        w, wbar = torch.tensor(kern.kl_weights), torch.tensor(kern.ct_kl_weights)
        assert torch.allclose(batch.kl_steps_ct, batch.kl_steps * (wbar / w)[:, None].float(), rtol=1e-5)
        assert torch.all(batch.path_kl > batch.path_kl_ct)  # the chain KL exceeds the continuous one at K = 4
        for form in ("chain", "continuous"):
            cfg = tiny_config(tmp_path, "sa_ac", **{"train.kl_weighting": form})
            method = make_method(method_config(cfg), env, tiny_pipe.unet)
            assert method.kl_steps(batch) is batch.kl_steps_of(form)
            for k in range(4):
                kl = method.step_terms(batch, [k])["kl"][0].detach()
                assert torch.allclose(kl, batch.kl_steps_of(form)[k], rtol=1e-4), (form, k)
    finally:
        with torch.no_grad():
            for p, s in zip(lora_parameters(tiny_pipe.unet), saved):
                p.copy_(s)
