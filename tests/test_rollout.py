r"""Rollouts of the controlled sampler against exact linear-Gaussian answers (float64 unless stated).

Problem: Gaussian data :math:`N(m_0, S_0)` under a VP schedule. The exact score is affine,
:math:`s(t,x) = -S_t^{-1}(x - \alpha_t m_0)`, :math:`S_t = \alpha_t^2 S_0 + \sigma_t^2 I`, so the sampler
drift is affine, :math:`A_k y + c_k`, and the **discrete** Euler (and Heun) chains have exact moment
recursions. Monte-Carlo statistics are compared with those (or with the continuous closed form where the
discretisation bias is far below the Monte-Carlo error) by z-scores, and every statistical check carries a
negative control (a wrong target that must exceed the same tolerance).

The helpers here are deliberately self-contained (no ``toy_problems`` import).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sa_theory.kl import euler_log_prob, gaussian_log_prob, girsanov_kl_step
from sa_theory.rollout import rollout
from sa_theory.schedules import VPLinear
from sa_theory.sde import ControlledSDE

Z_TOL = 4.5
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# exact linear-Gaussian problem
# ---------------------------------------------------------------------------------------------------
class GaussianProblem:
    """Gaussian data ``N(m0, S0)`` under ``schedule``: exact marginals, exact score, affine drifts."""

    def __init__(self, schedule, m0, S0):
        self.sch = schedule
        self.T = schedule.T
        self.m0 = np.asarray(m0, dtype=float)
        self.S0 = np.asarray(S0, dtype=float)
        self.d = self.m0.size
        self._cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    # closed-form marginals p_t = N(alpha_t m0, alpha_t^2 S0 + var_t I) in diffusion time t
    def mean_t(self, t: float) -> np.ndarray:
        return float(self.sch.alpha(float(t))) * self.m0

    def cov_t(self, t: float) -> np.ndarray:
        a = float(self.sch.alpha(float(t)))
        return a * a * self.S0 + float(self.sch.marginal_var(float(t))) * np.eye(self.d)

    def _score_coeffs(self, t: float):
        """Score ``s(t, x) = x @ W + w`` with ``W = -S_t^{-1}`` (symmetric), ``w = S_t^{-1} alpha_t m0``."""
        t = float(t)
        if t not in self._cache:
            P = np.linalg.inv(self.cov_t(t))
            self._cache[t] = (-P, P @ self.mean_t(t))
        return self._cache[t]

    def score(self, t, x: torch.Tensor, cond=None) -> torch.Tensor:
        W, w = self._score_coeffs(float(t))
        return torch.addmm(torch.as_tensor(w, dtype=x.dtype), x, torch.as_tensor(W, dtype=x.dtype))

    def action(self, tau, y: torch.Tensor, cond=None) -> torch.Tensor:
        """Pretrained action in sampler time: ``s(T - tau, y)``."""
        return self.score(self.T - float(tau), y, cond)

    def sample(self, t: float, n: int, seed: int, dtype=F64) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        L = torch.as_tensor(np.linalg.cholesky(self.cov_t(t)), dtype=dtype)
        z = torch.randn(n, self.d, generator=gen, dtype=dtype)
        return torch.as_tensor(self.mean_t(t), dtype=dtype) + z @ L.T

    def drift_coeffs(self, tau: float, gain: float = 1.0, K: np.ndarray | None = None):
        """Affine sampler drift ``A y + c`` at sampler time ``tau`` for the action ``s + K y``."""
        t = self.T - tau
        f, g2 = float(self.sch.f(t)), float(self.sch.g2(t))
        W, w = self._score_coeffs(t)
        A = -f * np.eye(self.d) + gain * g2 * W
        if K is not None:
            A = A + gain * g2 * K
        return A, gain * g2 * w, g2

    def euler_moments(self, N: int, m, P, *, gain: float = 1.0, K=None, noise: bool = True):
        """Exact moments of the discrete Euler(-Maruyama) chain: lists of ``N+1`` means / covariances.

        ``m_{k+1} = (I + A_k dt) m_k + c_k dt``, ``P_{k+1} = (I + A_k dt) P_k (I + A_k dt)^T + g_k^2 dt I``.
        """
        dt, I = self.T / N, np.eye(self.d)
        ms, Ps = [np.asarray(m, float)], [np.asarray(P, float)]
        for k in range(N):
            A, c, g2 = self.drift_coeffs(k * dt, gain, K)
            M = I + A * dt
            ms.append(M @ ms[-1] + c * dt)
            Ps.append(M @ Ps[-1] @ M.T + (g2 * dt * I if noise else 0.0))
        return ms, Ps

    def heun_moments(self, N: int, m, P):
        """Exact moments of the native stochastic Heun chain (predictor-corrector, same xi in both stages)."""
        dt, I, h = self.T / N, np.eye(self.d), math.sqrt(self.T / N)
        ms, Ps = [np.asarray(m, float)], [np.asarray(P, float)]
        for k in range(N):
            A0, c0, g20 = self.drift_coeffs(k * dt)
            A1, c1, g21 = self.drift_coeffs((k + 1) * dt)
            g0, g1 = math.sqrt(g20), math.sqrt(g21)
            M = I + 0.5 * dt * (A0 + A1 + A1 @ A0 * dt)
            n = 0.5 * dt * (c0 + c1 + A1 @ c0 * dt)
            Q = h * (0.5 * dt * g0 * A1 + 0.5 * (g0 + g1) * I)
            ms.append(M @ ms[-1] + n)
            Ps.append(M @ Ps[-1] @ M.T + Q @ Q.T)
        return ms, Ps

    def ode_flow(self, y0: np.ndarray) -> np.ndarray:
        """Exact probability-flow map p_T -> p_0: ``m0 + S0^{1/2} S_T^{-1/2} (y0 - alpha_T m0)``."""
        ev, U = np.linalg.eigh(self.S0)
        a, v = float(self.sch.alpha(self.T)), float(self.sch.marginal_var(self.T))
        M = U @ np.diag(np.sqrt(ev / (a * a * ev + v))) @ U.T
        return self.m0 + (y0 - self.mean_t(self.T)) @ M.T


SCHEDULE = VPLinear(b_min=0.1, b_max=20.0)
FULL = GaussianProblem(SCHEDULE, [1.5, -0.5], [[1.0, 0.6], [0.6, 0.5]])
DIAG = GaussianProblem(SCHEDULE, [0.5, -1.0, 2.0], np.diag([0.3, 1.0, 2.0]))
SDE = ControlledSDE(SCHEDULE)
ODE = ControlledSDE(SCHEDULE, ode=True)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: these are many small ops, and with two threads on a shared 2-core machine
    OpenMP contention makes a 40k x 2 matmul 30x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def moment_z(x: torch.Tensor, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-scores of the sample mean (per coordinate) and sample covariance (upper-triangle entries).

    SE of a covariance entry by the delta method: ``std((x_i - xbar_i)(x_j - xbar_j)) / sqrt(n)``.
    """
    x = x.detach().double().numpy()
    n, d = x.shape
    xbar = x.mean(0)
    zm = (xbar - mean) / np.sqrt(x.var(0, ddof=1) / n)
    c = x - xbar
    iu = np.triu_indices(d)
    prod = c[:, iu[0]] * c[:, iu[1]]
    zc = (prod.mean(0) - cov[iu]) / (prod.std(0, ddof=1) / math.sqrt(n))
    return zm, zc


def max_z(x, mean, cov) -> float:
    zm, zc = moment_z(x, mean, cov)
    return float(max(np.abs(zm).max(), np.abs(zc).max()))


def assert_moments(states, idx, targets, *, label: str) -> float:
    """max |z| over the saved times ``idx`` must be below Z_TOL; returns it. ``targets[k] = (m, P)``."""
    worst = 0.0
    for k in idx:
        m, P = targets[k]
        worst = max(worst, max_z(states[k], m, P))
    assert worst < Z_TOL, f"{label}: max |z| = {worst:.2f}"
    return worst


def assert_controls_fail(states, idx, targets, *, label: str) -> tuple[float, float]:
    """Negative controls: the same statistic against a mean shifted by 5% of a std, or a covariance 5%
    too large, must exceed the tolerance."""
    wrong_mean = max(max_z(states[k], targets[k][0] + 0.05 * np.sqrt(np.diag(targets[k][1])), targets[k][1])
                     for k in idx)
    wrong_cov = max(max_z(states[k], targets[k][0], 1.05 * targets[k][1]) for k in idx)
    assert wrong_mean > Z_TOL, f"{label}: shifted-mean control only reached |z| = {wrong_mean:.2f}"
    assert wrong_cov > Z_TOL, f"{label}: 5%-variance control only reached |z| = {wrong_cov:.2f}"
    print(f"{label}: negative controls max|z| shifted mean {wrong_mean:.1f}, 5% variance {wrong_cov:.1f}")
    return wrong_mean, wrong_cov


def slope(Ns, errs) -> float:
    """Observed order: minus the log-log slope of error against the number of steps."""
    return -float(np.polyfit(np.log(Ns), np.log(errs), 1)[0])


# ---------------------------------------------------------------------------------------------------
# 1. marginals of the pretrained sampler
# ---------------------------------------------------------------------------------------------------
N_PATHS = 40_000


@pytest.fixture(scope="module")
def y0_full():
    return FULL.sample(FULL.T, N_PATHS, seed=11)


@pytest.mark.parametrize("backend", ["native", "torchsde"])
def test_euler_marginals_match_discrete_chain(backend, y0_full):
    """Euler at N = 20 matches the exact moments of the discrete chain, not the continuous law."""
    N = 20
    traj = rollout(SDE, FULL.action, y0_full, steps=N, backend=backend, method="euler", seed=5)
    idx = [N // 4, N // 2, 3 * N // 4, N]
    ms, Ps = FULL.euler_moments(N, FULL.mean_t(FULL.T), FULL.cov_t(FULL.T))
    discrete = {k: (ms[k], Ps[k]) for k in idx}
    worst = assert_moments(traj.states, idx, discrete, label=f"{backend} euler vs discrete chain")
    print(f"{backend} euler N={N}: max|z| vs discrete chain {worst:.2f}")
    # negative controls: the continuous closed form (ignores the O(dt) bias) and 5% errors must fail
    continuous = {k: (FULL.mean_t(FULL.T - float(traj.taus[k])), FULL.cov_t(FULL.T - float(traj.taus[k])))
                  for k in idx}
    z_cont = max(max_z(traj.states[k], *continuous[k]) for k in idx)
    assert z_cont > Z_TOL, f"continuous target should be rejected at N={N}, |z| = {z_cont:.2f}"
    print(f"{backend} euler N={N}: continuous-law control max|z| {z_cont:.1f}")
    assert_controls_fail(traj.states, idx, discrete, label=f"{backend} euler")


def test_heun_marginals_match_discrete_chain_and_continuous_law(y0_full):
    # N = 20: exact moments of the native Heun chain (validates the predictor-corrector itself)
    N = 20
    traj = rollout(SDE, FULL.action, y0_full, steps=N, method="heun", seed=6)
    idx = [N // 2, N]
    ms, Ps = FULL.heun_moments(N, FULL.mean_t(FULL.T), FULL.cov_t(FULL.T))
    discrete = {k: (ms[k], Ps[k]) for k in idx}
    w20 = assert_moments(traj.states, idx, discrete, label="heun N=20 vs discrete Heun chain")
    assert_controls_fail(traj.states, idx, discrete, label="heun N=20")
    # the Euler chain's moments are a wrong target for Heun
    ems, ePs = FULL.euler_moments(N, FULL.mean_t(FULL.T), FULL.cov_t(FULL.T))
    assert max(max_z(traj.states[k], ems[k], ePs[k]) for k in idx) > Z_TOL

    # N = 100: continuous closed form (Heun's exact-recursion bias < 2e-3 at every step, SE ~ 7e-3)
    N = 100
    traj = rollout(SDE, FULL.action, y0_full, steps=N, method="heun", seed=7, save_every=25)
    taus = traj.saved_taus
    cont = {k: (FULL.mean_t(FULL.T - float(taus[k])), FULL.cov_t(FULL.T - float(taus[k])))
            for k in range(1, taus.numel())}
    w100 = assert_moments(traj.states, cont.keys(), cont, label="heun N=100 vs continuous law")
    assert_controls_fail(traj.states, cont.keys(), cont, label="heun N=100")
    print(f"heun: max|z| N=20 vs discrete {w20:.2f}, N=100 vs continuous {w100:.2f}")


def test_torchsde_srk_marginals_match_continuous_law():
    n, N = 20_000, 100
    y0 = FULL.sample(FULL.T, n, seed=12)
    traj = rollout(SDE, FULL.action, y0, steps=N, backend="torchsde", method="srk", seed=3)
    idx = [25, 50, 75, 100]
    cont = {k: (FULL.mean_t(FULL.T - float(traj.taus[k])), FULL.cov_t(FULL.T - float(traj.taus[k])))
            for k in idx}
    worst = assert_moments(traj.states, idx, cont, label="torchsde srk vs continuous law")
    assert_controls_fail(traj.states, idx, cont, label="torchsde srk")
    print(f"torchsde srk N={N}: max|z| vs continuous {worst:.2f}")


def test_marginals_diagonal_3d():
    """A 3-d diagonal problem (native Euler vs the discrete chain), at the end only."""
    N, n = 20, 30_000
    y0 = DIAG.sample(DIAG.T, n, seed=13)
    traj = rollout(SDE, DIAG.action, y0, steps=N, seed=8, save_every=None)
    ms, Ps = DIAG.euler_moments(N, DIAG.mean_t(DIAG.T), DIAG.cov_t(DIAG.T))
    z = max_z(traj.final, ms[-1], Ps[-1])
    assert z < Z_TOL, z
    assert max_z(traj.final, ms[-1], 1.05 * Ps[-1]) > Z_TOL
    assert max_z(traj.final, DIAG.m0, DIAG.S0) > Z_TOL  # the continuous target is wrong at N = 20


# ---------------------------------------------------------------------------------------------------
# 2. weak order (exact recursions and deterministic ODE solves: no Monte Carlo)
# ---------------------------------------------------------------------------------------------------
NS = [50, 100, 200, 400, 800]


def _moment_error(m, P, prob) -> float:
    return float(np.abs(m - prob.m0).sum() + np.linalg.norm(P - prob.S0))


def test_euler_maruyama_weak_error_is_first_order():
    errs = []
    for N in NS:
        ms, Ps = FULL.euler_moments(N, FULL.mean_t(FULL.T), FULL.cov_t(FULL.T))
        errs.append(_moment_error(ms[-1], Ps[-1], FULL))
    s = slope(NS, errs)
    print(f"Euler-Maruyama weak errors {[f'{e:.2e}' for e in errs]}, slope {s:.3f}")
    assert 0.85 < s < 1.15, s
    # Heun's exact recursion: second order, which the first-order window must reject
    h_errs = []
    for N in NS:
        ms, Ps = FULL.heun_moments(N, FULL.mean_t(FULL.T), FULL.cov_t(FULL.T))
        h_errs.append(_moment_error(ms[-1], Ps[-1], FULL))
    hs = slope(NS, h_errs)
    print(f"Heun SDE weak errors {[f'{e:.2e}' for e in h_errs]}, slope {hs:.3f}")
    assert 1.8 < hs < 2.2, hs
    assert not 0.85 < hs < 1.15


def test_probability_flow_ode_orders_euler_1_heun_2():
    """Deterministic: same initial points, exact flow map as reference (a wrong order is caught)."""
    y0 = FULL.sample(FULL.T, 64, seed=14)
    exact = FULL.ode_flow(y0.numpy())
    slopes, errs_all = {}, {}
    for method in ("euler", "heun"):
        errs = []
        for N in NS:
            traj = rollout(ODE, FULL.action, y0, steps=N, method=method, save_every=None)
            errs.append(float(np.abs(traj.final.numpy() - exact).max()))
        slopes[method], errs_all[method] = slope(NS, errs), errs
    print(f"ODE errors {errs_all}, slopes {slopes}")
    assert 0.85 < slopes["euler"] < 1.15, slopes
    assert 1.8 < slopes["heun"] < 2.2, slopes
    # negative controls: each method fails the other's window
    assert not 0.85 < slopes["heun"] < 1.15
    assert not 1.8 < slopes["euler"] < 2.2
    assert errs_all["heun"][-1] < 3e-5


def test_ode_sampler_maps_p_T_to_p_data():
    n, N = 30_000, 400
    y0 = FULL.sample(FULL.T, n, seed=15)
    traj = rollout(ODE, FULL.action, y0, steps=N, method="heun", save_every=None)
    assert traj.noise is None and traj.log_probs is None
    z = max_z(traj.final, FULL.m0, FULL.S0)
    print(f"ODE heun N={N}: max|z| vs p_data {z:.2f}")
    assert z < Z_TOL, z
    assert max_z(traj.final, FULL.m0 + 0.05 * np.sqrt(np.diag(FULL.S0)), FULL.S0) > Z_TOL
    assert max_z(traj.final, FULL.m0, 1.05 * FULL.S0) > Z_TOL
    # deterministic: the points themselves follow the exact flow
    assert np.abs(traj.final.numpy() - FULL.ode_flow(y0.numpy())).max() < 2e-4


# ---------------------------------------------------------------------------------------------------
# 3. pathwise agreement of the backends, reproducibility
# ---------------------------------------------------------------------------------------------------
def _offset_policy(prob, K):
    Kt = torch.as_tensor(K, dtype=F64)

    def policy(tau, y, cond=None):
        return prob.action(tau, y) + y @ Kt.to(y.dtype).T

    return policy


K_MAT = np.array([[0.3, -0.2], [0.1, 0.4]])


def test_native_and_torchsde_agree_pathwise():
    y0 = FULL.sample(FULL.T, 256, seed=16)
    policy = _offset_policy(FULL, K_MAT)
    for N in (20, 137):
        ts = rollout(SDE, policy, y0, steps=N, backend="torchsde", method="euler", seed=9,
                     reference=FULL.action)
        assert ts.noise.shape == (N, 256, 2)
        nat = rollout(SDE, policy, y0, steps=N, noise=ts.noise, reference=FULL.action)
        assert (nat.final - ts.final).abs().max() < 1e-10
        assert (nat.states - ts.states).abs().max() < 1e-10
        assert (nat.path_kl - ts.path_kl).abs().max() < 1e-10
        assert (nat.kl_steps - ts.kl_steps).abs().max() < 1e-10
        # negative control: a different Brownian path is far away
        other = rollout(SDE, policy, y0, steps=N, seed=1, reference=FULL.action)
        assert (other.final - ts.final).abs().max() > 1e-2
    # the extracted increments are standardised: per-step variance 1 (and not dtau)
    xi = ts.noise.reshape(-1)
    z = (xi.var() - 1.0) / math.sqrt(2.0 / xi.numel())
    assert abs(float(z)) < Z_TOL and abs(float(xi.mean())) * math.sqrt(xi.numel()) < Z_TOL
    z_wrong = ((xi * math.sqrt(ts.dtau)).var() - 1.0) / math.sqrt(2.0 / xi.numel())
    assert abs(float(z_wrong)) > Z_TOL


def test_reproducibility():
    y0 = FULL.sample(FULL.T, 64, seed=17)
    a = rollout(SDE, FULL.action, y0, steps=10, seed=1)
    b = rollout(SDE, FULL.action, y0, steps=10, seed=1)
    c = rollout(SDE, FULL.action, y0, steps=10, seed=2)
    assert torch.equal(a.final, b.final) and torch.equal(a.noise, b.noise)
    assert not torch.allclose(a.final, c.final)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(rollout(SDE, FULL.action, y0, steps=10, generator=g1).final,
                       rollout(SDE, FULL.action, y0, steps=10, generator=g2).final)
    # torchsde: the entropy seeds the Brownian interval (torch.manual_seed does not)
    torch.manual_seed(0)
    d = rollout(SDE, FULL.action, y0, steps=10, backend="torchsde", seed=3)
    torch.manual_seed(1)
    e = rollout(SDE, FULL.action, y0, steps=10, backend="torchsde", seed=3)
    f = rollout(SDE, FULL.action, y0, steps=10, backend="torchsde", seed=4)
    assert torch.equal(d.final, e.final) and torch.equal(d.noise, e.noise)
    assert not torch.allclose(d.final, f.final)


def test_rollouts_share_the_euler_kernel_of_an_equal_sde_but_not_of_a_noise_function():
    """Euler rollouts of equal SDEs (constant noise level) build the kernel once and reuse its per-step drift
    coefficients: bitwise the rollout on a kernel of its own. A noise *function* may hold state, so it gets a fresh
    kernel every time: changing its state changes the next rollout exactly as a fresh kernel would."""
    from sa_theory.kernels import EulerKernel
    from sa_theory.rollout import _euler_kernel
    from sa_theory.sampling import sample_chain

    y0 = FULL.sample(FULL.T, 32, seed=5)
    sde, twin = ControlledSDE(SCHEDULE, noise=0.5), ControlledSDE(SCHEDULE, noise=0.5)
    a = rollout(sde, FULL.action, y0, steps=7, seed=9)
    fresh = sample_chain(EulerKernel(sde, np.linspace(0, sde.T, 8)), lambda k, x: FULL.action(a.taus[k], x), y0,
                         generator=torch.Generator().manual_seed(9))
    hits = _euler_kernel.cache_info().hits
    b = rollout(twin, FULL.action, y0, steps=7, seed=9)
    assert _euler_kernel.cache_info().hits == hits + 1
    assert torch.equal(a.final, fresh.final) and torch.equal(b.final, fresh.final)

    class Level:  # a noise function with state
        def __init__(self):
            self.value = 0.5

        def __call__(self, tau):
            return self.value + 0.0 * tau

    level = Level()
    sde_fn = ControlledSDE(SCHEDULE, noise=level)
    first = rollout(sde_fn, FULL.action, y0, steps=7, seed=9)
    assert torch.equal(first.final, a.final)
    level.value = 1.0
    second = rollout(sde_fn, FULL.action, y0, steps=7, seed=9)
    assert torch.equal(second.final, rollout(ControlledSDE(SCHEDULE, noise=1.0), FULL.action, y0, steps=7,
                                             seed=9).final)
    assert not torch.allclose(second.final, first.final)

# ---------------------------------------------------------------------------------------------------
# 4. path KL
# ---------------------------------------------------------------------------------------------------
def _g2_grid(N: int) -> np.ndarray:
    """g^2 at the left ends tau_k = kT/N (k = 0..N-1), from the schedule in numpy."""
    taus = np.arange(N) * SCHEDULE.T / N
    return np.asarray(SCHEDULE.g2(SCHEDULE.T - taus), dtype=float)


def test_constant_offset_kl_is_exact_and_converges_first_order():
    k_vec = torch.tensor([0.7, -1.3], dtype=F64)
    policy = lambda tau, y, cond=None: FULL.action(tau, y) + k_vec
    y0 = FULL.sample(FULL.T, 32, seed=18)
    k2 = float((k_vec**2).sum())
    Ns, errs, errs_no_g2 = [10, 20, 40, 80, 160], [], []
    integral = 0.5 * k2 * float(SCHEDULE.B(SCHEDULE.T))  # int_0^T (g^2/2)|k|^2 dtau
    for N in Ns:
        dt = SCHEDULE.T / N
        discrete = float(np.sum(_g2_grid(N) * dt) * k2 / 2)
        for backend in ("native", "torchsde"):
            traj = rollout(SDE, policy, y0, steps=N, backend=backend, seed=2, reference=FULL.action)
            np.testing.assert_allclose(traj.path_kl.numpy(), discrete, rtol=1e-12, atol=0)
        np.testing.assert_allclose(traj.kl_steps.sum(0).numpy(), discrete, rtol=1e-12)
        errs.append(abs(discrete - integral))
        errs_no_g2.append(abs(N * dt * k2 / 2 - integral))  # negative control: g^2 dropped
    s = slope(Ns, errs)
    print(f"constant-offset KL: integral {integral:.6f}, errors {[f'{e:.2e}' for e in errs]}, slope {s:.3f}")
    assert 0.85 < s < 1.15 and errs[-1] < 1e-2 * integral
    assert not 0.85 < slope(Ns, errs_no_g2) < 1.15 and errs_no_g2[-1] > 0.5 * integral


@pytest.mark.parametrize("backend", ["native", "torchsde"])
def test_state_dependent_offset_kl_matches_exact_discrete_expectation(backend):
    n, N = 40_000, 20
    y0 = FULL.sample(FULL.T, n, seed=19)
    traj = rollout(SDE, _offset_policy(FULL, K_MAT), y0, steps=N, backend=backend, seed=21,
                   reference=FULL.action, save_every=None)
    ms, Ps = FULL.euler_moments(N, FULL.mean_t(FULL.T), FULL.cov_t(FULL.T), K=K_MAT)
    dt, g2 = SCHEDULE.T / N, _g2_grid(N)
    exact = sum(g2[k] * dt / 2 * (np.trace(K_MAT @ Ps[k] @ K_MAT.T) + np.sum((K_MAT @ ms[k]) ** 2))
                for k in range(N))
    kl = traj.path_kl.numpy()
    se = kl.std(ddof=1) / math.sqrt(n)
    z = (kl.mean() - exact) / se
    print(f"{backend} path KL: MC {kl.mean():.5f} +- {se:.5f}, exact discrete {exact:.5f}, z = {z:.2f}")
    assert abs(z) < Z_TOL
    # negative controls: a per-dimension mean instead of the sum; the pretrained chain's moments
    z_per_dim = (kl.mean() - exact / FULL.d) / se
    assert abs(z_per_dim) > Z_TOL
    pm, pP = FULL.euler_moments(N, FULL.mean_t(FULL.T), FULL.cov_t(FULL.T))
    wrong = sum(g2[k] * dt / 2 * (np.trace(K_MAT @ pP[k] @ K_MAT.T) + np.sum((K_MAT @ pm[k]) ** 2))
                for k in range(N))
    z_pre = (kl.mean() - wrong) / se
    assert abs(z_pre) > Z_TOL
    print(f"{backend} path KL controls: per-dim mean z = {z_per_dim:.1f}, pretrained moments z = {z_pre:.1f}")


# ---------------------------------------------------------------------------------------------------
# 5. log-probabilities
# ---------------------------------------------------------------------------------------------------
def test_log_probs_identity():
    N = 15
    y0 = FULL.sample(FULL.T, 128, seed=22)
    traj = rollout(SDE, _offset_policy(FULL, K_MAT), y0, steps=N, seed=3, reference=FULL.action)
    d, dt = FULL.d, traj.dtau
    g = torch.as_tensor(np.sqrt(_g2_grid(N)), dtype=F64)
    std_normal = (-0.5 * traj.noise**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    expected = std_normal - d * torch.log(g * math.sqrt(dt))[:, None]
    assert traj.log_probs.shape == (N, 128)
    assert (traj.log_probs - expected).abs().max() < 1e-10
    assert (traj.log_probs - std_normal).abs().max() > 1.0  # negative control: Jacobian term dropped
    # the same via euler_log_prob of the recorded states and drifts
    f = torch.as_tensor(np.asarray(SCHEDULE.f(SCHEDULE.T - traj.taus[:-1].numpy())), dtype=F64)
    for k in (0, 7, N - 1):
        drift = -f[k] * traj.states[k] + g[k] ** 2 * traj.actions[k]
        lp = euler_log_prob(traj.states[k + 1], traj.states[k], drift, g[k], dt)
        assert (lp - traj.log_probs[k]).abs().max() < 1e-10


def test_per_step_gaussian_kl_equals_girsanov_step():
    """MC KL between the two Euler transitions (policy vs pretrained) from gaussian_log_prob."""
    N, n = 20, 40_000
    y0 = FULL.sample(FULL.T, n, seed=23)
    traj = rollout(SDE, _offset_policy(FULL, K_MAT), y0, steps=N, seed=4, reference=FULL.action)
    dt = traj.dtau
    gen = torch.Generator().manual_seed(24)
    for k in (0, 5, 10):  # g^2 = 20, 15, 10: far from 1, so dropping it is visible
        tau = float(traj.taus[k])
        f, g2 = float(SCHEDULE.f_tau(tau)), float(SCHEDULE.g2_tau(tau))
        y, a, s = traj.states[k], traj.actions[k], traj.ref_actions[k]
        mean_pi, mean_pre = y + (-f * y + g2 * a) * dt, y + (-f * y + g2 * s) * dt
        std = math.sqrt(g2 * dt)
        y_next = mean_pi + std * torch.randn(y.shape, generator=gen, dtype=F64)
        log_ratio = gaussian_log_prob(y_next, mean_pi, std) - gaussian_log_prob(y_next, mean_pre, std)
        kl_step = girsanov_kl_step(g2, dt, a, s)
        torch.testing.assert_close(kl_step, traj.kl_steps[k], rtol=1e-12, atol=1e-15)
        diff = (log_ratio - kl_step).numpy()
        z = diff.mean() / (diff.std(ddof=1) / math.sqrt(n))
        assert abs(z) < Z_TOL, (k, z)
        # negative controls: g^2 dropped, per-dimension mean
        zw = []
        for wrong in (girsanov_kl_step(1.0, dt, a, s), kl_step / FULL.d):
            dw = (log_ratio - wrong).numpy()
            zw.append(dw.mean() / (dw.std(ddof=1) / math.sqrt(n)))
            assert abs(zw[-1]) > Z_TOL, k
        print(f"per-step KL k={k}: z = {z:.2f}; controls (no g^2, per-dim mean) z = {zw[0]:.1f}, {zw[1]:.1f}")


# ---------------------------------------------------------------------------------------------------
# 6. float32
# ---------------------------------------------------------------------------------------------------
def test_float32_rollout_matches_float64():
    N, n = 50, 512
    y0 = FULL.sample(FULL.T, n, seed=25)
    noise = torch.randn(N, n, 2, generator=torch.Generator().manual_seed(26), dtype=F64)
    policy = _offset_policy(FULL, K_MAT)
    r64 = rollout(SDE, policy, y0, steps=N, noise=noise, reference=FULL.action)
    r32 = rollout(SDE, policy, y0.float(), steps=N, noise=noise.float(), reference=FULL.action)
    for name in ("final", "states", "path_kl", "log_probs", "kl_steps", "actions", "taus"):
        a32, a64 = getattr(r32, name), getattr(r64, name)
        assert a32.dtype == torch.float32, name
        err = float(((a32.double() - a64).abs() / a64.abs().clamp(min=1.0)).max())
        assert err < 1e-4, (name, err)
    # the tolerance can see a real difference: perturb the noise by 1e-3
    r_pert = rollout(SDE, policy, y0, steps=N, noise=noise + 1e-3, reference=FULL.action)
    assert float((r_pert.final - r64.final).abs().max()) > 1e-4
    # torchsde float32: runs, stays float32, is on the same grid as the native loop
    ts32 = rollout(SDE, policy, y0.float(), steps=N, backend="torchsde", seed=5, reference=FULL.action)
    assert ts32.final.dtype == ts32.path_kl.dtype == ts32.noise.dtype == torch.float32
    nat32 = rollout(SDE, policy, y0.float(), steps=N, noise=ts32.noise, reference=FULL.action)
    nat64 = rollout(SDE, policy, y0, steps=N, noise=ts32.noise.double(), reference=FULL.action)
    assert float((nat32.final - ts32.final).abs().max()) < 1e-5
    for name in ("final", "path_kl"):
        a32, a64 = getattr(ts32, name).double(), getattr(nat64, name)
        assert float(((a32 - a64).abs() / a64.abs().clamp(min=1.0)).max()) < 1e-4, name


# ---------------------------------------------------------------------------------------------------
# 7. bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    y0 = FULL.sample(FULL.T, 8, seed=27)
    pol = FULL.action
    with pytest.raises(ValueError, match="'y0'"):
        rollout(SDE, pol, y0[:, 0], steps=5)
    with pytest.raises(TypeError, match="'y0'"):
        rollout(SDE, pol, y0.to(torch.int64), steps=5)
    bad = y0.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="y0"):
        rollout(SDE, pol, bad, steps=5)
    with pytest.raises(ValueError, match="'backend'"):
        rollout(SDE, pol, y0, steps=5, backend="jax")
    with pytest.raises(ValueError, match="'method'"):
        rollout(SDE, pol, y0, steps=5, method="rk4")
    with pytest.raises(ValueError, match="'method'"):
        rollout(SDE, pol, y0, steps=5, backend="torchsde", method="heun")
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="'steps'"):
            rollout(SDE, pol, y0, steps=steps)
    with pytest.raises(ValueError, match="'noise'"):
        rollout(SDE, pol, y0, steps=5, noise=torch.zeros(4, 8, 2, dtype=F64))
    with pytest.raises(ValueError, match="'noise'"):
        rollout(SDE, pol, y0, steps=5, backend="torchsde", noise=torch.zeros(5, 8, 2, dtype=F64))
    with pytest.raises(ValueError, match="'exploration_std'"):
        rollout(SDE, pol, y0, steps=5, exploration_std=-0.1)
    with pytest.raises(ValueError, match="'save_every'"):
        rollout(SDE, pol, y0, steps=5, save_every=0)

    def nan_policy(tau, y, cond=None):
        return torch.full_like(y, float("nan"))

    for backend in ("native", "torchsde"):
        with pytest.raises(FloatingPointError):
            rollout(SDE, nan_policy, y0, steps=5, backend=backend)


def test_mean_se_is_the_mean_and_the_standard_error_and_nan_below_two_values():
    """``sa_theory.kl.mean_se``, the one mean +- SE of the reports: std (unbiased) / sqrt(n), floats, any input
    kind; NaN standard error for one value, NaN mean for none; ``mean_and_se`` refuses fewer than 2 values."""
    from sa_theory.kl import mean_and_se, mean_se

    x = [1.0, 2.0, 4.0, 7.0]
    m, se = mean_se(x)
    assert m == pytest.approx(3.5) and se == pytest.approx(np.std(x, ddof=1) / 2.0)
    assert mean_se(np.asarray(x)) == mean_se(torch.tensor(x, dtype=torch.float32)) == (m, se)
    assert mean_se(torch.tensor([[1.0, 2.0], [4.0, 7.0]])) == (m, se)  # all values, flattened
    m1, se1 = mean_se([5.0])
    assert m1 == 5.0 and math.isnan(se1)
    assert all(math.isnan(v) for v in mean_se([]))
    with pytest.raises(ValueError, match="at least 2"):
        mean_and_se(torch.tensor([1.0]))


@pytest.mark.parametrize("backend, method", [("native", "euler"), ("native", "heun"), ("torchsde", "euler")])
def test_every_loop_checks_actions_with_the_one_check_naming_policy_or_reference(backend, method):
    """``sampling.check_action`` in the Euler chain, the Heun loop and torchsde's system: a non-tensor is a
    ``TypeError``, a wrong shape a ``ValueError``, NaN a ``FloatingPointError``, each naming the function."""
    y0 = FULL.sample(FULL.T, 8, seed=28)
    pol = FULL.action
    bad = {TypeError: lambda tau, y, cond=None: y.numpy(), ValueError: lambda tau, y, cond=None: y[:, :1],
           FloatingPointError: lambda tau, y, cond=None: torch.full_like(y, float("nan"))}
    for err, fn in bad.items():
        with pytest.raises(err, match="'policy'"):
            rollout(SDE, fn, y0, steps=4, backend=backend, method=method)
        with pytest.raises(err, match="'reference'"):
            rollout(SDE, pol, y0, steps=4, backend=backend, method=method, reference=fn)
