"""The one sampling loop (sa_theory.sampling.sample_chain) against the SDE rollout and the kernels' formulas."""

import numpy as np
import pytest
import torch

from sa_theory.flow_kernel import FlowMatchKernel
from sa_theory.kernels import DDIMKernel, DDPMKernel, EulerKernel
from sa_theory.rollout import rollout
from sa_theory.sampling import sample_chain
from sa_theory.schedules import RectifiedFlow, VPLinear
from sa_theory.sde import ControlledSDE


def _linear_policy(shift):
    return lambda tau, y, cond=None: -y + shift * torch.ones_like(y) * (1 + tau)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_chain_equals_the_sde_rollout(eta):
    sde = ControlledSDE(VPLinear(), noise=eta)
    N, B = 25, 64
    taus = torch.linspace(0, sde.T, N + 1, dtype=torch.float64)
    kern = EulerKernel(sde, taus.numpy())
    pol, ref = _linear_policy(0.3), _linear_policy(0.0)
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    traj = rollout(sde, pol, y0, steps=N, reference=ref, seed=7)
    chain = sample_chain(kern, lambda k, x: pol(taus[k], x), y0, reference_fn=lambda k, x: ref(taus[k], x),
                         noise=traj.noise)
    torch.testing.assert_close(chain.states, traj.states, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chain.log_probs, traj.log_probs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chain.kl_steps, traj.kl_steps, rtol=1e-10, atol=1e-14)
    # the same generator state gives the same draws as the rollout's own loop
    again = sample_chain(kern, lambda k, x: pol(taus[k], x), y0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again.noise, traj.noise, rtol=0, atol=0)


def test_exact_step_kl_is_the_mean_log_ratio_of_the_two_kernels():
    """KL_k = E_{x'~p}[log p(x') - log q(x')] for the two step densities, checked by Monte Carlo within 4.5 SE
    (float64), on the rectified-flow kernel with Flow-GRPO's noise level and on DDIM."""
    g = torch.Generator().manual_seed(0)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = np.arange(999, -1, -100)
    kernels = [FlowMatchKernel(np.linspace(0.9, 0.1, 9), noise=("flow_grpo", 0.7)),
               DDIMKernel(ac, ts, np.append(ts[1:], -1), 1.0, 1.0)]
    for kern in kernels:
        k = 3
        x = torch.randn(1, 6, dtype=torch.float64, generator=g).expand(20000, 6)
        a, a2 = (torch.randn(1, 6, dtype=torch.float64, generator=g).expand(20000, 6) for _ in range(2))
        chain = sample_chain(kern, lambda j, y: a if j == k else torch.zeros_like(y), x, generator=g, check=True)
        m_p, m_q = kern.mean(k, chain.states[k], a), kern.mean(k, chain.states[k], a2)
        lr = kern.log_prob(k, chain.states[k + 1], m_p) - kern.log_prob(k, chain.states[k + 1], m_q)
        exact = kern.step_kl(k, a, a2)[0]
        se = lr.std() / len(lr) ** 0.5
        assert abs(lr.mean() - exact) < 4.5 * se, (kern.name, float(lr.mean()), float(exact), float(se))
        # negative control: half the weight (a per-dimension-mean or missing-factor slip) is far outside
        assert abs(lr.mean() - exact / 2) > 4.5 * se


def test_random_stream_does_not_depend_on_the_noise_level_and_bad_outputs_are_named():
    sig = np.linspace(1.0, 0.0, 6)
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    zero = lambda k, x: torch.zeros_like(x)  # noqa: E731
    ode = sample_chain(FlowMatchKernel(sig, ("eta", 0.0)), zero, x0, generator=torch.Generator().manual_seed(5))
    sde = sample_chain(FlowMatchKernel(sig, ("eta", 1.0)), zero, x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ode.noise, sde.noise) and (ode.log_probs == 0).all()
    kern = FlowMatchKernel(sig)
    with pytest.raises(ValueError, match="action_fn"):
        sample_chain(kern, lambda k, x: x[:, :2], x0)
    with pytest.raises(TypeError, match="'policy' must return a torch.Tensor"):
        sample_chain(kern, lambda k, x: x.numpy(), x0, names=("policy", "reference"))
    with pytest.raises(FloatingPointError, match="reference_fn"):
        sample_chain(kern, zero, x0, reference_fn=lambda k, x: x * float("nan"))
    with pytest.raises(ValueError, match="noise"):
        sample_chain(kern, zero, x0, noise=torch.zeros(2, 3, 4))


def test_sampled_log_ratio_is_an_unbiased_estimate_of_the_chain_path_kl():
    """``Chain.sampled_log_ratio`` (DDPO's KL-in-the-return, ``ref_log_probs`` recorded by the loop) has the
    chain's path KL as its mean: |mean(sum_k lambda_k) - mean(path_kl)| < 4.5 SE over 20000 paths (float64, DDIM
    with 5 steps and a state-dependent policy); the reference's log-probs evaluated at the policy's mean (a slip
    that gives 0) fail it."""
    g = torch.Generator().manual_seed(3)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = np.arange(999, -1, -200)
    kern = DDIMKernel(ac, ts, np.append(ts[1:], -1), 1.0, 1.0)
    x0 = torch.randn(20000, 3, dtype=torch.float64, generator=g)
    chain = sample_chain(kern, lambda k, x: -0.5 * x + 0.3, x0, reference_fn=lambda k, x: -x, generator=g)
    diff = chain.sampled_log_ratio - chain.path_kl
    se = diff.std() / len(diff) ** 0.5
    assert abs(diff.mean()) < 4.5 * se, (float(diff.mean()), float(se))
    assert float(chain.path_kl.mean()) > 20 * float(se)  # the check has power: the KL itself is far from 0
    assert chain.ref_log_probs.shape == chain.log_probs.shape
    # without a reference nothing is recorded
    assert sample_chain(kern, lambda k, x: -x, x0[:4], generator=g).sampled_log_ratio is None


def _kernels():
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = np.arange(999, -1, -100)
    return [EulerKernel(ControlledSDE(VPLinear()), np.linspace(0, 1, 13)),
            EulerKernel(ControlledSDE(RectifiedFlow(), noise=0.3), np.linspace(0, 0.99, 9)),
            DDIMKernel(ac, ts, np.append(ts[1:], -1), ac[0], 0.5),
            DDPMKernel(ac, ts, np.append(ts[1:], -1)),  # its last step is deterministic
            FlowMatchKernel(np.linspace(1.0, 0.0, 7), ("eta", 0.7))]  # its first step (t = 1) too


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kern", _kernels(), ids=lambda k: k.name)
def test_recorded_per_step_terms_are_the_kernels_formulas_bit_for_bit(kern, dtype):
    """The loop records the states and actions and computes the per-step terms after it on the whole path
    (``grid_log_probs`` / ``grid_step_kls``, batched where a kernel can): each is bitwise the kernel's per-step
    formula at the recorded step (``log_prob(k, x_{k+1}, mean(k, x_k, a_k))``, ``step_kl(k, a_k, s_k, form)``,
    the reference's step density at the sampled ``x_{k+1}``), on image-shaped and vector states, and the
    unrecorded run (``record=False``, terms computed inside the loop) has the same final state and the same
    per-path sums to float rounding. Swapping policy and reference in the reference's log-prob fails it."""
    W = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
    for shape in ((32, 4), (6, 1, 2, 2)):
        def pol(k, x):
            return (-x.reshape(x.shape[0], -1).double() @ W.T * (1 + 0.05 * k) + 0.1).reshape(x.shape).to(x.dtype)

        def ref(k, x):
            return -0.9 * x

        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        c = sample_chain(kern, pol, x0, reference_fn=ref, generator=torch.Generator().manual_seed(2))
        K = kern.num_steps
        assert c.log_probs.shape == c.kl_steps.shape == c.ref_log_probs.shape == (K, shape[0])
        for k in range(K):
            x, x1, a, s = c.states[k], c.states[k + 1], c.actions[k], c.ref_actions[k]
            assert torch.equal(a, pol(k, x)) and torch.equal(s, ref(k, x))
            assert torch.equal(c.log_probs[k], kern.log_prob(k, x1, kern.mean(k, x, a))), (kern.name, k)
            assert torch.equal(c.ref_log_probs[k], kern.log_prob(k, x1, kern.mean(k, x, s))), (kern.name, k)
            assert torch.equal(c.kl_steps[k], kern.step_kl(k, a, s, "chain"))
            assert torch.equal(c.kl_steps_ct[k], kern.step_kl(k, a, s, "continuous"))
            if kern.stochastic[k] and k == 1:  # negative control: the policy's mean in the reference's log-prob
                assert not torch.equal(c.ref_log_probs[k], kern.log_prob(k, x1, kern.mean(k, x, a)))
        low = sample_chain(kern, pol, x0, reference_fn=ref, generator=torch.Generator().manual_seed(2), record=False)
        assert torch.equal(low.final, c.final)
        tol = {"rtol": 1e-12, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-3}
        for f in ("log_probs", "kl_steps", "kl_steps_ct", "ref_log_probs"):
            torch.testing.assert_close(getattr(low, f)[0], getattr(c, f).sum(0), **tol)


def test_check_finite_by_its_sum_still_finds_every_nan_and_inf_and_passes_an_overflowing_finite_sum():
    from sa_theory.sde import check_finite

    big = torch.full((4, 3), 3e38, dtype=torch.float32)  # finite entries whose float32 sum overflows to inf
    assert check_finite("big", big) is big
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float64):
            x = torch.zeros(5, 2, dtype=dtype)
            x[3, 1] = bad
            with pytest.raises(FloatingPointError, match=r"state has 1 non-finite"):
                check_finite("state", x)
    both = torch.tensor([[float("inf"), -float("inf")]])  # a sum of NaN, not inf: still caught
    with pytest.raises(FloatingPointError, match="2 non-finite"):
        check_finite("x", both)
    assert check_finite("empty", torch.zeros(0, 2)).numel() == 0


class _Counted:
    """A reference action that counts its calls (a toy policy's base)."""

    def __init__(self, schedule_T):
        self.calls, self.T = 0, schedule_T

    def __call__(self, tau, y, cond=None):
        self.calls += 1
        return -y * (1.0 + torch.as_tensor(tau, dtype=y.dtype)) + torch.sin(y)


@pytest.mark.parametrize("grad", [False, True])
def test_a_policy_that_is_its_reference_plus_a_residual_shares_the_reference_call_bit_for_bit(grad):
    """``policy.base is reference``: without autograd one reference call per step instead of two, and the rollout
    (states, actions, log-probs, step KLs, reference log-probs) is bitwise that of the policy called as a whole;
    with autograd (where a shared call would change the gradients' float rounding) both are called, bitwise the
    same gradients."""
    from sa_theory.algorithms.policies import PiecewiseAffinePolicy, ResidualMLPPolicy

    sde = ControlledSDE(VPLinear(), noise=1.0)
    for make in (lambda b: PiecewiseAffinePolicy(b, 2, pieces=3, T=sde.T),
                 lambda b: ResidualMLPPolicy(b, 2, hidden=8, depth=1, T=sde.T)):
        ref = _Counted(sde.T)
        pol = make(ref).double()
        torch.manual_seed(0)
        for p in pol.parameters():  # away from the zero start, so the residual matters
            p.data.normal_(0, 0.3)
        y0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

        def run(policy, reference):
            with torch.set_grad_enabled(grad):
                tr = rollout(sde, policy, y0, steps=7, reference=reference, seed=3, save_every=1)
            loss = tr.final.sum() + tr.kl_steps.sum() if grad else None
            g = torch.autograd.grad(loss, list(pol.parameters())) if grad else ()
            return tr, g

        shared, g_shared = run(pol, ref)
        assert ref.calls == (14 if grad else 7)  # no grad: once per step, the action and the reference share it
        ref.calls = 0
        whole, g_whole = run(lambda tau, y, cond=None: pol(tau, y, cond), ref)  # no 'base': called separately
        assert ref.calls == 14
        for name in ("final", "actions", "log_probs", "kl_steps", "ref_actions"):
            assert torch.equal(getattr(shared, name), getattr(whole, name)), name
        assert torch.equal(shared.extras["ref_log_probs"], whole.extras["ref_log_probs"])
        assert all(torch.equal(a, b) for a, b in zip(g_shared, g_whole))


def test_only_a_declared_base_plus_residual_forward_without_hooks_shares_the_reference_call():
    """A subclass that overrides ``forward`` (not base + residual any more) or a policy with a forward hook is called as
    it is: two reference calls per step and the subclass's own actions."""
    from sa_theory.algorithms.policies import PiecewiseAffinePolicy

    class Doubled(PiecewiseAffinePolicy):
        def forward(self, tau, y, cond=None):
            return 2.0 * self.base(tau, y, cond) + self.residual(tau, y, cond)

    sde = ControlledSDE(VPLinear(), noise=1.0)
    y0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = _Counted(sde.T)
    dbl = Doubled(ref, 2, pieces=2, T=sde.T)
    with torch.no_grad():
        tr = rollout(sde, dbl, y0, steps=6, reference=ref, seed=1, save_every=1)
    assert ref.calls == 12
    assert torch.equal(tr.actions[0], 2.0 * ref(tr.taus[0], y0) + dbl.residual(tr.taus[0], y0))
    plain, seen = PiecewiseAffinePolicy(ref, 2, pieces=2, T=sde.T), []
    plain.register_forward_hook(lambda mod, args, out: seen.append(1))
    ref.calls = 0
    with torch.no_grad():
        rollout(sde, plain, y0, steps=6, reference=ref, seed=1, save_every=1)
    assert ref.calls == 12 and len(seen) == 6


def test_piecewise_affine_policy_piece_and_blocks_fast_paths_equal_the_tensor_computation():
    """The ``int`` piece of a number or 0-dim time equals the tensor formula at and next to every breakpoint, and
    the blocks kept under ``no_grad`` follow ``theta`` through an optimiser step, ``load_state_dict`` and ``.data``."""
    from sa_theory.algorithms.policies import PiecewiseAffinePolicy

    pol = PiecewiseAffinePolicy(lambda tau, y, cond=None: torch.zeros_like(y), 2, pieces=5, T=0.99)
    taus = [j * 0.99 / 5 + d for j in range(6) for d in (-1e-12, 0.0, 1e-12, 1e-7)] + [-0.1, 0.3, 2.0]
    grid = pol.piece(torch.tensor(taus, dtype=torch.float64)).tolist()
    for tau, want in zip(taus, grid):
        assert pol.piece(tau) == pol.piece(torch.tensor(tau, dtype=torch.float64)) == want
        assert pol.piece(torch.tensor(tau, dtype=torch.float32)) == int(pol.piece(torch.tensor([tau],
                                                                                                 dtype=torch.float32)))
    y, tau = torch.randn(4, 2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)

    def check():  # the cached no-grad action against a fresh one with autograd
        with torch.no_grad():
            fast = pol(tau, y)
        assert torch.equal(fast, pol(tau, y).detach())

    check()
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)
    pol(tau, y).sum().backward()
    opt.step()
    check()
    pol.load_state_dict({"theta": torch.randn_like(pol.theta)})
    check()
    pol.theta.data = torch.randn_like(pol.theta)
    check()
    with torch.no_grad():
        pol.theta.mul_(2.0)
    check()
