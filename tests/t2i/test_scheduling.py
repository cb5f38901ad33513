"""Per-step Gaussian kernels, log-probs and KLs: pinned against diffusers' schedulers and closed forms."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sa_theory.kl import gaussian_log_prob, gaussian_mean_kl
from t2i.rollout import step_kl, step_log_prob
from t2i.scheduling import DDIMKernel, DDPMKernel, DiscreteVPSchedule, make_kernel, score_from_eps

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
    kern = DDIMKernel.from_scheduler(sch, eta)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(sch.timesteps):
        x = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
        eps = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
        mean_ref = sch.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        assert torch.allclose(kern.mean(x, eps, k), mean_ref, atol=tol, rtol=0)
        z = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
        with_noise = sch.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        std_ref = ((with_noise - mean_ref) / z).median()  # std * z / z
        assert abs(float(std_ref) - kern.std[k]) < 10 * tol
        # the mean is affine in eps with the recorded coefficients
        assert torch.allclose(kern.c_x[k] * x + kern.c_eps[k] * eps, mean_ref, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_ddpm_mean_and_std_equal_scheduler_step_with_seeded_noise(dtype, tol):
    sch = DDPMScheduler(**SD_SCHED)
    sch.set_timesteps(10)
    if dtype == torch.float64:
        sch.alphas_cumprod = sch.alphas_cumprod.double()
    kern = DDPMKernel.from_scheduler(sch)
    g = torch.Generator().manual_seed(1)
    for k, t in enumerate(sch.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
        eps = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
        out = sch.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=dtype)
        assert torch.allclose(kern.step(x, eps, k, z), out, atol=tol, rtol=0)


def test_timestep_to_vp_time_reproduces_alphas_cumprod():
    sch = ddim(50)
    vp = DiscreteVPSchedule.from_scheduler(sch)
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
    """w_k = c_eps^2 (1 - alphabar)/std^2 -> B(t_k) - B(t_{k+1}) as steps grow (continuous-time limit),
    wherever the step is small against the noise level (dB << 1 - alphabar; checked on t >= 0.1)."""
    errs = []
    for n in (20, 100, 500):
        k = DDIMKernel.from_scheduler(ddim(n), 1.0)
        s = k.schedule
        dB = np.array([s.B(a) - s.B(b) for a, b in zip(k.t, k.t_prev)])
        sel = k.t >= 0.1
        rel = np.abs(k.kl_weight[sel] / dB[sel] - 1)
        errs.append(rel.max())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05


def test_log_prob_is_the_gaussian_density_summed_over_dims_and_mean_variant_fails():
    sch = ddim(10)
    kern = DDIMKernel.from_scheduler(sch, 1.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn_like(x)
    k = 3
    mean = kern.mean(x, eps, k)
    x1 = kern.step(x, eps, k, torch.randn(x.shape, generator=g, dtype=x.dtype))
    lp = step_log_prob(kern, k, x1, mean)
    std = kern.std[k]
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
    kern = DDIMKernel.from_scheduler(ddim(10), 1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    e1, e2 = torch.randn_like(x), torch.randn_like(x)
    for k in range(kern.num_steps):
        m1, m2 = kern.mean(x, e1, k), kern.mean(x, e2, k)
        kl = step_kl(kern, k, m1, m2)
        closed = ((m1 - m2) ** 2).flatten(1).sum(1) / (2 * kern.std[k] ** 2)
        assert torch.allclose(kl, closed, rtol=1e-10)
        # = (w_k / 2) |a1 - a2|^2 with a = -eps / sqrt(1 - alphabar)  (the score is the action)
        a1, a2 = score_from_eps(e1, kern.alphabar[k]), score_from_eps(e2, kern.alphabar[k])
        girsanov = 0.5 * kern.kl_weight[k] * ((a1 - a2) ** 2).flatten(1).sum(1)
        assert torch.allclose(kl, girsanov, rtol=1e-8)
        # and it is the KL of the two Gaussians (torch.distributions)
        p = torch.distributions.Normal(m1.flatten(1), kern.std[k])
        q = torch.distributions.Normal(m2.flatten(1), kern.std[k])
        assert torch.allclose(kl, torch.distributions.kl_divergence(p, q).sum(1), rtol=1e-8)
        assert torch.allclose(kl, gaussian_mean_kl(m1, m2, kern.std[k]), rtol=1e-12)
        # a per-pixel-mean "KL" is off by the dimension D
        assert not torch.allclose(kl, closed / x[0].numel(), rtol=1e-3)


def test_deterministic_steps_are_masked_and_clipping_is_refused():
    kern = DDIMKernel.from_scheduler(ddim(5, set_alpha_to_one=True), 1.0)
    assert not kern.stochastic[-1] and kern.stochastic[:-1].all()
    x = torch.randn(2, 4, 4, 4)
    assert torch.equal(step_log_prob(kern, 4, x, x), torch.zeros(2))
    s = DDIMScheduler(**{**SD_SCHED, "clip_sample": True})
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="clip_sample"):
        DDIMKernel.from_scheduler(s, 1.0)
    with pytest.raises(ValueError, match="no log-probabilities"):
        make_kernel(s.config, "dpmsolver++", 5)
