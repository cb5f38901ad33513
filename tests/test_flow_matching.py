"""Rectified flow (theory.md §5): the schedule, the velocity/eps/x0 <-> score maps, the probability-flow ODE.

Deterministic float64 checks; each with a negative control (a wrong map or the eta = 1 drift) that fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sa_theory import parametrization as par
from sa_theory import schedules
from sa_theory.rollout import rollout
from sa_theory.sde import ControlledSDE
from toy_problems import LinearGaussianProblem

RF = schedules.RectifiedFlow(t_max=0.999)
VP = schedules.VPLinear(b_min=0.1, b_max=20.0, T=1.0)


def test_rectified_flow_schedule_is_a_forward_sde():
    t = np.linspace(0.01, 0.9, 50)
    assert RF.T == 0.999 and schedules.get_schedule("rectified_flow", t_max=0.9).T == 0.9
    assert np.allclose(RF.alpha(t), 1 - t, rtol=1e-14) and np.allclose(RF.marginal_std(t), t, rtol=1e-14)
    h = 1e-5  # d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2 (central differences, error ~1e-9)
    dlog = (RF.log_alpha(t + h) - RF.log_alpha(t - h)) / (2 * h)
    dvar = (RF.marginal_var(t + h) - RF.marginal_var(t - h)) / (2 * h)
    assert np.abs(dlog / RF.f(t) - 1).max() < 1e-7
    assert np.abs(dvar - (2 * RF.f(t) * t**2 + RF.g2(t))).max() < 1e-7
    assert np.abs(dvar - (2 * RF.f(t) * t**2 + 2 * RF.g2(t))).max() > 0.1  # negative control
    assert torch.allclose(RF.g2(torch.tensor(0.5)), torch.tensor(2.0))
    for bad, match in [(dict(t_max=1.0), "t_max"), (dict(t_max=-0.1), "t_max"), (dict(t_max=0.9, T=0.8), "'T'")]:
        with pytest.raises(ValueError, match=match):
            schedules.RectifiedFlow(**bad)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(t=st.floats(0.02, 0.98), x=st.floats(-5, 5), v=st.floats(-5, 5), vp=st.booleans())
def test_velocity_eps_x0_and_score_maps_invert(t, x, v, vp):
    sch = VP if vp else RF
    x, v = np.array([x, -0.5 * x]), np.array([v, 1.0])
    s = par.score_from_velocity(sch, t, x, v)
    assert np.allclose(par.velocity_from_score(sch, t, x, s), v, atol=1e-10)
    assert np.allclose(par.score_from_eps(sch, t, par.eps_from_score(sch, t, s)), s, atol=1e-10)
    assert np.allclose(par.score_from_x0(sch, t, x, par.x0_from_score(sch, t, x, s)), s, rtol=1e-9, atol=1e-9)
    x0, eps = par.x0_from_velocity(sch, t, x, v), par.eps_from_velocity(sch, t, x, v)
    assert np.allclose(sch.alpha(t) * x0 + sch.marginal_std(t) * eps, x, atol=1e-9)  # x_t = alpha x0 + sigma eps
    if not vp:  # the rectified-flow forms of theory.md §5
        assert np.allclose(s, -(x + (1 - t) * v) / t, rtol=1e-12, atol=1e-12)
        assert np.allclose(x0, x - t * v, atol=1e-10) and np.allclose(eps, x + (1 - t) * v, atol=1e-10)
        assert np.allclose(v, eps - x0, atol=1e-10) and np.allclose(v, -(x + t * s) / (1 - t), atol=1e-10)
        if abs(t - 0.5) > 0.1:  # negative control: the map with t and 1 - t swapped
            assert not np.allclose(s, -(x + t * v) / (1 - t), atol=1e-3)


def test_velocity_of_the_exact_score_is_the_conditional_flow_matching_target():
    """v(t, x) = E[eps - x0 | x_t = x] for Gaussian data, from the posterior (independent of the maps)."""
    p = LinearGaussianProblem([1.0, -0.5], [[0.3, 0.1], [0.1, 0.5]], RF)
    x = np.random.default_rng(0).normal(size=(7, 2))
    for t in (0.05, 0.5, 0.95):
        Phi, h, _ = p.posterior(t)
        Ex0 = x @ Phi.T + h
        Eeps = (x - (1 - t) * Ex0) / t
        v = par.velocity_from_score(RF, t, x, p.score(t, x))
        assert np.abs(v - (Eeps - Ex0)).max() < 1e-12
        assert np.abs(par.x0_from_velocity(RF, t, x, v) - Ex0).max() < 1e-12  # x0_hat = x - t v is Tweedie
        assert np.abs(-(Eeps + Ex0) - v).max() > 1e-2  # negative control


def test_probability_flow_ode_of_rectified_flow_is_dx_dt_equals_v():
    p = LinearGaussianProblem([1.0, -0.5], [[0.3, 0.1], [0.1, 0.5]], RF)
    ode, sde = ControlledSDE(RF, ode=True), ControlledSDE(RF)
    y = torch.randn(9, 2, dtype=torch.float64)
    for tau in (0.0, 0.3, 0.9):
        t = RF.T - tau
        s = p.score_torch(t, y)
        v = par.velocity_from_score(RF, t, y, s)
        # dtau = -dt: the sampler's drift is -v exactly
        assert torch.allclose(ode.drift(torch.tensor(tau, dtype=torch.float64), y, s), -v, rtol=1e-12, atol=1e-9)
        assert (sde.drift(torch.tensor(tau, dtype=torch.float64), y, s) + v).abs().max() > 1e-2  # eta = 1 is not
    # integrated with Heun, each path follows the exact (affine) flow of the eta = 0 process, Gamma = 0
    p0 = LinearGaussianProblem(p.m0, p.S0, RF, noise=0.0)
    Phi, h, Gam = p0.transition(0.0)
    assert np.abs(Gam).max() < 1e-9
    y0 = p.initial_sample(200, torch.Generator().manual_seed(0))
    traj = rollout(ode, p.pretrained_action(), y0, steps=4000, method="heun", save_every=None)
    exact = y0.numpy() @ Phi.T + h
    assert np.abs(traj.final.numpy() - exact).max() < 1e-4
    Phi1, h1, _ = p.transition(0.0)  # negative control: the eta = 1 process's conditional mean map
    assert np.abs(traj.final.numpy() - (y0.numpy() @ Phi1.T + h1)).max() > 1e-2


def test_rollout_checks_the_actions_of_policy_and_reference():
    sde = ControlledSDE(RF, noise=0.245)
    y0 = torch.zeros(4, 2, dtype=torch.float64)
    ok = lambda tau, y, c=None: -y  # noqa: E731
    with pytest.raises(ValueError, match="'policy'"):
        rollout(sde, lambda tau, y, c=None: y[:, :1], y0, steps=3)
    with pytest.raises(TypeError, match="'policy'"):
        rollout(sde, lambda tau, y, c=None: y.numpy(), y0, steps=3)
    with pytest.raises(FloatingPointError, match="'reference'"):
        rollout(sde, ok, y0, steps=3, reference=lambda tau, y, c=None: y * float("nan"))
    with pytest.raises(ValueError, match="infinite"):
        rollout(ControlledSDE(RF, noise=lambda tau: 0 * tau), ok, y0, steps=3, reference=ok)
    assert rollout(sde, ok, y0, steps=3, reference=ok).path_kl.abs().max() == 0
