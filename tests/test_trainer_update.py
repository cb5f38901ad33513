"""The one trainer's policy update (:meth:`sa_theory.algorithms.Trainer.update`) on a fake task and method whose
gradients are known in closed form: what an :class:`UpdatePlan` promises about minibatches, accumulation, step
subsets, gradient synchronisation and the early stop (the toy and image tasks are tested through their runs)."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from sa_theory.algorithms import Trainer
from sa_theory.algorithms import UpdatePlan as _Plan


def UpdatePlan(accum=1, **kw):  # noqa: N802  (the plan, with a short name for gradient_accumulation_steps)
    return _Plan(gradient_accumulation_steps=accum, **kw)

C = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25], dtype=torch.float64)  # per-step coefficients c_k


class Paths:
    """A rollout batch of scalar paths x_i."""

    def __init__(self, x):
        self.x = x

    @property
    def batch_size(self):
        return self.x.numel()

    def select(self, idx):
        return Paths(self.x[idx])


class Method:
    """loss(sub, ks) = steps_scale * sum_{k in ks} c_k * mean_i(theta * x_i): d/dtheta is known."""

    def __init__(self, theta, kl_to_old=0.0):
        self.theta, self.kl, self.steps_scale, self.calls = theta, kl_to_old, 1.0, []

    def losses(self, sub, ks):
        self.calls.append((sub.x.clone(), list(ks)))
        loss = self.steps_scale * C[ks].sum() * (self.theta * sub.x).mean()
        return {"loss": loss, "kl_to_old": torch.tensor(self.kl)}

    def logprob_delta(self):
        return 0.0


class Task:
    """The runtime hooks of one process, recording what the update does."""

    def __init__(self, theta):
        self.theta, self.grads, self.synced, self.unsynced = theta, [], 0, 0

    def backward(self, loss):
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self):
        self.unsynced += 1
        yield

    def autocast(self):
        return contextlib.nullcontext()

    def optimizer_step(self):
        self.grads.append(float(self.theta.grad))
        self.theta.grad = None
        return {"grad_norm": self.grads[-1]}

    def reduce(self, value, op):
        return float(value)


def _run(plan, B=8, kl=0.0, seed=0):
    theta = torch.ones((), dtype=torch.float64, requires_grad=True)
    x = torch.arange(1.0, B + 1, dtype=torch.float64)
    task, method = Task(theta), Method(theta, kl)
    out = Trainer(task).update(method, Paths(x), plan, torch.Generator().manual_seed(seed))
    return task, method, out, x


def test_each_update_is_the_mean_over_its_minibatches_of_the_full_step_sum():
    plan = UpdatePlan(num_inner_epochs=2, minibatch_size=2, accum=2, live_steps=tuple(range(5)),
                      steps_per_minibatch=5, steps_per_backward=1)
    task, method, out, x = _run(plan)
    assert out["updates"] == 4 and not out["early_stopped"] and len(task.grads) == 4
    mb = x.split(2)  # in order (no shuffle), both passes
    want = [float(C.sum() * (mb[0].mean() + mb[1].mean()) / 2), float(C.sum() * (mb[2].mean() + mb[3].mean()) / 2)]
    assert task.grads == pytest.approx(want * 2, rel=1e-14)
    # negative control: accumulation that sums the minibatches' losses instead of averaging them is told apart
    assert task.grads[0] != pytest.approx(2 * want[0], rel=1e-3)
    # one step per backward: 2 minibatches x 5 steps per update; gradients synchronised on the last backward only
    assert len(method.calls) == 4 * 10 and task.unsynced == 4 * 9
    assert out["grad_norm"] == pytest.approx(sum(task.grads) / 4, rel=1e-14)


def test_all_steps_in_one_backward_give_the_same_gradient():
    kw = dict(num_inner_epochs=1, minibatch_size=4, accum=2, live_steps=tuple(range(5)), steps_per_minibatch=5)
    one = _run(UpdatePlan(**kw, steps_per_backward=1))[0].grads
    task, method, _, _ = _run(UpdatePlan(**kw, steps_per_backward=0))
    assert task.grads == pytest.approx(one, rel=1e-14)
    assert [ks for _, ks in method.calls] == [[0, 1, 2, 3, 4]] * 2 and task.unsynced == 1


def test_step_subsets_are_random_sorted_and_rescaled_so_the_update_is_unbiased():
    live = (0, 2, 3, 4)  # step 1 deterministic
    plan = UpdatePlan(num_inner_epochs=1, minibatch_size=1, accum=1, live_steps=live, steps_per_minibatch=2)
    task, method, _, x = _run(plan, B=600)
    assert method.steps_scale == 2.0
    subsets = [tuple(ks) for _, ks in method.calls]
    assert all(len(s) == 2 and s[0] < s[1] and set(s) <= set(live) for s in subsets)
    counts = {s: subsets.count(s) for s in itertools.combinations(live, 2)}
    assert min(counts.values()) > 60  # all 6 pairs drawn, each ~100 times
    # E[steps_scale * sum_{k in S} c_k] over uniform pairs S is the full sum over the live steps
    exact = float(C[list(live)].sum())
    assert sum(2.0 * float(C[list(s)].sum()) for s in counts) / len(counts) == pytest.approx(exact, rel=1e-14)
    g = torch.tensor(task.grads) / x  # per path: steps_scale * sum_{k in S} c_k
    se = float(g.std() / len(g) ** 0.5)
    assert abs(float(g.mean()) - exact) < 4.5 * se
    assert abs(float(g.mean()) - 0.5 * exact) > 4.5 * se  # negative control: forgetting steps_scale fails


def test_shuffled_passes_cover_every_path_once():
    plan = UpdatePlan(num_inner_epochs=3, minibatch_size=3, accum=1, live_steps=(0,), steps_per_minibatch=1,
                      shuffle=True)
    _, method, out, x = _run(plan, B=9)
    seen = [sub for sub, _ in method.calls]
    passes = [torch.cat(seen[3 * e:3 * e + 3]) for e in range(3)]
    assert all(torch.equal(p.sort().values, x) for p in passes)
    assert not all(torch.equal(p, x) for p in passes)  # shuffled, not in order


def test_early_stop_on_the_path_kl_to_the_old_policy():
    kw = dict(num_inner_epochs=2, minibatch_size=2, accum=1, live_steps=(0, 1), steps_per_minibatch=2)
    _, _, out, _ = _run(UpdatePlan(**kw, early_stop_path_kl=0.5), kl=1.0)
    assert out["updates"] == 1 and out["early_stopped"]
    _, _, out, _ = _run(UpdatePlan(**kw, early_stop_path_kl=0.5), kl=0.1)
    assert out["updates"] == 8 and not out["early_stopped"]


def test_a_step_count_outside_the_trainable_steps_is_refused():
    for n in (0, 3):
        with pytest.raises(ValueError, match="steps_per_minibatch"):
            _run(UpdatePlan(num_inner_epochs=1, minibatch_size=2, accum=1, live_steps=(0, 1),
                            steps_per_minibatch=n))


def test_a_bad_plan_is_refused_naming_the_field():
    ok = dict(num_inner_epochs=1, minibatch_size=2, accum=1, live_steps=(0,), steps_per_minibatch=1)
    for field, bad in (("num_inner_epochs", 0), ("minibatch_size", 0), ("accum", -1), ("steps_per_backward", -1)):
        name = "gradient_accumulation_steps" if field == "accum" else field
        with pytest.raises(ValueError, match=f"UpdatePlan.{name}"):
            UpdatePlan(**{**ok, field: bad})
    with pytest.raises(ValueError, match="live_steps"):
        UpdatePlan(**{**ok, "live_steps": ()})
