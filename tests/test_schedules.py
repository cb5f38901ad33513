"""Forward noise schedules: the identities every schedule must satisfy, checked independently.

For each schedule (hypothesis over valid parameters):

* ``alpha_t = exp(int_0^t f)``: ``d log alpha / dt = f`` (Richardson-extrapolated central differences,
  1e-6 relative) and ``alpha_0 = 1``;
* ``marginal_var`` solves ``dv/dt = 2 f v + g^2`` with ``v(0) = 0``;
* ``B(t) = int_0^t b`` for VP schedules (scipy quad), ``B = 0`` for VE;
* ``tau <-> t`` conversions round-trip and ``f_tau``/``g2_tau`` read the coefficients at ``T - tau``;
* numpy and torch (float64) inputs give the same numbers; torch keeps its dtype (float32 too) and is
  differentiable (autograd derivatives equal the ODE right-hand sides);
* invalid parameters raise ``ValueError`` naming the parameter; unknown schedule names raise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from sa_theory.schedules import SCHEDULES, ConstantOU, VEGeometric, VPCosine, VPLinear, get_schedule

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

T_ = st.floats(0.3, 3.0)
vp_linear = st.builds(lambda lo, span, T: VPLinear(b_min=lo, b_max=lo + span, T=T),
                      st.floats(0.01, 5.0), st.floats(0.0, 25.0), T_)
vp_cosine = st.builds(lambda s, u, T: VPCosine(s=s, u_max=u, T=T),
                      st.floats(0.0, 0.05), st.floats(0.3, 0.995), T_)
ve = st.builds(lambda lo, ratio, T: VEGeometric(sigma_min=lo, sigma_max=lo * ratio, T=T),
               st.floats(1e-3, 1.0), st.floats(1.5, 1e3), T_)
ou = st.builds(lambda b, T: ConstantOU(b=b, T=T), st.floats(0.05, 10.0), T_)
any_schedule = st.one_of(vp_linear, vp_cosine, ve, ou)
vp_schedule = st.one_of(vp_linear, vp_cosine, ou)
frac = st.floats(0.02, 0.95)  # t / T: away from 0 (finite differences) and from T (cosine rate blows up)


def _deriv(fn, t: float, h: float) -> float:
    """Richardson-extrapolated central difference (O(h^4))."""
    d1 = (fn(t + h) - fn(t - h)) / (2 * h)
    d2 = (fn(t + h / 2) - fn(t - h / 2)) / h
    return float((4 * d2 - d1) / 3)


def _fl(x) -> float:
    return float(np.asarray(x))


# ---------------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------------
@SETTINGS
@given(sch=any_schedule, u=frac)
def test_log_alpha_derivative_is_f(sch, u):
    t, h = u * sch.T, 1e-4 * sch.T
    fd = _deriv(lambda s: _fl(sch.log_alpha(s)), t, h)
    f = _fl(sch.f(t))
    assert abs(fd - f) <= 1e-6 * abs(f) + 1e-9, (fd, f)
    assert math.isclose(_fl(sch.alpha(t)), math.exp(_fl(sch.log_alpha(t))), rel_tol=1e-14)
    assert _fl(sch.alpha(0.0)) == 1.0 and _fl(sch.log_alpha(0.0)) == 0.0
    # alpha_t = exp(int_0^t f) by quadrature as well
    integral, _ = quad(lambda s: _fl(sch.f(s)), 0.0, t, epsabs=1e-13, epsrel=1e-11)
    assert math.isclose(_fl(sch.log_alpha(t)), integral, rel_tol=1e-8, abs_tol=1e-11)


@SETTINGS
@given(sch=any_schedule, u=frac)
def test_marginal_var_solves_its_ode(sch, u):
    t, h = u * sch.T, 1e-4 * sch.T
    fd = _deriv(lambda s: _fl(sch.marginal_var(s)), t, h)
    v, f, g2 = _fl(sch.marginal_var(t)), _fl(sch.f(t)), _fl(sch.g2(t))
    rhs = 2 * f * v + g2
    scale = abs(2 * f * v) + abs(g2)
    assert abs(fd - rhs) <= 1e-6 * scale, (fd, rhs)
    assert _fl(sch.marginal_var(0.0)) == 0.0
    assert math.isclose(_fl(sch.marginal_std(t)) ** 2, v, rel_tol=1e-12)
    assert g2 > 0 and v > 0
    if sch.kind == "vp":  # variance preserving: alpha^2 + sigma^2 = 1
        assert math.isclose(_fl(sch.alpha(t)) ** 2 + v, 1.0, rel_tol=1e-12)
        assert math.isclose(g2, -2 * f, rel_tol=1e-12)


@SETTINGS
@given(sch=vp_schedule, u=frac)
def test_B_is_integrated_rate_for_vp(sch, u):
    t = u * sch.T
    integral, _ = quad(lambda s: _fl(sch.g2(s)), 0.0, t, epsabs=1e-13, epsrel=1e-11)
    assert math.isclose(_fl(sch.B(t)), integral, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(_fl(sch.alpha(t)), math.exp(-0.5 * integral), rel_tol=1e-8)


@SETTINGS
@given(sch=ve, u=frac)
def test_ve_has_no_drift(sch, u):
    t = u * sch.T
    assert _fl(sch.f(t)) == 0.0 and _fl(sch.B(t)) == 0.0 and _fl(sch.alpha(t)) == 1.0
    assert math.isclose(_fl(sch.marginal_var(sch.T)), sch.sigma_max**2 - sch.sigma_min**2, rel_tol=1e-12)


@SETTINGS
@given(sch=any_schedule, u=st.floats(0.0, 1.0))
def test_tau_t_round_trip(sch, u):
    t = u * sch.T
    tau = _fl(sch.tau_of_t(t))
    assert math.isclose(tau, sch.T - t, rel_tol=1e-15, abs_tol=1e-15)
    assert math.isclose(_fl(sch.t_of_tau(tau)), t, rel_tol=1e-14, abs_tol=1e-14)
    ts = torch.linspace(0, sch.T, 7, dtype=torch.float64)
    torch.testing.assert_close(sch.t_of_tau(sch.tau_of_t(ts)), ts, rtol=0, atol=1e-14)
    if u < 0.95:
        assert _fl(sch.f_tau(tau)) == _fl(sch.f(sch.T - tau))
        assert _fl(sch.g2_tau(tau)) == _fl(sch.g2(sch.T - tau))


METHODS = ["f", "g2", "g", "alpha", "log_alpha", "marginal_var", "marginal_std", "B", "f_tau", "g2_tau",
           "t_of_tau", "tau_of_t"]


@SETTINGS
@given(sch=any_schedule)
def test_numpy_and_torch_agree_and_torch_keeps_dtype(sch):
    t_np = np.linspace(0.1, 0.9, 9) * sch.T
    for name in METHODS:
        fn = getattr(sch, name)
        ref = np.asarray(fn(t_np), dtype=np.float64)
        assert ref.shape == t_np.shape and np.all(np.isfinite(ref)), name
        out64 = fn(torch.as_tensor(t_np, dtype=torch.float64))
        assert isinstance(out64, torch.Tensor) and out64.dtype == torch.float64, name
        np.testing.assert_allclose(out64.numpy(), ref, rtol=1e-12, atol=1e-300, err_msg=name)
        out32 = fn(torch.as_tensor(t_np, dtype=torch.float32))
        assert out32.dtype == torch.float32, name
        scale = np.abs(ref).max() + 1e-30
        np.testing.assert_allclose(out32.double().numpy(), ref, rtol=2e-4, atol=1e-5 * scale, err_msg=name)
        # python scalar in, finite scalar out
        assert np.ndim(fn(0.5 * sch.T)) == 0 and np.isfinite(fn(0.5 * sch.T)), name


@SETTINGS
@given(sch=any_schedule, u=frac)
def test_torch_is_differentiable(sch, u):
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        t = torch.tensor(u * sch.T, dtype=dtype, requires_grad=True)
        f, g2 = sch.f(t).detach().double(), sch.g2(t).detach().double()
        (dla,) = torch.autograd.grad(sch.log_alpha(t), t)
        assert abs(float(dla) - float(f)) <= rtol * abs(float(f)) + 1e-12
        (dalpha,) = torch.autograd.grad(sch.alpha(t), t)
        a = sch.alpha(t).detach().double()
        assert abs(float(dalpha) - float(a * f)) <= rtol * abs(float(a * f)) + 1e-12
        (dv,) = torch.autograd.grad(sch.marginal_var(t), t)
        v = sch.marginal_var(t).detach().double()
        rhs = 2 * f * v + g2
        assert abs(float(dv) - float(rhs)) <= 10 * rtol * float(abs(2 * f * v) + abs(g2))
        # through sampler time too
        tau = torch.tensor((1 - u) * sch.T, dtype=dtype, requires_grad=True)
        (dl,) = torch.autograd.grad(sch.log_alpha(sch.t_of_tau(tau)), tau)
        assert abs(float(dl) + float(f)) <= 10 * rtol * abs(float(f)) + 1e-6


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
INVALID = [
    (VPLinear, {"b_min": 0.0}, "'b_min'"),
    (VPLinear, {"b_min": -1.0}, "'b_min'"),
    (VPLinear, {"b_min": NAN}, "'b_min'"),
    (VPLinear, {"b_min": INF}, "'b_min'"),
    (VPLinear, {"b_min": 1.0, "b_max": 0.5}, "'b_max'"),
    (VPLinear, {"b_max": NAN}, "'b_max'"),
    (VPLinear, {"b_max": INF}, "'b_max'"),
    (VPLinear, {"b_max": -3.0}, "'b_max'"),
    (VPLinear, {"T": 0.0}, "'T'"),
    (VPLinear, {"T": -1.0}, "'T'"),
    (VPLinear, {"T": NAN}, "'T'"),
    (VPLinear, {"T": INF}, "'T'"),
    (ConstantOU, {"b": 0.0}, "'b'"),
    (ConstantOU, {"b": NAN}, "'b'"),
    (ConstantOU, {"b": INF}, "'b'"),
    (ConstantOU, {"T": 0.0}, "'T'"),
    (VPCosine, {"u_max": 1.0}, "'u_max'"),
    (VPCosine, {"u_max": 1.5}, "'u_max'"),
    (VPCosine, {"u_max": 0.0}, "'u_max'"),
    (VPCosine, {"u_max": NAN}, "'u_max'"),
    (VPCosine, {"s": -0.1}, "'s'"),
    (VPCosine, {"s": NAN}, "'s'"),
    (VPCosine, {"T": NAN}, "'T'"),
    (VEGeometric, {"sigma_min": 1.0, "sigma_max": 1.0}, "'sigma_max'"),
    (VEGeometric, {"sigma_min": 2.0, "sigma_max": 1.0}, "'sigma_max'"),
    (VEGeometric, {"sigma_min": 0.0}, "'sigma_min'"),
    (VEGeometric, {"sigma_min": NAN}, "'sigma_min'"),
    (VEGeometric, {"sigma_max": INF}, "'sigma_max'"),
    (VEGeometric, {"T": -2.0}, "'T'"),
]


@pytest.mark.parametrize("cls,kwargs,match", INVALID, ids=[f"{c.__name__}-{k}" for c, k, _ in INVALID])
def test_invalid_parameters_raise_naming_the_parameter(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@SETTINGS
@given(b_min=st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(NAN), st.just(-INF), st.just(INF)))
def test_any_nonpositive_or_nonfinite_b_min_raises(b_min):
    with pytest.raises(ValueError, match="'b_min'"):
        VPLinear(b_min=b_min)


@SETTINGS
@given(lo=st.floats(0.01, 5.0), drop=st.floats(1e-6, 1.0, exclude_max=True))
def test_b_max_below_b_min_raises(lo, drop):
    with pytest.raises(ValueError, match="'b_max'"):
        VPLinear(b_min=lo, b_max=lo * (1 - drop))


def test_non_numeric_parameter_raises_type_error():
    with pytest.raises(TypeError, match="'b_min'"):
        VPLinear(b_min="fast")


def test_valid_edge_cases_construct():
    VPLinear(b_min=1.0, b_max=1.0)  # constant rate is allowed
    VPCosine(s=0.0)
    assert _fl(VPCosine(s=0.0).alpha(0.0)) == 1.0


def test_get_schedule():
    for name, cls in SCHEDULES.items():
        assert type(get_schedule(name)) is cls
    sch = get_schedule("vp_linear", b_min=0.5, b_max=10.0, T=2.0)
    assert (sch.b_min, sch.b_max, sch.T) == (0.5, 10.0, 2.0)
    with pytest.raises(ValueError, match="unknown schedule 'vp_quadratic'"):
        get_schedule("vp_quadratic")
    with pytest.raises(ValueError, match="'b_min'"):
        get_schedule("vp_linear", b_min=-1.0)
