"""Training algorithms on the controlled sampler: the continuous-time actor-critic and DDPO/DPOK baselines.

* :mod:`.config` -- one typed, documented config per algorithm and ``key=value`` overrides;
* :mod:`.environment` -- the :class:`Environment` a trainer sees, the rollout :class:`Batch`, the solvers;
* :mod:`.trainer` -- the shared loop (rollouts, JSONL metrics, checkpoints, exact and checked resume,
  Ctrl-C handling, evaluation); :mod:`.loop_utils` -- per-iteration generators, LR multipliers;
* :mod:`.actor_critic` -- ``sa_ac``, the continuous-time actor-critic;
* :mod:`.methods` -- the RL methods (``sa_ac``, ``ddpo_sf``, ``ddpo_is``, ``dpok``, ``flow_grpo``), one implementation
  each for toys and images, on a recorded :class:`~.rl_batch.RolloutBatch` (:mod:`.method_base`: the contract);
* :mod:`.baselines` -- :class:`MethodTrainer`: ``ddpo_sf``, ``ddpo_is``, ``dpok`` on the toys through :mod:`.methods`;
* :mod:`.policies` -- residual / plain MLP and piecewise-affine policies started at the pretrained score;
* :mod:`.checkpoint` -- checksummed atomic save/load with fallback to the previous intact checkpoint, RNG
  state, SIGINT/SIGTERM handling.

>>> trainer = make_trainer(SAACConfig(iterations=100), env, policy, value=MLPValue(2))
>>> trainer.train()
"""

from .actor_critic import SAActorCritic
from .baselines import MethodTrainer
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
from .trainer import SOLVERS, Batch, Environment, Trainer

TRAINERS = {"sa_ac": SAActorCritic, "ddpo_sf": MethodTrainer, "ddpo_is": MethodTrainer, "dpok": MethodTrainer}


def make_trainer(cfg: TrainConfig, env: Environment, policy, value=None, evaluator=None) -> Trainer:
    """The trainer class for ``cfg``'s algorithm, constructed."""
    return TRAINERS[type(cfg).algo](cfg, env, policy, value=value, evaluator=evaluator)


__all__ = ["SAActorCritic", "MethodTrainer", "Trainer", "Environment", "Batch", "SOLVERS", "TRAINERS",
           "make_trainer", "TrainConfig", "SAACConfig", "DDPOSFConfig", "DDPOISConfig", "DPOKConfig", "CONFIGS",
           "override", "describe", "to_dict", "from_dict", "ResidualMLPPolicy", "MLPPolicy", "GreedyPolicy",
           "PiecewiseAffinePolicy", "grid_means", "values_on_grid", "save_checkpoint", "load_checkpoint",
           "rng_state", "set_rng_state", "seed_everything", "validate", "parse_overrides", "CheckpointCorruptError",
           "TrainingInterrupted"]
