"""Gaussian step kernels (sa_theory.kernels): one contract suite for every kernel (Euler on VP and rectified
flow, the flow-matching kernel on SD3's grid, DDIM, DDPM; another kernel joins by subclassing
TestKernelContract with its own ``kernel`` fixture), DDIM's eta as the family member e = eta^2, and a path KL
that is stable across step counts. Float64, no diffusers."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from sa_theory import kernels as K
from sa_theory.flow_kernel import FlowMatchKernel
from sa_theory.kernels import DDIMKernel, DDPMKernel, EulerKernel, family_kl_factor
from sa_theory.schedules import RectifiedFlow, VPLinear
from sa_theory.sde import ControlledSDE

M = 1000
# Stable Diffusion v1.5's training schedule: scaled_linear betas 0.00085..0.012, 1000 steps
SD15_ALPHAS = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, M) ** 2)


def leading(num_steps, offset=1):
    """diffusers' "leading" timesteps with steps_offset (SD1.5), and DDIM's previous timesteps t - M//K."""
    ratio = M // num_steps
    ts = (np.arange(num_steps) * ratio)[::-1].astype(np.int64) + offset
    return ts, ts - ratio


def ddim(num_steps, eta):
    ts, prev = leading(num_steps)
    return DDIMKernel(SD15_ALPHAS, ts, prev, SD15_ALPHAS[0], eta)


def ddpm(num_steps, final=1.0):
    ts, _ = leading(num_steps)
    return DDPMKernel(SD15_ALPHAS, ts, np.concatenate([ts[1:], [-1]]), final)


def _sd3_sigmas(num_steps, shift=3.0):
    """SD3's flow-matching grid: shifted sigmas from 1 down to 0 (FlowMatchEulerDiscreteScheduler, shift 3)."""
    u = np.linspace(1.0, 1.0 / num_steps, num_steps)
    return np.append(shift * u / (1 + (shift - 1) * u), 0.0)


KERNELS = {
    "euler_vp_eta1": lambda: EulerKernel(ControlledSDE(VPLinear(), noise=1.0), np.linspace(0, 1, 9)),
    "euler_vp_eta_tau": lambda: EulerKernel(ControlledSDE(VPLinear(), noise=lambda t: 0.5 + t), np.linspace(0, 1, 9)),
    "euler_vp_ode": lambda: EulerKernel(ControlledSDE(VPLinear(), noise=0.0), np.linspace(0, 1, 5)),
    "euler_rf_flowgrpo": lambda: EulerKernel(ControlledSDE(RectifiedFlow(t_max=0.99), noise=0.245),
                                             np.linspace(0, 0.99, 9)),
    "flow_sd3_ode_at_one": lambda: FlowMatchKernel(_sd3_sigmas(8), ("flow_grpo", 0.7), at_one="ode"),
    "flow_sd3_clamp": lambda: FlowMatchKernel(_sd3_sigmas(8), ("eta", 1.0), at_one="clamp"),
    "flow_dancegrpo": lambda: FlowMatchKernel(_sd3_sigmas(8), ("constant_sigma", 0.3)),
    "ddim_eta0": lambda: ddim(8, 0.0),
    "ddim_eta0.5": lambda: ddim(8, 0.5),
    "ddim_eta1": lambda: ddim(8, 1.0),
    "ddpm": lambda: ddpm(8),
}


@pytest.fixture(params=sorted(KERNELS), scope="module")
def kernel(request):
    return KERNELS[request.param]()


def _state(seed, shape=(4, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


# ----------------------------------------------------------------------------------- contract suite
class TestKernelContract:
    def test_grid_is_strictly_increasing(self, kernel):
        assert kernel.taus.shape == (kernel.num_steps + 1,) and np.all(np.diff(kernel.taus) > 0)
        assert kernel.taus[0] >= 0 and kernel.stds.shape == kernel.kl_weights.shape == (kernel.num_steps,)

    def test_mean_is_affine_in_the_action_with_the_recorded_slope(self, kernel):
        x, a, h = _state(0)
        for k in range(kernel.num_steps):
            m0, m1 = kernel.mean(k, x, a), kernel.mean(k, x, a + h)
            assert torch.allclose(m1 - m0, kernel.slope(k) * h, rtol=1e-10, atol=1e-12)
            mid = kernel.mean(k, x, a + 0.5 * h)
            assert torch.allclose(mid, 0.5 * (m0 + m1), rtol=1e-12, atol=1e-12)

    def test_kl_weight_is_slope_squared_over_variance_and_deterministic_steps_are_masked(self, kernel):
        x, a, b = _state(1)
        for k in range(kernel.num_steps):
            std = kernel.std(k)
            if kernel.stochastic[k]:
                assert std >= K.DETERMINISTIC_STD * kernel.state_scale[k]
                assert math.isclose(kernel.kl_weight(k), kernel.slope(k) ** 2 / std**2, rel_tol=1e-12)
                assert kernel.ct_kl_weight(k) > 0
            else:
                assert std == 0 and kernel.kl_weight(k) == 0 and kernel.ct_kl_weight(k) == 0
                assert torch.equal(kernel.log_prob(k, x, kernel.mean(k, x, a)), torch.zeros(x.shape[0]))
                for form in K.KL_FORMS:
                    assert torch.equal(kernel.step_kl(k, a, b, form), torch.zeros(x.shape[0], dtype=x.dtype))

    def test_log_prob_of_a_sampled_step_is_the_gaussian_density_summed_over_dims(self, kernel):
        x, a, z = _state(2)
        D = x[0].numel()
        for k in np.flatnonzero(kernel.stochastic):
            mean, std = kernel.mean(k, x, a), kernel.std(k)
            x1 = mean + std * z
            closed = -0.5 * (z**2).flatten(1).sum(1) - D * (math.log(std) + 0.5 * math.log(2 * math.pi))
            assert torch.allclose(kernel.log_prob(k, x1, mean), closed, rtol=1e-12, atol=1e-9)
            td = torch.distributions.Normal(mean.flatten(1), std).log_prob(x1.flatten(1)).sum(1)
            assert torch.allclose(kernel.log_prob(k, x1, mean), td, atol=1e-9)
            assert not torch.allclose(td / D, closed, atol=1e-3)  # negative control: the per-dim mean

    def test_step_kl_is_the_kl_of_the_two_gaussian_steps(self, kernel):
        x, a, b = _state(3)
        for k in np.flatnonzero(kernel.stochastic):
            p = torch.distributions.Normal(kernel.mean(k, x, a).flatten(1), kernel.std(k))
            q = torch.distributions.Normal(kernel.mean(k, x, b).flatten(1), kernel.std(k))
            exact = torch.distributions.kl_divergence(p, q).sum(1)
            assert torch.allclose(kernel.step_kl(k, a, b, "chain"), exact, rtol=1e-9)
            half = 0.5 * kernel.ct_kl_weight(k) * ((a - b) ** 2).flatten(1).sum(1)
            assert torch.allclose(kernel.step_kl(k, a, b, "continuous"), half, rtol=1e-12)

    def test_grid_log_probs_and_kls_are_the_per_step_ones(self, kernel):
        """The several-steps versions the methods call (batched in the Euler kernel) on any subset of steps."""
        x, a, b = _state(4)
        n = kernel.num_steps
        for ks in (list(range(n)), [0, n - 1], [n // 2]):
            xs, acts, refs = (torch.stack([t + 0.1 * k for k in ks]) for t in (x, a, b))
            nxt = torch.stack([kernel.mean(k, xs[i], acts[i]) + 0.3 * b for i, k in enumerate(ks)])
            want = torch.stack([kernel.log_prob(k, nxt[i], kernel.mean(k, xs[i], acts[i])) for i, k in enumerate(ks)])
            assert torch.allclose(kernel.grid_log_probs(ks, xs, nxt, acts), want, rtol=1e-12, atol=1e-12)
            for form in K.KL_FORMS:
                want = torch.stack([kernel.step_kl(k, acts[i], refs[i], form) for i, k in enumerate(ks)])
                assert torch.allclose(kernel.grid_step_kls(ks, acts, refs, form), want, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------- Euler kernel
def test_euler_weights_are_the_family_rate_frozen_and_integrated():
    """w_k = F(eta) g^2(tau_k) dtau (exact Euler-step KL) and the continuous weight is the rate's integral: for
    VPLinear F * (B(t_k) - B(t_{k+1})), for RectifiedFlow F * [-2t - 2 log(1 - t)], for eta(tau) by quad."""
    taus = np.linspace(0, 1, 6)
    vp = VPLinear()
    kern = EulerKernel(ControlledSDE(vp, noise=0.5), taus)
    t = 1 - taus
    F = family_kl_factor(0.5)
    assert np.allclose(kern.kl_weights, F * vp.g2(t[:-1]) * 0.2, rtol=1e-12)
    assert np.allclose(kern.ct_kl_weights, F * (vp.B(t[:-1]) - vp.B(t[1:])), rtol=1e-12)
    assert not np.allclose(kern.kl_weights, kern.ct_kl_weights, rtol=0.05)  # left point != integral here
    rf = RectifiedFlow(t_max=0.99)
    kern = EulerKernel(ControlledSDE(rf, noise=0.245), np.linspace(0, 0.99, 5))
    t = 0.99 - kern.taus
    G = -2 * t - 2 * np.log1p(-t)
    assert np.allclose(kern.ct_kl_weights, family_kl_factor(0.245) * (G[:-1] - G[1:]), rtol=1e-6)
    eta = lambda tau: 0.5 + tau  # noqa: E731
    kern = EulerKernel(ControlledSDE(vp, noise=eta), taus)
    ref = [quad(lambda s: family_kl_factor(eta(s)) * vp.g2(1 - s), a, b)[0] for a, b in zip(taus[:-1], taus[1:])]
    assert np.allclose(kern.ct_kl_weights, ref, rtol=1e-10)


@pytest.mark.parametrize("noise", [1.0, 0.5])
def test_euler_kernel_is_the_toy_rollouts_euler_chain(noise):
    """sa_theory.rollout's native Euler chain is the EulerKernel's chain: same transitions, log-probs and
    per-step KLs (the toy's KL weight rate x dtau is the kernel's chain weight)."""
    from sa_theory.rollout import rollout

    sde = ControlledSDE(VPLinear(), noise=noise)
    y0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    traj = rollout(sde, lambda tau, y, c: -y + 0.3 * torch.sin(3 * tau), y0, steps=8,
                   reference=lambda tau, y, c: -y, seed=0)
    kern = EulerKernel(sde, traj.taus.numpy())
    for k in range(8):
        x, a, s = traj.states[k], traj.actions[k], traj.ref_actions[k]
        mean = kern.mean(k, x, a)
        assert torch.allclose(mean + kern.std(k) * traj.noise[k], traj.states[k + 1], rtol=0, atol=1e-12)
        assert torch.allclose(kern.log_prob(k, traj.states[k + 1], mean), traj.log_probs[k], rtol=1e-12)
        assert torch.allclose(kern.step_kl(k, a, s), traj.kl_steps[k], rtol=1e-12)
    # the batched grid versions (the toy methods' path) are the per-step ones, on any subset of steps
    for ks in ([0, 3, 7], list(range(8)), [5]):
        lp = kern.grid_log_probs(ks, traj.states[ks], traj.states[[k + 1 for k in ks]], traj.actions[ks])
        assert torch.allclose(lp, traj.log_probs[ks], rtol=1e-12)
        for form in ("chain", "continuous"):
            kl = kern.grid_step_kls(ks, traj.actions[ks], traj.ref_actions[ks], form)
            want = torch.stack([kern.step_kl(k, traj.actions[k], traj.ref_actions[k], form) for k in ks])
            assert torch.allclose(kl, want, rtol=1e-12)


# ----------------------------------------------------------------------------------- DDIM's eta
@pytest.mark.parametrize("eta", [0.3, 0.5, 1.0])
def test_ddim_eta_is_the_family_member_e_equals_eta_squared(eta):
    """Module docstring: with e = eta^2, delta = B(t_k) - B(t_{k+1}), s = 1 - alphabar_k,
    std^2/(e delta) = 1 - (2-s)/(2s) delta + O(delta^2), slope/((1+e)delta/2) = 1 + (1-e)^2/(4(1+e)s) delta + ...,
    w/(F(e) delta) = 1 + (3 + e^2 - (1+e)s)/(2(1+e)s) delta + ...: checked through the remainder, O(delta^2)
    (remainder/(delta/s)^2 bounded as K doubles). Negative control: e = eta (not squared) is off by O(1)."""
    e = eta**2
    worst = []
    for n in (50, 100, 200, 400):
        kern = ddim(n, eta)
        sel = (1 - kern.alphabar) >= 0.1  # steps small against the noise level: delta/s <= 10 delta
        d, s = kern.delta_B[sel], 1 - kern.alphabar[sel]
        var, lam, w = kern.stds[sel] ** 2, kern.slopes[sel], kern.kl_weights[sel]
        r_var = var / (e * d) - (1 - (2 - s) / (2 * s) * d)
        r_lam = lam / ((1 + e) * d / 2) - (1 + (1 - e) ** 2 / (4 * (1 + e) * s) * d)
        r_w = w / (family_kl_factor(e) * d) - (1 + (3 + e**2 - (1 + e) * s) / (2 * (1 + e) * s) * d)
        worst.append(max(np.abs(r / (d / s) ** 2).max() for r in (r_var, r_lam, r_w)))
        rel_w = np.abs(w / (family_kl_factor(e) * d) - 1).max()
        assert rel_w < 20 * d.max() / s.min()  # first order in the step over the noise level
        if eta != 1.0:  # e = eta is a different member: O(1) off, not O(delta)
            assert np.abs(var / (eta * d) - 1).min() > 0.4 * (1 - eta)
            assert np.abs(w / (family_kl_factor(eta) * d) - 1).min() > 0.3
    assert max(worst) < 3 and worst[-1] <= 1.2 * worst[0]  # remainder O((delta/s)^2), constant not growing
    assert abs(ddim(400, eta).stds[200] ** 2 / (e * ddim(400, eta).delta_B[200]) - 1) < 0.01


def test_ddim_eta1_is_exactly_the_ddpm_step():
    """Exact discrete statement: DDIM(1) and DDPM (fixed_small) have the same mean coefficients and std, and DDIM's
    variance at eta is eta^2 times DDPM's."""
    a, b, half = ddim(20, 1.0), ddpm(20, final=SD15_ALPHAS[0]), ddim(20, 0.5)
    for name in ("c_x", "slopes", "stds", "kl_weights"):
        assert np.allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=0), name
    assert np.allclose(half.stds**2, 0.25 * b.stds**2, rtol=1e-12)


# ----------------------------------------------------------------------------------- path KL vs K
def _path_kls(num_steps, c=2.0):
    """A fixed smooth score difference |a - s|^2 = c sigma_t (summed over dims, sigma_t = sqrt(1 - alphabar)) at
    each step's start, DDIM eta = 1 on SD1.5's alphas with "trailing" timesteps (999, 999 - M/K, ...: the same
    span [1/M, 1] for every K; SD1.5's "leading" spacing starts at t_0 = 0.952 for K = 20 but 0.997 for K = 200,
    which changes the path KL itself). Returns the chain KL sum_k w_k/2 |a-s|^2, the continuous-time estimate
    sum_k wbar_k/2 |a-s|^2 and the exact Girsanov value (c/2) int sigma dB = (c/2) [2 artanh(sigma) - 2 sigma]."""
    ratio = M // num_steps
    ts = (M - 1 - ratio * np.arange(num_steps)).astype(np.int64)
    kern = DDIMKernel(SD15_ALPHAS, ts, ts - ratio, SD15_ALPHAS[0], 1.0)
    diff2 = c * np.sqrt(1 - kern.alphabar)
    G = lambda ab: 2 * np.arctanh(np.sqrt(1 - ab)) - 2 * np.sqrt(1 - ab)  # noqa: E731
    exact = 0.5 * c * (G(kern.alphabar[0]) - G(kern.alphabar_prev[-1]))
    return 0.5 * (kern.kl_weights * diff2).sum(), 0.5 * (kern.ct_kl_weights * diff2).sum(), exact


def test_continuous_path_kl_is_stable_across_step_counts_and_the_chain_kl_is_not():
    res = {n: _path_kls(n) for n in (10, 20, 50, 100, 200)}
    ct = np.array([res[n][1] for n in (20, 50, 100, 200)])
    chain = np.array([res[n][0] for n in (20, 50, 100, 200)])
    exact = res[200][2]
    assert (ct.max() - ct.min()) / ct.mean() < 0.05  # continuous-time estimate: < 5% over K = 20..200
    assert np.all(np.abs(ct / exact - 1) < 0.02) and abs(res[10][1] / exact - 1) < 0.05
    assert (chain.max() - chain.min()) / chain.mean() > 0.05  # negative control: the chain KL moves with K
    assert np.all(np.diff(chain) < 0) and np.all(chain > ct)  # and exceeds it, less as the steps shrink
    assert res[10][0] > 2 * res[10][1]


# ----------------------------------------------------------------------------------- threshold and bad input
def test_ddpm_step_to_zero_noise_is_deterministic_and_the_threshold_is_needed(monkeypatch):
    kern = ddpm(10)  # SD1.5 (steps_offset=1): the last step goes from timestep 1 to "-1" (alphabar 1)
    assert kern.timesteps[-1] == 1 and kern.alphabar_prev[-1] == 1.0
    assert not kern.stochastic[-1] and kern.stochastic[:-1].all() and np.all(np.isfinite(kern.kl_weights))
    assert kern.kl_weights.max() < 100
    # diffusers clamps that zero variance to 1e-20: as a "random" step its KL weight would be ~1e14
    assert kern.slopes[-1] ** 2 / 1e-20 > 1e13
    monkeypatch.setattr(K, "DETERMINISTIC_STD", 0.0)
    with pytest.raises(ValueError, match="kl_weight"):  # without the threshold: an infinite weight
        ddpm(10)


def test_bad_input_names_the_parameter():
    ts, prev = leading(10)
    with pytest.raises(ValueError, match="'eta'"):
        DDIMKernel(SD15_ALPHAS, ts, prev, SD15_ALPHAS[0], 1.5)
    with pytest.raises(ValueError, match="'timesteps'"):
        DDIMKernel(SD15_ALPHAS, ts + 99, prev + 99, SD15_ALPHAS[0], 1.0)  # 1000 is out of range
    with pytest.raises(ValueError, match="prev_timesteps"):
        DDIMKernel(SD15_ALPHAS, ts, prev - 1, SD15_ALPHAS[0], 1.0)  # does not chain
    with pytest.raises(ValueError, match="'schedule'"):
        DDIMKernel(SD15_ALPHAS, ts, prev, SD15_ALPHAS[0], 1.0, schedule=ddim(5, 1.0).schedule.__class__(
            alphas_cumprod=tuple(SD15_ALPHAS**2)))
    with pytest.raises(ValueError, match="KL form"):
        ddim(5, 1.0).weights("girsanov")
    with pytest.raises(ValueError, match="taus"):
        EulerKernel(ControlledSDE(VPLinear()), np.array([0.0, 0.5, 0.4, 1.0]))
    with pytest.raises(ValueError, match="taus"):
        EulerKernel(ControlledSDE(VPLinear()), np.array([0.0, 2.0]))
