"""The noise-level family dY = [-f Y + (1+eta)/2 g^2 a] dtau + sqrt(eta) g dB (theory.md §5) against closed forms.

Float64 throughout. Deterministic checks state their tolerance; Monte-Carlo checks use 4.5 standard errors
(fixed seeds). Every check has a negative control (the eta = 1 formula used at eta != 1, or a wrong
coefficient) that must fail the same tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from sa_theory import kl, schedules
from sa_theory.rollout import rollout
from sa_theory.sde import ControlledSDE
from tests.test_linear_gaussian import finite_dim_kl, random_problem, richardson_fd
from toy_problems import GaussianMixtureProblem, LinearGaussianProblem

VP = schedules.VPLinear(b_min=0.1, b_max=20.0, T=1.0)
RF = schedules.RectifiedFlow(t_max=0.999)
RF9 = schedules.RectifiedFlow(t_max=0.9)
Z = 4.5


def eta_ramp(T):
    """A time-dependent noise level, 0.1 at tau = 0 rising to 2 at tau = T."""
    return lambda tau: 0.1 + 1.9 * tau / T


ETAS = [0.0, 0.1, 0.245, 0.5, 1.0, 2.0, "ramp"]


def _noise(eta, schedule):
    return eta_ramp(schedule.T) if eta == "ramp" else eta


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- the SDE's coefficients
def test_coefficients_kl_weight_and_input_checks():
    tau = torch.linspace(0, RF.T, 7)
    g2 = RF.g2_tau(tau)
    for eta in (0.245, 1.0, 2.0):
        sde = ControlledSDE(RF, noise=eta)
        assert torch.allclose(sde.action_coef(tau), (1 + eta) / 2 * g2, rtol=1e-14)
        assert torch.allclose(sde.diffusion(tau) ** 2, eta * g2, rtol=1e-12)
        assert torch.allclose(sde.kl_weight_rate(tau), (1 + eta) ** 2 / (4 * eta) * g2, rtol=1e-14)
    one = ControlledSDE(VP)  # eta = 1 is bitwise the section-1 sampler
    y, a, t = torch.randn(5, 3), torch.randn(5, 3), torch.tensor(0.3)
    assert torch.equal(one.drift(t, y, a), -VP.f_tau(t) * y + VP.g2_tau(t) * a)
    assert torch.equal(one.diffusion(t), VP.g2_tau(t).sqrt()) and torch.equal(one.kl_weight_rate(t), VP.g2_tau(t))
    ode = ControlledSDE(VP, ode=True)
    assert ode.noise == 0.0 and ControlledSDE(VP, noise=0).ode and float(ode.diffusion(t)) == 0.0
    assert torch.equal(ode.drift(t, y, a), -VP.f_tau(t) * y + 0.5 * VP.g2_tau(t) * a)
    ramp = ControlledSDE(RF, noise=eta_ramp(RF.T))
    assert torch.allclose(ramp.eta(tau), 0.1 + 1.9 * tau / RF.T) and abs(ramp.eta(0.5) - (0.1 + 0.95 / RF.T)) < 1e-14
    with pytest.raises(ValueError, match="infinite"):
        ode.kl_weight_rate(t)
    with pytest.raises(ValueError, match="noise"):
        ControlledSDE(VP, noise=-0.1)
    with pytest.raises(ValueError, match="noise"):
        ControlledSDE(VP, noise=float("nan"))
    with pytest.raises(ValueError, match="ode=True"):
        ControlledSDE(VP, noise=0.5, ode=True)
    with pytest.raises(ValueError, match="noise"):
        ControlledSDE(VP, noise=lambda s: s - 0.5).eta(torch.tensor(0.1))


# ----------------------------------------------------------------------------- marginal preservation
def _pretrained_moments(prob, sde, taus, wrong_gain=False):
    """Mean/cov of the pretrained eta-process at ``taus`` by its moment ODEs, written from the sde's methods."""
    d = prob.d

    def rhs(tau, z):
        m, P = z[:d], z[d:].reshape(d, d)
        t = prob.T - tau
        Ls, ls = prob._score_affine(t)
        c = float(sde.g2(tau)) if wrong_gain else float(sde.action_coef(tau))
        A = -float(prob.schedule.f(t)) * np.eye(d) + c * Ls
        return np.concatenate([A @ m + c * ls, (A @ P + P @ A.T + float(sde.diffusion(tau)) ** 2 * np.eye(d)).ravel()])

    m0, P0 = prob.initial_law()
    sol = solve_ivp(rhs, (0.0, prob.T), np.concatenate([m0, P0.ravel()]), method="DOP853", rtol=1e-11,
                    atol=1e-13, t_eval=taus)
    return [(sol.y[:d, i], sol.y[d:, i].reshape(d, d)) for i in range(len(taus))]


@pytest.mark.parametrize("schedule", [VP, RF], ids=["vp", "rf"])
def test_pretrained_eta_process_has_the_data_marginals_moment_odes(schedule):
    prob = random_problem(3, 2, schedule, False, 1.0)
    taus = np.linspace(0.0, schedule.T, 6)
    worst, worst_wrong = 0.0, np.inf
    for eta in ETAS:
        sde = ControlledSDE(schedule, noise=_noise(eta, schedule))
        for tau, (m, P) in zip(taus, _pretrained_moments(prob, sde, taus)):
            mt, Pt = prob.marginal(schedule.T - tau)
            worst = max(worst, np.abs(m - mt).max(), np.abs(P - Pt).max())
        if eta != 1.0:  # negative control: the eta = 1 action coefficient g^2 with eta's noise
            m, P = _pretrained_moments(prob, sde, taus[-1:], wrong_gain=True)[0]
            worst_wrong = min(worst_wrong, np.abs(P - prob.S0).max() + np.abs(m - prob.m0).max())
    assert worst < 1e-7, worst
    assert worst_wrong > 1e-2, worst_wrong


MIX = dict(weights=[0.3, 0.7], means=[[-1.0], [1.2]], covs=[[[0.2]], [[0.3]]], w=[0.5], beta=1.0)


def _mixture_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-path statistics whose means are compared with the data: x, x^2, 1{x > 0}. ``(n, 3)``."""
    x = x[:, 0]
    return torch.stack([x, x**2, (x > 0).to(x.dtype)], 1)


def _mixture_exact(p) -> np.ndarray:
    m, s2 = p.means[:, 0], p.covs[:, 0, 0]
    prob_pos = 0.5 * (1 + np.array([math.erf(mk / math.sqrt(2 * vk)) for mk, vk in zip(m, s2)]))
    return np.array([p.weights @ m, p.weights @ (s2 + m**2), p.weights @ prob_pos])


def _mc_marginal_z(sde, p, backend, n=20_000, steps=400, seed=0):
    pre, _ = p.action_fns()
    gen = torch.Generator().manual_seed(seed)
    y0 = p.initial_sample(n, gen)
    traj = rollout(sde, pre, y0, steps=steps, backend=backend, generator=gen if backend == "native" else None,
                   seed=seed, save_every=None)
    S = _mixture_stats(traj.final)
    mean, se = S.mean(0).numpy(), (S.std(0) / math.sqrt(n)).numpy()
    return (mean - _mixture_exact(p)) / se


@dataclass(frozen=True)
class _WrongGainSDE(ControlledSDE):
    """Negative control: the eta = 1 action coefficient g^2 with the noise sqrt(eta) g."""

    def action_coef(self, tau):
        return self.schedule.g2_tau(tau)


@pytest.mark.parametrize("backend", ["native", pytest.param("torchsde", marks=pytest.mark.slow)])
@pytest.mark.parametrize("eta", [0.245, pytest.param("ramp", marks=pytest.mark.slow)])
def test_pretrained_eta_process_has_the_data_marginals_monte_carlo(eta, backend):
    """Nonlinear score (1-d mixture), rectified flow on [0, 0.99], 400 Euler steps, 20 000 paths."""
    rf = schedules.RectifiedFlow(t_max=0.99)
    p = GaussianMixtureProblem(**MIX, schedule=rf)
    z = _mc_marginal_z(ControlledSDE(rf, noise=_noise(eta, rf)), p, backend)
    assert np.abs(z).max() < Z, z
    z_wrong = _mc_marginal_z(_WrongGainSDE(rf, noise=_noise(eta, rf)), p, backend)
    assert np.abs(z_wrong).max() > Z, z_wrong


# ----------------------------------------------------------------------------- the KL rate
@pytest.mark.parametrize("eta", [0.1, 0.245, 1.0, 3.0])
def test_per_step_gaussian_kl_of_the_euler_step_is_the_formula(eta):
    sde = ControlledSDE(RF, noise=eta)
    gen = torch.Generator().manual_seed(1)
    y, a, b = (torch.randn(64, 3, generator=gen) for _ in range(3))
    for tau in (0.0, 0.4, 0.95):
        tau, dt = torch.tensor(tau), 1e-3
        std = sde.diffusion(tau) * math.sqrt(dt)
        exact = kl.gaussian_mean_kl(y + sde.drift(tau, y, a) * dt, y + sde.drift(tau, y, b) * dt, std)
        formula = (1 + eta) ** 2 / (8 * eta) * RF.g2_tau(tau) * dt * ((a - b) ** 2).sum(1)
        assert torch.allclose(kl.girsanov_kl_step(sde.kl_weight_rate(tau), dt, a, b), exact, rtol=1e-12)
        assert torch.allclose(formula, exact, rtol=1e-12)
        wrong = kl.girsanov_kl_step(sde.g2(tau), dt, a, b)  # the eta = 1 formula
        assert eta == 1.0 or (wrong / exact - 1).abs().min() > 0.05
        assert (exact / 3 / exact - 1).abs().min() > 0.5  # peers' mean over dimensions is not it


@pytest.mark.parametrize("eta", [0.245, "ramp"])
def test_discrete_kl_converges_to_the_exact_path_kl_and_equals_finite_dimensional_limit(eta):
    prob = random_problem(5, 2, RF9, True, 1.0)
    prob = LinearGaussianProblem(prob.m0, prob.S0, RF9, Q=prob.Q, w=prob.w, r0=0.3, noise=_noise(eta, RF9))
    theta = 0.3 * np.random.default_rng(5).normal(size=prob.n_params(2))
    exact = prob.path_kl(theta, 2)
    Ns = np.array([100, 200, 400, 800])
    errs = np.array([abs(prob.discrete_path_kl(theta, 2, int(n)) - exact) for n in Ns])
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert -1.2 < slope < -0.8 and errs[-1] / exact < 2e-2, (slope, errs / exact)
    eta_mid = float(prob.sde.eta(0.5 * RF9.T))  # negative control: the eta = 1 weight g^2 (constant eta)
    if eta != "ramp":
        assert abs(exact * 4 * eta_mid / (1 + eta_mid) ** 2 - exact) / exact > 0.3
    # the true KL of the processes (finite-dimensional Gaussian KLs on refining grids) has it as its limit
    grids = np.array([8, 16, 32, 64])
    kls = np.array([finite_dim_kl(prob, theta, 2, int(n)) for n in grids])
    gaps = exact - kls
    slope = np.polyfit(np.log(grids), np.log(gaps), 1)[0]
    assert all(np.diff(kls) > 0) and gaps[-1] > 0 and gaps[-1] / exact < 1e-2, (kls, exact)
    assert -2.2 < slope < -0.8, slope
    assert eta == "ramp" or abs(kls[-1] - exact * 4 * eta_mid / (1 + eta_mid) ** 2) / exact > 0.1


@pytest.mark.parametrize("backend", ["native", "torchsde"])
def test_rollout_path_kl_matches_the_exact_discrete_kl_at_eta(backend):
    prob = random_problem(6, 2, RF9, True, 1.0)
    prob = LinearGaussianProblem(prob.m0, prob.S0, RF9, Q=prob.Q, w=prob.w, noise=0.245)
    theta = 0.4 * np.random.default_rng(6).normal(size=prob.n_params(2))
    n, steps = 8000, 40
    gen = torch.Generator().manual_seed(3)
    traj = rollout(prob.sde, prob.policy_action(theta, 2), prob.initial_sample(n, gen), steps=steps,
                   reference=prob.pretrained_action(), backend=backend, generator=gen, seed=3, save_every=None)
    terms = prob.discrete_terms(theta, 2, steps)
    for x, exact in [(traj.path_kl, terms["path_kl"]), (prob.reward_torch(traj.final), terms["reward"])]:
        mean, se = float(x.mean()), float(x.std() / math.sqrt(n))
        assert abs(mean - exact) < Z * se, (mean, exact, se)
    wrong = terms["path_kl"] * 4 * 0.245 / 1.245**2  # the eta = 1 weight
    assert abs(float(traj.path_kl.mean()) - wrong) > Z * float(traj.path_kl.std() / math.sqrt(n))


# ----------------------------------------------------------------------------- R1 in the family
def _eta1_formula_policy(prob):
    """Negative control: a* = s + grad V*/beta (the eta = 1 gain) with the eta-process's V*."""
    from toy_problems._lg_policies import Affine

    def corr(tau):
        U, u, _ = prob.optimal_value_coeffs(tau)
        return -U / prob.beta, u / prob.beta

    return Affine(K=lambda t: corr(t)[0], k=lambda t: corr(t)[1], breaks=np.array([0.0, prob.T]))


@pytest.mark.parametrize("schedule, eta", [(VP, 0.245), (RF9, 0.245), (RF9, 2.0), (RF9, "ramp")],
                         ids=["vp", "rf", "rf-eta2", "rf-ramp"])
def test_optimal_action_value_and_stationarity_in_the_family(schedule, eta):
    base = random_problem(7, 2, schedule, True, 0.7)
    prob = LinearGaussianProblem(base.m0, base.S0, schedule, Q=base.Q, w=base.w, r0=0.3, beta=0.7,
                                 noise=_noise(eta, schedule))
    taus = np.linspace(0.0, schedule.T, 5)
    # V* from the transition (closed form) equals the HJB Riccati solution
    for tau, (U, u, u0) in zip(taus, prob.riccati_value_coeffs(taus)):
        U2, u2, u02 = prob.optimal_value_coeffs(tau)
        assert np.abs(U - U2).max() < 1e-7 and np.abs(u - u2).max() < 1e-7 and abs(u0 - u02) < 1e-7
    # Feynman-Kac value of a* is V*; of the eta = 1 formula it is not
    fk, fk_wrong = prob._backward(prob._optimal_policy()), prob._backward(_eta1_formula_policy(prob))
    err = max(abs(fk(t)[2] - prob.optimal_value_coeffs(t)[2]) + np.abs(fk(t)[1] - prob.optimal_value_coeffs(t)[1]).max()
              for t in taus)
    err_wrong = abs(fk_wrong(0.0)[2] - prob.optimal_value_coeffs(0.0)[2])
    assert err < 1e-7 and err_wrong > 1e-3, (err, err_wrong)
    assert abs(prob.optimal_objective() - prob.optimal_terms()["objective"]) < 1e-8
    # J is stationary (and maximal) at a*, not at the eta = 1 formula
    rng = np.random.default_rng(7)
    D, dl = rng.normal(size=(2, 2)), rng.normal(size=2)

    def J(pol, eps):
        from toy_problems._lg_policies import Affine

        shifted = Affine(K=lambda t: pol.K(t) + eps * D, k=lambda t: pol.k(t) + eps * dl, breaks=pol.breaks)
        return prob._terms(shifted)["objective"]

    eps = 1e-2
    opt, wrong = prob._optimal_policy(), _eta1_formula_policy(prob)
    J0 = J(opt, 0.0)

    def slope(pol):  # Richardson-extrapolated central difference, O(eps^4)
        cd = [(J(pol, h) - J(pol, -h)) / (2 * h) for h in (eps, eps / 2)]
        return (4 * cd[1] - cd[0]) / 3

    curvature = (J(opt, eps) + J(opt, -eps) - 2 * J0) / eps**2
    assert curvature < 0 and abs(slope(opt)) < 1e-6 * abs(curvature), (slope(opt), curvature)
    assert abs(slope(wrong)) > 1e-3 * abs(curvature), slope(wrong)


@pytest.mark.parametrize("schedule, eta", [(VP, 0.5), (RF9, 0.245), pytest.param(RF9, "ramp", marks=pytest.mark.slow)],
                         ids=["vp", "rf", "rf-ramp"])
def test_exact_gradient_equals_richardson_finite_differences_at_eta(schedule, eta):
    base = random_problem(8, 2, schedule, True, 1.0)
    prob = LinearGaussianProblem(base.m0, base.S0, schedule, Q=base.Q, w=base.w, noise=_noise(eta, schedule))
    theta = 0.3 * np.random.default_rng(8).normal(size=prob.n_params(2))
    g = prob.exact_gradient(theta, 2)
    fd = richardson_fd(lambda th: prob.exact_objective(th, 2), theta)
    assert np.abs(g - fd).max() < 1e-7 * max(1.0, np.abs(fd).max()), np.abs(g - fd).max()
    # negative control: the eta = 1 problem's gradient (the section-1 formulas) is another vector
    one = LinearGaussianProblem(base.m0, base.S0, schedule, Q=base.Q, w=base.w)
    assert np.abs(one.exact_gradient(theta, 2) - fd).max() > 1e-3


# ----------------------------------------------------------------------------- R2 in the family
THEORY_EXAMPLE = {1.0: 1.37500, 0.5: 1.37481, 0.245: 1.36595, 0.1: 1.29298}  # theory.md §5


def test_rectified_flow_fixed_init_optimum_against_the_tilt_theory_example():
    """1-d rectified flow, data N(1, 0.25), r = 1.5 x, beta = 1, t in [0, 0.999], init p_T."""
    out = {}
    for eta, expected in THEORY_EXAMPLE.items():
        p = LinearGaussianProblem([1.0], [[0.25]], RF, w=[1.5], beta=1.0, noise=eta)
        m, C = p.optimal_terminal_law()
        out[eta] = m[0]
        assert abs(m[0] - expected) < 5e-6, (eta, m[0])
        assert abs(C[0, 0] - 0.25) < 1e-9  # linear reward: the variance is not biased
        terms = p.optimal_terms()  # simulate a* by its moment ODE: the same law
        assert abs(terms["mean"][0] - m[0]) < 1e-6 and abs(terms["cov"][0, 0] - C[0, 0]) < 1e-6
        m_pre, C_pre = p.pretrained_terminal_law()
        assert abs(m_pre[0] - 1.0) < 1e-9 and abs(C_pre[0, 0] - 0.25) < 1e-9
        mo, _ = p.optimal_terminal_law(init_optimised=True)  # with the initial law optimised: the tilt
        assert abs(mo[0] - 1.375) < 1e-9
    tilt = 1.375
    aT2 = float(RF.alpha(RF.T)) ** 2
    assert abs(out[1.0] - tilt) < 10 * aT2 * 0.375  # eta = 1: the tilt up to the alpha_T^2 term
    assert abs(out[0.245] - tilt) > 1e3 * aT2  # Flow-GRPO's default is biased ...
    assert abs(out[0.1] - tilt) > abs(out[0.245] - tilt) > abs(out[0.5] - tilt)  # ... more so with less noise


def test_mixture_with_one_component_matches_the_gaussian_problem():
    lg = LinearGaussianProblem([1.0], [[0.25]], RF9, w=[1.5], beta=1.0, noise=0.245)
    gm = GaussianMixtureProblem([1.0], [[1.0]], [[[0.25]]], RF9, [1.5], 1.0, noise=0.245)
    y = np.linspace(-2, 2, 5)[:, None]
    assert np.allclose(gm.optimal_action(0.3, y), lg.optimal_action(0.3, y), atol=1e-12)
    assert np.allclose(gm.optimal_terminal_moments()[0], lg.optimal_terminal_law()[0], atol=1e-12)
    _, opt = gm.action_fns()
    assert torch.allclose(opt(torch.tensor(0.3), torch.tensor(y)), torch.tensor(lg.optimal_action(0.3, y)))
    gm1 = GaussianMixtureProblem([1.0], [[1.0]], [[[0.25]]], RF9, [1.5], 1.0)
    assert np.abs(gm1.optimal_action(0.3, y) - gm.optimal_action(0.3, y)).max() > 1e-3  # eta matters
    two = GaussianMixtureProblem([0.5, 0.5], [[1.0, 0.0], [-1.0, 0.5]], [np.eye(2)] * 2, RF9, [1.0, 0.0], 1.0,
                                 noise=0.245)
    with pytest.raises(NotImplementedError, match="optimal_action"):
        two.optimal_action(0.3, np.zeros((1, 2)))


MIX15 = {**MIX, "w": [1.5]}


@pytest.mark.parametrize("schedule", [RF9, pytest.param(VP, marks=pytest.mark.slow)], ids=["rf", "vp"])
def test_mixture_grid_solver_reproduces_the_closed_forms_at_eta_one(schedule):
    """The d = 1 HJB/Kolmogorov grid solver used at eta != 1, run at eta = 1 where the posterior formulas are
    exact: V*, a* and the terminal moments to 1e-3, and the error falls with the grid (second order)."""
    from toy_problems._gmm_eta import EtaOptimum1D

    for init in ("p_T", "standard"):
        gm = GaussianMixtureProblem(**MIX15, schedule=schedule, r0=0.2, init=init)
        y = np.linspace(-3, 3, 13)[:, None]
        errs = []
        for n in (601, 1201):
            E = EtaOptimum1D(gm, n=n)
            errs.append(max(np.abs(E.optimal_value(tau, y) - gm.optimal_value(tau, y)).max()
                            + np.abs(E.optimal_action(tau, y) - gm.optimal_action(tau, y)).max()
                            for tau in (0.0, 0.5 * schedule.T, 0.9 * schedule.T)))
        assert errs[1] < 1e-3 and errs[1] < errs[0] / 3, errs
        for opt_init in (False, True):
            m, C = E.optimal_terminal_moments(opt_init)
            m2, C2 = gm.optimal_terminal_moments(opt_init)
            assert abs(m[0] - m2[0]) < 1e-3 and abs(C[0, 0] - C2[0, 0]) < 1e-3


def test_mixture_optimum_at_eta_by_monte_carlo_is_not_the_tilt():
    """K = 2 at eta = 0.245 (grid solver): a* simulated (400 Euler steps, 20 000 paths) reaches the computed
    fixed-init terminal moments within 4.5 SE; the tilt's mean (the eta = 1 answer) is rejected."""
    rf = schedules.RectifiedFlow(t_max=0.99)
    gm = GaussianMixtureProblem(**MIX15, schedule=rf, noise=0.245)
    m, C = gm.optimal_terminal_moments()
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    traj = rollout(gm.sde, gm.action_fns()[1], gm.initial_sample(n, gen), steps=400, generator=gen,
                   save_every=None)
    x = traj.final[:, 0].numpy()
    se = x.std(ddof=1) / math.sqrt(n), (x**2).std(ddof=1) / math.sqrt(n)
    z = (x.mean() - m[0]) / se[0], ((x**2).mean() - (C[0, 0] + m[0] ** 2)) / se[1]
    wt, mt, _ = gm.tilted_law()
    z_tilt = (x.mean() - wt @ mt[:, 0]) / se[0]
    assert max(abs(z[0]), abs(z[1])) < Z and abs(z_tilt) > Z, (z, z_tilt)
    with pytest.raises(NotImplementedError, match="moments"):
        gm.sample_optimal_terminal(10)


def test_closed_forms_reject_times_outside_the_horizon():
    p = LinearGaussianProblem([1.0], [[0.25]], RF9, w=[1.5], noise=0.5)
    for call, name in [(lambda: p.optimal_value(1.2, [0.0]), "tau"), (lambda: p.optimal_action(-0.1, [0.0]), "tau"),
                       (lambda: p.score(2.0, [0.0]), "t"), (lambda: p.transition(float("nan")), "tau"),
                       (lambda: p.riccati_value_coeffs([0.5, 3.0]), "taus")]:
        with pytest.raises(ValueError, match=f"'{name}'"):
            call()
