"""GaussianMixtureProblem: exact scores, optimal value/action (R1), tilted laws and terminal laws (R2).

Every Monte Carlo check compares an exact formula with an estimate within ``Z_TOL`` standard errors, and
carries a negative control: a plausible wrong formula (no Gamma term, untilted means, prior weights
instead of posterior responsibilities, ...) that must FAIL the same tolerance on the same samples.
Random problems: d in {1, 2}, K in {1, 2, 3}, covariance eigenvalues in [0.2, 2], means in [-1, 1]^d,
component weights >= 1/(2K), beta in {0.5, 1, 2}, reward w = beta * u with |u| in [0.4, 0.8] (so that
e^{r/beta} has moderate moments and the controls have power).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa_theory.schedules import ConstantOU, VPLinear
from toy_problems import GaussianMixtureProblem
from toy_problems.gaussian_mixture import MixturePosterior

VP = VPLinear(b_min=0.1, b_max=20.0, T=1.0)
OU = ConstantOU(b=1.0, T=1.0)
Z_TOL = 4.5
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
SETTINGS_MC = settings(SETTINGS, max_examples=15)


# ----------------------------------------------------------------------------------------------------
# problem generators
# ----------------------------------------------------------------------------------------------------
def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return Q @ np.diag(rng.uniform(0.2, 2.0, d)) @ Q.T


def make_problem(seed: int, d: int, K: int, schedule, beta: float, init: str = "p_T"):
    rng = np.random.default_rng(seed)
    weights = 0.5 * rng.dirichlet(np.ones(K)) + 0.5 / K
    means = rng.uniform(-1.0, 1.0, (K, d))
    covs = np.stack([random_spd(rng, d) for _ in range(K)])
    u = rng.standard_normal(d)
    u *= rng.uniform(0.4, 0.8) / np.linalg.norm(u)
    return GaussianMixtureProblem(weights, means, covs, schedule, beta * u, beta, r0=rng.uniform(-1, 1),
                                  init=init)


@st.composite
def problems(draw, K=None, schedules=(VP, OU), inits=("p_T", "standard")):
    seed = draw(st.integers(0, 2**32 - 1))
    d = draw(st.integers(1, 2))
    K = draw(st.integers(1, 3)) if K is None else K
    schedule = draw(st.sampled_from(schedules))
    beta = draw(st.sampled_from([0.5, 1.0, 2.0]))
    init = draw(st.sampled_from(inits))
    return make_problem(seed, d, K, schedule, beta, init)


times = st.floats(0.0, 1.0)


def eval_points(p: GaussianMixtureProblem, t: float, seed: int = 0, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([p.sample_marginal(t, n - 2, rng), 2.5 * rng.standard_normal((2, p.d))])




def central_gradient(f, y: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central finite-difference gradient of a batched scalar function ``f: (B, d) -> (B,)``."""
    grad = np.zeros_like(y)
    for i in range(y.shape[1]):
        e = np.zeros(y.shape[1])
        e[i] = h
        grad[:, i] = (f(y + e) - f(y - e)) / (2 * h)
    return grad


def z_of_mean(samples: np.ndarray, exact) -> np.ndarray:
    """(sample mean - exact) / standard error, per column."""
    samples = np.asarray(samples)
    n = samples.shape[0]
    return (samples.mean(0) - exact) / (samples.std(0, ddof=1) / math.sqrt(n))


def z_of_ratio(num: np.ndarray, den: np.ndarray, exact) -> np.ndarray:
    """z-score of the ratio estimator mean(num)/mean(den) (delta method), per column of ``num``."""
    n = den.shape[0]
    R = num.mean(0) / den.mean()
    resid = num - np.multiply.outer(den, R) if num.ndim > 1 else num - den * R
    se = resid.std(0, ddof=1) / (math.sqrt(n) * den.mean())
    return (R - exact) / se


def init_mixture(p: GaussianMixtureProblem):
    """The initial law mu_0 as (weights, means, covs), written out from the schedule (test-side)."""
    if p.init == "standard":
        return np.ones(1), np.zeros((1, p.d)), np.eye(p.d)[None]
    a, v = float(p.schedule.alpha(p.T)), float(p.schedule.marginal_var(p.T))
    return p.weights, a * p.means, a**2 * p.covs + v * np.eye(p.d)


def terminal_moments_testside(p: GaussianMixtureProblem, variant: str = "exact", n_quad: int = 40):
    """Fixed-init terminal mean/cov under a*, by an independent Gauss-Hermite quadrature built on the
    public ``posterior`` API. ``variant`` selects a (wrong) formula for negative controls:
    ``"no_gamma_shift"`` drops the Gamma_k w/beta shift; ``"posterior_weights"`` uses the untilted
    responsibilities rho_k(y0) instead of q_k(y0)."""
    x1, w1 = np.polynomial.hermite.hermgauss(n_quad)
    grid = np.stack([g.ravel() for g in np.meshgrid(*([x1] * p.d), indexing="ij")], 1) * math.sqrt(2)
    wts = np.prod(np.stack([g.ravel() for g in np.meshgrid(*([w1] * p.d), indexing="ij")], 1), 1)
    wts = wts / math.pi ** (p.d / 2)
    pis, ms, Ps = init_mixture(p)
    mean_acc, second_acc = np.zeros(p.d), np.zeros((p.d, p.d))
    for pi_j, m_j, P_j in zip(pis, ms, Ps):
        y0 = m_j + grid @ np.linalg.cholesky(P_j).T
        resp, mus, Gammas = p.posterior(p.T, y0)
        if variant == "posterior_weights":
            q = resp
        else:
            expo = mus @ p.w / p.beta + np.einsum("i,kij,j->k", p.w, Gammas, p.w) / (2 * p.beta**2)
            q = resp * np.exp(expo - expo.max(1, keepdims=True))
            q /= q.sum(1, keepdims=True)
        shift = 0.0 if variant == "no_gamma_shift" else np.einsum("kij,j->ki", Gammas, p.w) / p.beta
        m_k = mus + shift
        wq = pi_j * wts[:, None] * q
        mean_acc += np.einsum("nk,nki->i", wq, m_k)
        second_acc += np.einsum("k,kij->ij", wq.sum(0), Gammas) + np.einsum("nk,nki,nkj->ij", wq, m_k, m_k)
    return mean_acc, second_acc - np.outer(mean_acc, mean_acc)


def sample_posterior(post: MixturePosterior, n: int, rng: np.random.Generator):
    """n draws of X0 | X_t = y for one point (post from a single y), plus their component labels."""
    k = rng.choice(len(post.resp), size=n, p=post.resp)
    chol = np.linalg.cholesky(post.covs)
    return post.means[k] + np.einsum("nij,nj->ni", chol[k], rng.standard_normal((n, post.means.shape[1]))), k


# ----------------------------------------------------------------------------------------------------
# scores and densities
# ----------------------------------------------------------------------------------------------------
@SETTINGS
@given(p=problems(), t=times)
def test_score_is_gradient_of_log_density(p, t):
    y = eval_points(p, t)
    fd = central_gradient(lambda x: p.log_density(t, x), y)
    assert np.max(np.abs(p.score(t, y) - fd)) < 1e-6 * max(1.0, np.max(np.abs(fd)))
    # single points have the same values as a batch
    assert np.allclose(p.score(t, y[0]), p.score(t, y)[0], rtol=0, atol=1e-14)
    assert p.log_density(t, y[0]) == pytest.approx(p.log_density(t, y)[0], abs=1e-12)
    post, post0 = p.posterior(t, y), p.posterior(t, y[0])
    assert post.resp.shape == (len(y), p.K) and post.means.shape == (len(y), p.K, p.d)
    assert post.covs.shape == (p.K, p.d, p.d) and np.allclose(post.resp.sum(1), 1.0, atol=1e-12)
    assert np.allclose(post0.resp, post.resp[0]) and np.allclose(post0.means, post.means[0])


@SETTINGS
@given(p=problems(K=1), t=times, tau=times)
def test_single_component_reduces_to_gaussian_formulas(p, t, tau):
    y = eval_points(p, t)
    S, m, w, beta = p.covs[0], p.means[0], p.w, p.beta
    a, v = float(p.schedule.alpha(t)), float(p.schedule.marginal_var(t))
    St = a**2 * S + v * np.eye(p.d)
    score = -np.linalg.solve(St, (y - a * m).T).T
    assert np.allclose(p.score(t, y), score, rtol=1e-10, atol=1e-10)
    sign, logdet = np.linalg.slogdet(St)
    quad = np.einsum("bi,bi->b", y - a * m, np.linalg.solve(St, (y - a * m).T).T)
    assert np.allclose(p.log_density(t, y), -0.5 * (quad + logdet + p.d * math.log(2 * math.pi)), atol=1e-10)
    # reverse kernel (theory.md R1)
    Phi = a * S @ np.linalg.inv(St)
    h = (np.eye(p.d) - a * Phi) @ m
    Gamma = S - a**2 * S @ np.linalg.inv(St) @ S
    post = p.posterior(t, y)
    assert np.allclose(post.resp, 1.0) and post.resp.shape == (len(y), 1)
    assert np.allclose(post.means[:, 0], y @ Phi.T + h, atol=1e-10)
    assert np.allclose(post.covs[0], Gamma, atol=1e-10)
    # linear reward: a* = s + alpha_t S_t^{-1} S0 w / beta, V* = w.(Phi y + h) + w'Gamma w/(2 beta) + r0
    t2 = p.T - tau
    a2, v2 = float(p.schedule.alpha(t2)), float(p.schedule.marginal_var(t2))
    St2 = a2**2 * S + v2 * np.eye(p.d)
    Phi2 = a2 * S @ np.linalg.inv(St2)
    Gamma2 = S - a2**2 * S @ np.linalg.inv(St2) @ S
    expected_a = -np.linalg.solve(St2, (y - a2 * m).T).T + a2 * np.linalg.solve(St2, S @ w) / beta
    assert np.allclose(p.optimal_action(tau, y), expected_a, atol=1e-9)
    V = (y @ Phi2.T + (np.eye(p.d) - a2 * Phi2) @ m) @ w + w @ Gamma2 @ w / (2 * beta) + p.r0
    assert np.allclose(p.optimal_value(tau, y), V, atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# optimal value and action (R1, R2)
# ----------------------------------------------------------------------------------------------------
@SETTINGS
@given(p=problems(), tau=times)
def test_optimal_action_is_score_of_tilted_forward_marginal(p, tau):
    y = eval_points(p, p.T - tau)
    tilted = p.tilted_problem()
    assert np.max(np.abs(p.optimal_action(tau, y) - tilted.score(p.T - tau, y))) < 1e-8


@SETTINGS
@given(p=problems(), tau=times)
def test_optimal_action_is_score_plus_value_gradient(p, tau):
    y = eval_points(p, p.T - tau)
    grad_V = central_gradient(lambda x: p.optimal_value(tau, x), y)
    expected = p.score(p.T - tau, y) + grad_V / p.beta
    assert np.max(np.abs(p.optimal_action(tau, y) - expected)) < 1e-6 * max(1.0, np.max(np.abs(expected)))


@SETTINGS
@given(p=problems())
def test_terminal_value_is_reward_and_terminal_action_adds_reward_gradient(p):
    y = eval_points(p, 0.0)
    assert np.allclose(p.optimal_value(p.T, y), y @ p.w + p.r0, rtol=0, atol=1e-12)
    assert np.allclose(p.optimal_value(p.T, y), p.reward(y), rtol=0, atol=1e-12)
    assert np.allclose(p.optimal_action(p.T, y), p.score(0.0, y) + p.w / p.beta, atol=1e-12)


@SETTINGS_MC
@given(p=problems(), t=st.floats(0.3, 1.0), seed=st.integers(0, 2**31))
def test_value_is_log_posterior_expectation_monte_carlo(p, t, seed):
    """V*(tau, y) = beta log E[exp(r(X0)/beta) | X_t = y], X0 drawn from the posterior mixture."""
    rng = np.random.default_rng(seed)
    n = 200_000
    for y in p.sample_marginal(t, 2, rng):
        post = p.posterior(t, y)
        x0, _ = sample_posterior(post, n, rng)
        f = np.exp(x0 @ p.w / p.beta)
        exact = math.exp((p.optimal_value(p.T - t, y) - p.r0) / p.beta)
        z = z_of_mean(f, exact)
        assert abs(z) < Z_TOL, f"V* vs Monte Carlo: z = {z:.2f}"
        # negative control: omit the Gamma term of the Gaussian moment generating function
        no_gamma = np.sum(post.resp * np.exp(post.means @ p.w / p.beta))
        assert abs(z_of_mean(f, no_gamma)) > Z_TOL


def test_value_negative_control_prior_weights_instead_of_responsibilities():
    """Separated components, y near component 0: rho ~ (1, 0) while pi = (1/2, 1/2)."""
    p = GaussianMixtureProblem([0.5, 0.5], [[-1.5], [1.5]], [[[0.3]], [[0.3]]], OU, [0.6], 1.0, r0=0.2)
    rng = np.random.default_rng(7)
    t, y = 0.5, np.array([-1.0])
    post = p.posterior(t, y)
    x0, _ = sample_posterior(post, 200_000, rng)
    f = np.exp(x0 @ p.w / p.beta)
    exact = math.exp((p.optimal_value(p.T - t, y) - p.r0) / p.beta)
    gmf = np.exp(post.means @ p.w / p.beta + np.einsum("i,kij,j->k", p.w, post.covs, p.w) / (2 * p.beta**2))
    prior_weights = np.sum(p.weights * gmf)
    assert abs(z_of_mean(f, exact)) < Z_TOL
    assert abs(z_of_mean(f, prior_weights)) > Z_TOL


# ----------------------------------------------------------------------------------------------------
# tilted data law
# ----------------------------------------------------------------------------------------------------
def _tilt_statistics(p: GaussianMixtureProblem, n: int, rng: np.random.Generator):
    """Importance-weighted Monte Carlo of p_data: samples, component labels, weights e^{(r - r0)/beta}."""
    k = rng.choice(p.K, size=n, p=p.weights)
    x = p.means[k] + np.einsum("nij,nj->ni", np.linalg.cholesky(p.covs)[k], rng.standard_normal((n, p.d)))
    return x, k, np.exp(x @ p.w / p.beta)


def _tilt_z_scores(x, k, f, K, weights, means) -> np.ndarray:
    zs = []
    for j in range(K):
        ind = (k == j).astype(float)
        if K > 1:  # (with K = 1 the weight is exactly 1 and has no standard error)
            zs.append(z_of_ratio(ind * f, f, weights[j]))  # tilted weight of component j
        zs.extend(z_of_ratio(ind[:, None] * f[:, None] * x, ind * f, means[j]))  # tilted mean of j
    return np.abs(np.array(zs, dtype=float))


@SETTINGS_MC
@given(p=problems(), seed=st.integers(0, 2**31))
def test_tilted_law_matches_importance_weighted_monte_carlo(p, seed):
    rng = np.random.default_rng(seed)
    x, k, f = _tilt_statistics(p, 400_000, rng)
    weights, means, covs = p.tilted_law()
    assert np.all(weights > 0) and abs(weights.sum() - 1) < 1e-12 and np.allclose(covs, p.covs)
    z = _tilt_z_scores(x, k, f, p.K, weights, means)
    assert z.max() < Z_TOL, f"max |z| = {z.max():.2f}"
    z_log_norm = z_of_mean(f * math.exp(p.r0 / p.beta), math.exp(p.tilt_log_normalizer()))
    assert abs(z_log_norm) < Z_TOL
    # negative controls: untilted means (m_k instead of m_k + S_k w/beta) ...
    assert _tilt_z_scores(x, k, f, p.K, weights, p.means).max() > Z_TOL
    # ... and the normaliser without the w'S_k w/(2 beta^2) term
    no_quad = np.sum(p.weights * np.exp(p.means @ p.w / p.beta))
    assert abs(z_of_mean(f, no_quad)) > Z_TOL


def test_tilted_weights_negative_controls():
    """Components with different variance along w: prior weights, or weights without the w'S w term, fail."""
    p = GaussianMixtureProblem([0.3, 0.7], [[0.5, 0.0], [-0.5, 0.2]],
                               [np.diag([1.8, 0.5]), np.diag([0.3, 1.0])], VP, [0.8, 0.1], 1.0)
    x, k, f = _tilt_statistics(p, 600_000, np.random.default_rng(3))
    weights, means, _ = p.tilted_law()
    assert _tilt_z_scores(x, k, f, p.K, weights, means).max() < Z_TOL
    assert _tilt_z_scores(x, k, f, p.K, p.weights, means).max() > Z_TOL
    logits = np.log(p.weights) + p.means @ p.w / p.beta
    no_quad = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert _tilt_z_scores(x, k, f, p.K, no_quad, means).max() > Z_TOL


def test_tilted_problem_has_tilted_data():
    p = make_problem(11, 2, 3, OU, 0.5)
    tp = p.tilted_problem()
    weights, means, covs = p.tilted_law()
    assert np.allclose(tp.weights, weights) and np.allclose(tp.means, means) and np.allclose(tp.covs, covs)
    assert tp.schedule is p.schedule and tp.beta == p.beta and np.all(tp.w == p.w) and tp.init == p.init


# ----------------------------------------------------------------------------------------------------
# terminal law of the optimal sampler (R2)
# ----------------------------------------------------------------------------------------------------
def _moment_z_scores(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    dev = x - x.mean(0)
    iu = np.triu_indices(x.shape[1])
    prods = np.einsum("ni,nj->nij", dev, dev)[:, iu[0], iu[1]]
    return np.abs(np.concatenate([z_of_mean(x, mean), z_of_mean(prods, cov[iu])]))


@SETTINGS_MC
@given(p=problems(), seed=st.integers(0, 2**31))
def test_terminal_moments_match_exact_sampling(p, seed):
    x = p.sample_optimal_terminal(200_000, np.random.default_rng(seed))
    mean, cov = p.optimal_terminal_moments()
    z = _moment_z_scores(x, mean, cov)
    assert z.max() < Z_TOL, f"max |z| = {z.max():.2f}"
    # an independent quadrature from the public posterior API agrees to 1e-10
    mean_ts, cov_ts = terminal_moments_testside(p)
    assert np.allclose(mean, mean_ts, rtol=0, atol=1e-10) and np.allclose(cov, cov_ts, rtol=0, atol=1e-10)
    # negative control: drop the Gamma_k w/beta shift of the tilted kernel
    assert _moment_z_scores(x, *terminal_moments_testside(p, "no_gamma_shift")).max() > Z_TOL


def test_terminal_moments_negative_control_untilted_weights():
    """With separated components, the untilted responsibilities rho_k(y0) instead of q_k(y0) fail."""
    p = GaussianMixtureProblem([0.5, 0.5], [[-1.5], [1.5]], [[[0.3]], [[0.3]]], OU, [0.6], 1.0, init="p_T")
    x = p.sample_optimal_terminal(400_000, np.random.default_rng(5))
    assert _moment_z_scores(x, *p.optimal_terminal_moments()).max() < Z_TOL
    assert _moment_z_scores(x, *terminal_moments_testside(p, "posterior_weights")).max() > Z_TOL


@SETTINGS
@given(p=problems())
def test_terminal_moments_closed_forms_and_convergence(p):
    base = p.optimal_terminal_moments()
    finer = p.optimal_terminal_moments(quad_points=int(1.5 * {1: 100, 2: 60}[p.d]))
    assert np.allclose(base[0], finer[0], rtol=0, atol=1e-10) and np.allclose(base[1], finer[1], atol=1e-10)
    for init_optimised in (False, True):
        mean, cov = p.optimal_terminal_moments(init_optimised=init_optimised)
        finite = p.K == 1 or (init_optimised and p.init == "p_T")
        if not finite:
            with pytest.raises(NotImplementedError, match="optimal_terminal_moments"):
                p.optimal_terminal_law(init_optimised=init_optimised)
            continue
        weights, means, covs = p.optimal_terminal_law(init_optimised=init_optimised)
        m = weights @ means
        c = np.einsum("k,kij->ij", weights, covs) + np.einsum("k,ki,kj->ij", weights, means - m, means - m)
        assert np.allclose(mean, m, rtol=0, atol=1e-10) and np.allclose(cov, c, rtol=0, atol=1e-10)
    if p.init == "p_T":  # optimising the initial law as well recovers the tilt exactly
        w_t, m_t, _ = p.tilted_law()
        assert np.allclose(p.optimal_terminal_moments(init_optimised=True)[0], w_t @ m_t, atol=1e-10)


@SETTINGS_MC
@given(p=problems(schedules=(OU,)), seed=st.integers(0, 2**31))
def test_fixed_init_optimum_is_not_the_tilt_on_ou(p, seed):
    """OU b=1, T=1 keeps memory of Y_0: the fixed-init optimum's mean misses the tilt's mean."""
    x = p.sample_optimal_terminal(200_000, np.random.default_rng(seed))
    w_t, m_t, _ = p.tilted_law()
    z_tilt = np.abs(z_of_mean(x, w_t @ m_t))
    z_opt = np.abs(z_of_mean(x, p.optimal_terminal_moments()[0]))
    assert z_opt.max() < Z_TOL and z_tilt.max() > 10.0, (z_opt, z_tilt)


@SETTINGS
@given(p=problems(schedules=(VP,)))
def test_fixed_init_optimum_is_the_tilt_up_to_alpha_T_squared_on_vp(p):
    """VP with b_max = 20 is nearly memoryless: relative bias ~ alpha_T^2 ~ 4e-5."""
    w_t, m_t, covs = p.tilted_law()
    tilt_mean = w_t @ m_t
    shift = np.linalg.norm(tilt_mean - p.weights @ p.means)
    mean, cov = p.optimal_terminal_moments()
    assert np.linalg.norm(mean - tilt_mean) < 1e-3 * shift
    assert float(p.schedule.alpha(p.T)) ** 2 < 5e-5


def test_optimal_terminal_law_raises_for_continuous_mixtures():
    p = make_problem(1, 2, 2, OU, 1.0, init="standard")
    for flag in (False, True):
        with pytest.raises(NotImplementedError, match="not a finite Gaussian mixture"):
            p.optimal_terminal_law(init_optimised=flag)
    with pytest.raises(ValueError, match="'quad_points'"):
        p.optimal_terminal_moments(quad_points=10_000)


# ----------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------
def test_samplers_have_the_right_moments():
    p = GaussianMixtureProblem([0.4, 0.6], [[1.0, -0.5], [-0.8, 0.9]],
                               [np.diag([0.3, 1.5]), [[0.6, 0.2], [0.2, 0.4]]], OU, [0.5, 0.5], 1.0)
    m0 = p.weights @ p.means
    c0 = np.einsum("k,kij->ij", p.weights, p.covs) + np.einsum("k,ki,kj->ij", p.weights, p.means - m0,
                                                              p.means - m0)
    rng = np.random.default_rng(2)
    a, v = float(OU.alpha(0.7)), float(OU.marginal_var(0.7))
    cases = {"data": (p.sample_data(300_000, rng), m0, c0),
             "marginal": (p.sample_marginal(0.7, 300_000, rng), a * m0, a**2 * c0 + v * np.eye(2))}
    aT, vT = float(OU.alpha(1.0)), float(OU.marginal_var(1.0))
    pT = (aT * m0, aT**2 * c0 + vT * np.eye(2))
    gen = torch.Generator().manual_seed(0)
    cases["initial_torch"] = (p.initial_sample(300_000, gen).numpy(), *pT)
    cases["initial_numpy"] = (p.sample_initial(300_000, rng), *pT)
    for name, (x, m, c) in cases.items():
        assert _moment_z_scores(x, m, c).max() < Z_TOL, name
        # negative control: the standard normal's moments
        assert _moment_z_scores(x, np.zeros(2), np.eye(2)).max() > Z_TOL, name
    std = GaussianMixtureProblem(p.weights, p.means, p.covs, OU, p.w, 1.0, init="standard")
    x = std.initial_sample(300_000, gen, dtype=torch.float32)
    assert x.dtype == torch.float32 and x.shape == (300_000, 2)
    assert _moment_z_scores(x.double().numpy(), np.zeros(2), np.eye(2)).max() < Z_TOL
    assert _moment_z_scores(x.double().numpy(), *pT).max() > Z_TOL


# ----------------------------------------------------------------------------------------------------
# torch versions
# ----------------------------------------------------------------------------------------------------
@SETTINGS
@given(p=problems(), tau=times)
def test_torch_versions_match_numpy(p, tau):
    y = eval_points(p, p.T - tau)
    yt = torch.tensor(y, dtype=torch.float64)
    tau_t = torch.tensor(tau, dtype=torch.float64)
    pretrained, optimal = p.action_fns()
    assert np.max(np.abs(pretrained(tau_t, yt, None).numpy() - p.score(p.T - tau, y))) < 1e-10
    assert np.max(np.abs(optimal(tau_t, yt, None).numpy() - p.optimal_action(tau, y))) < 1e-10
    assert np.max(np.abs(p.score_torch(p.T - tau, yt).numpy() - p.score(p.T - tau, y))) < 1e-10
    assert np.max(np.abs(p.optimal_action_torch(tau, yt[0]).numpy() - p.optimal_action(tau, y[0]))) < 1e-10
    out32 = optimal(tau_t.float(), yt.float(), None)
    assert out32.dtype == torch.float32
    scale = max(1.0, float(np.max(np.abs(p.optimal_action(tau, y)))))
    assert np.max(np.abs(out32.double().numpy() - p.optimal_action(tau, y))) < 1e-4 * scale


# ----------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------
GOOD = dict(weights=[0.3, 0.7], means=[[0.0, 1.0], [1.0, -1.0]], covs=[np.eye(2), np.diag([0.5, 2.0])],
            schedule=VP, w=[1.0, 0.5], beta=1.0, r0=0.0, init="p_T")


@pytest.mark.parametrize("change, exc, match", [
    (dict(weights=[0.3, 0.6]), ValueError, "'weights' must sum to 1"),
    (dict(weights=[1.2, -0.2]), ValueError, "'weights' must be positive"),
    (dict(weights=[[0.3, 0.7]]), ValueError, "'weights' must be a 1-d"),
    (dict(weights=[np.nan, 0.7]), ValueError, "'weights' contains NaN"),
    (dict(weights=["a", "b"]), TypeError, "'weights' must be an array of real numbers"),
    (dict(means=[[0.0, 1.0]]), ValueError, "'means' must have shape"),
    (dict(means=[[0.0, np.inf], [1.0, 1.0]]), ValueError, "'means' contains NaN"),
    (dict(covs=[np.eye(2)]), ValueError, "'covs' must have shape"),
    (dict(covs=[np.eye(2), [[1.0, 0.5], [0.0, 1.0]]]), ValueError, r"'covs'\[1\] is not symmetric"),
    (dict(covs=[np.eye(2), [[1.0, 2.0], [2.0, 1.0]]]), ValueError, r"'covs'\[1\] is not symmetric pos"),
    (dict(covs=[np.zeros((2, 2)), np.eye(2)]), ValueError, r"'covs'\[0\] is not symmetric positive def"),
    (dict(w=[1.0, 2.0, 3.0]), ValueError, "'w' must have shape"),
    (dict(w=[1.0, np.nan]), ValueError, "'w' contains NaN"),
    (dict(beta=0.0), ValueError, "'beta' must be > 0"),
    (dict(beta=-1.0), ValueError, "'beta' must be > 0"),
    (dict(beta=np.inf), ValueError, "'beta' contains NaN or Inf"),
    (dict(beta=np.nan), ValueError, "'beta' contains NaN or Inf"),
    (dict(beta="1"), TypeError, "'beta' must be a real number"),
    (dict(beta=True), TypeError, "'beta' must be a real number"),
    (dict(r0=np.nan), ValueError, "'r0' contains NaN"),
    (dict(init="noise"), ValueError, "'init' must be one of"),
    (dict(schedule="vp"), TypeError, "'schedule' must be a"),
])
def test_bad_constructor_inputs_name_the_parameter(change, exc, match):
    with pytest.raises(exc, match=match):
        GaussianMixtureProblem(**{**GOOD, **change})


def test_bad_call_inputs_name_the_parameter():
    p = GaussianMixtureProblem(**GOOD)
    y = np.zeros((3, 2))
    with pytest.raises(ValueError, match="'t' must lie in"):
        p.score(1.5, y)
    with pytest.raises(ValueError, match="'t' contains NaN"):
        p.log_density(np.nan, y)
    with pytest.raises(ValueError, match="'tau' must lie in"):
        p.optimal_action(-0.1, y)
    with pytest.raises(ValueError, match="'tau' must be a scalar"):
        p.optimal_value(np.array([0.1, 0.2]), y)
    with pytest.raises(ValueError, match="'x' must have shape"):
        p.score(0.5, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="'y' must have shape"):
        p.posterior(0.5, np.zeros(3))
    with pytest.raises(ValueError, match="'y' contains NaN"):
        p.optimal_action(0.5, np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="'n' must be >= 1"):
        p.sample_data(0, 0)
    with pytest.raises(TypeError, match="'n' must be an integer"):
        p.sample_optimal_terminal(10.5, 0)
    with pytest.raises(TypeError, match="'rng' must be"):
        p.sample_data(10, "seed")
    with pytest.raises(ValueError, match="'y' must have shape"):
        p.action_fns()[1](torch.tensor(0.5), torch.zeros(4, 3), None)
    with pytest.raises(TypeError, match="'y' must be a torch.Tensor"):
        p.action_fns()[1](torch.tensor(0.5), y, None)


def test_exported_from_package():
    import toy_problems

    assert toy_problems.GaussianMixtureProblem is GaussianMixtureProblem


@pytest.mark.parametrize("schedule", [VPLinear(), ConstantOU(b=1.0)])
def test_posterior_kernel_is_gaussian_conditioning_per_component(schedule):
    """``posterior_kernel(t)``: for component k, X_0 ~ N(mu_k, S_k) and X_t = alpha X_0 + sigma Z, so
    X_0 | X_t = y ~ N(mu_k + C_k (y - alpha mu_k), S_k - C_k alpha S_k),
    C_k = alpha S_k (alpha^2 S_k + sigma^2 I)^-1
    (Phi_k = C_k, h_k = mu_k - C_k alpha mu_k); it agrees with ``posterior``'s means, and a noise variance 10% off
    fails."""
    p = make_problem(3, 2, 3, schedule, 1.0)
    for t in (0.05, 0.4, 0.9 * schedule.T):
        Phi, h, Gamma = p.posterior_kernel(t)
        a, s2 = float(schedule.alpha(t)), float(schedule.marginal_var(t))
        for k in range(p.K):
            S, mu = p.covs[k], p.means[k]
            C = a * S @ np.linalg.inv(a**2 * S + s2 * np.eye(2))
            np.testing.assert_allclose(Phi[k], C, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(h[k], mu - a * C @ mu, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(Gamma[k], S - a * C @ S, rtol=1e-10, atol=1e-12)
            wrong = a * S @ np.linalg.inv(a**2 * S + 1.1 * s2 * np.eye(2))  # the noise variance 10% off
            assert not np.allclose(Phi[k], wrong, rtol=1e-3)
        y = np.array([[0.3, -0.7], [1.1, 0.4]])
        post = p.posterior(t, y)
        np.testing.assert_allclose(post.means, np.einsum("kij,bj->bki", Phi, y) + h, rtol=1e-12)
