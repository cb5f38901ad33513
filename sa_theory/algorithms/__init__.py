"""Training algorithms on the controlled sampler: the continuous-time actor-critic and DDPO/DPOK baselines.

* :mod:`.config` -- one typed, documented config per algorithm and ``key=value`` overrides;
* :mod:`.environment` -- the :class:`Environment` a trainer sees, the rollout :class:`Batch`, the solvers;
* :mod:`.methods` -- the RL methods (``sa_ac``, ``ddpo_sf``, ``ddpo_is``, ``dpok``, ``flow_grpo``), one implementation
  each for toys and images, on a recorded :class:`~.rl_batch.RolloutBatch` (:mod:`.method_base`: the contract,
  :class:`~.method_base.MethodConfig`: the method part of every config);
* :mod:`.trainer` -- the one :class:`Trainer` (the loop and the policy update every model trains through, toys and
  images); :mod:`.toy_task` -- the toy problems as its task, one for every method (rollouts, the critic phase of
  :mod:`.critics`, JSONL metrics, exact and checked resume (:mod:`.trainer_state`), evaluation, :mod:`.distill`);
  :mod:`.step_env` -- the toys as the methods' step environment;
  :mod:`.loop_utils` -- per-iteration generators, LR multipliers;
* :mod:`.policies` -- residual / plain MLP and piecewise-affine policies started at the pretrained score;
* :mod:`.checkpoint` -- checksummed atomic save/load with fallback to the previous intact checkpoint, RNG
  state, SIGINT/SIGTERM handling.

>>> trainer = make_trainer(SAACConfig(num_epochs=100), env, policy, value=MLPValue(2))
>>> trainer.train()
"""

from .checkpoint import (
    CheckpointCorruptError,
    TrainingInterrupted,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .config import (
    CONFIGS,
    DDPOISConfig,
    DDPOSFConfig,
    DPOKConfig,
    SAACConfig,
    TrainConfig,
    describe,
    from_dict,
    override,
    parse_overrides,
    to_dict,
    validate,
)
from .policies import GreedyPolicy, MLPPolicy, PiecewiseAffinePolicy, ResidualMLPPolicy, grid_means
from .step_env import values_on_grid
from .toy_task import SOLVERS, Batch, Environment, ToyTask
from .trainer import Trainer, UpdatePlan


def make_trainer(cfg: TrainConfig, env: Environment, policy, value=None, evaluator=None) -> Trainer:
    """The one :class:`Trainer` on a toy environment (:class:`~.toy_task.ToyTask`; ``cfg.algo`` picks the
    method)."""
    return Trainer(ToyTask(cfg, env, policy, value=value, evaluator=evaluator))


__all__ = ["Trainer", "UpdatePlan", "ToyTask", "Environment", "Batch", "SOLVERS",
           "make_trainer", "TrainConfig", "SAACConfig", "DDPOSFConfig", "DDPOISConfig", "DPOKConfig", "CONFIGS",
           "override", "describe", "to_dict", "from_dict", "ResidualMLPPolicy", "MLPPolicy", "GreedyPolicy",
           "PiecewiseAffinePolicy", "grid_means", "values_on_grid", "save_checkpoint", "load_checkpoint",
           "rng_state", "set_rng_state", "seed_everything", "validate", "parse_overrides", "CheckpointCorruptError",
           "TrainingInterrupted"]
