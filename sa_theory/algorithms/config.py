r"""Typed, documented training configs (ddpo-pytorch ergonomics) and ``key=value`` overrides.

Every field of every config carries a one-line ``help`` in its metadata; :func:`describe` prints them.
Overrides come from a command line (``--learning_rate 1e-3``, ``--set learning_rate=1e-3``) or a dict; an unknown
key raises ``KeyError`` naming it, and values are converted to the field's declared type (``"none"`` gives
``None`` for optional fields, booleans accept ``true/false/1/0/yes/no``).

Every field also has a qualified name ``section.field`` (:data:`QUALIFIED`): the image config's name wherever the
quantity is the same (``train.num_epochs``, ``sample.batch_size``, ``sample.num_steps``, ``train.learning_rate``,
``value.loss``, ``value.fit``, ...), so the toy and image command lines share one vocabulary.

>>> cfg = override(SAACConfig(), {"learning_rate": "3e-3", "sample.num_steps": "25"})
>>> cfg.learning_rate, cfg.num_steps
(0.003, 25)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "SAACConfig", "DDPOSFConfig", "DDPOISConfig", "DPOKConfig", "CONFIGS",
           "override", "describe", "to_dict", "from_dict", "convert_value", "validate", "parse_overrides",
           "resume_changes", "RESUME_MUTABLE", "RENAMED", "QUALIFIED", "qualified_names"]


def _f(default: Any, help: str, **kw):
    """A dataclass field with a documented default."""
    return field(default=default, metadata={"help": help, **kw})


#: the qualified name ``section.field`` of a toy config field where it is not ``train.<field>``: the image config's
#: name (:mod:`t2i.config`) wherever the quantity is the same, so both command lines take ``--train.num_epochs``,
#: ``--sample.num_steps``, ``--train.learning_rate``, ``--value.loss``, ``--value.fit``, ... (:func:`qualified_names`)
QUALIFIED = {"batch_size": "sample.batch_size", "num_steps": "sample.num_steps", "solver": "sample.solver",
             "log_every": "log.every", "eval_every": "log.eval_every", "log_path": "log.path",
             "checkpoint_dir": "log.checkpoint_dir", "keep_last": "log.keep_last",
             "checkpoint_every": "log.checkpoint_every",
             "overwrite": "log.overwrite", "progress": "log.progress", "value_loss": "value.loss",
             "value_lr": "value.learning_rate", "value_lr_schedule": "value.lr_schedule",
             "value_epochs": "value.epochs", "value_batch": "value.batch_size", "value_grad_coef": "value.grad_coef",
             "value_fit": "value.fit"}


def qualified_names(cls) -> dict[str, str]:
    """``{field: section.field}`` of a config class: its ``_qualified`` table, else ``<_section>.<field>``; a class
    without ``_section`` (the image config's sections) keeps its field names."""
    cls = cls if isinstance(cls, type) else type(cls)
    table, section = getattr(cls, "_qualified", {}), getattr(cls, "_section", None)
    return {f.name: table.get(f.name, f"{section}.{f.name}" if section else f.name) for f in dataclasses.fields(cls)}


@dataclass
class TrainConfig:
    """Fields shared by every trainer (rollouts, budget, optimisation, schedules, logging, checkpoints). Each field
    also has a qualified name ``section.field`` (:data:`QUALIFIED`), accepted by :func:`override` and the CLI."""

    _qualified = QUALIFIED
    _section = "train"

    # -- run -------------------------------------------------------------------------------------
    seed: int = _f(0, "seed of every random draw (rollouts, subsets, initialisation); same seed = same run")
    num_epochs: int = _f(200, "training epochs (the trainer's iterations): each rolls out batch_size paths (= reward "
                              "queries), then updates on them")
    batch_size: int = _f(256, "paths rolled out per epoch (reward queries per epoch; on images sample.batch_size x "
                              "num_batches_per_epoch x processes)")
    gradient_accumulation_steps: int = _f(1, "minibatches per optimizer update: each update's batch_size paths are "
                                             "split into this many (as train.gradient_accumulation_steps on images)")
    # -- sampler ---------------------------------------------------------------------------------
    num_steps: int = _f(50, "number N of sampler steps of each training rollout (uniform grid on [0, T])")
    solver: str = _f("euler", "training solver: native 'euler' | 'heun', or torchsde 'tsde_euler' | 'milstein' | 'srk'")
    # -- objective -------------------------------------------------------------------------------
    beta: float = _f(1.0, "KL weight beta of J = E r(Y_T) - beta KL(P^theta || P^pre)")
    beta_schedule: str = _f("constant", "KL schedule: 'constant' or 'linear' (ramp from beta_start to beta)")
    beta_start: float = _f(0.0, "beta at epoch 0 when beta_schedule='linear'")
    beta_warmup: int = _f(0, "epochs of the linear beta ramp")
    # -- optimisation ----------------------------------------------------------------------------
    learning_rate: float = _f(1e-3, "Adam learning rate of the policy")
    lr_schedule: str = _f("constant", "learning-rate schedule: 'constant' | 'linear' (decay to 0) | 'cosine'")
    lr_warmup_epochs: int = _f(0, "epochs of linear learning-rate warm-up (images count optimizer updates instead: "
                                  "train.lr_warmup_steps)")
    adam_epsilon: float = _f(1e-8, "Adam epsilon")
    max_grad_norm: float = _f(10.0, "clip the policy gradient's global norm to this (<= 0: no clipping)")
    # -- logging / evaluation / checkpoints ------------------------------------------------------
    log_every: int = _f(1, "write a JSONL metrics record every this many epochs")
    eval_every: int = _f(0, "call the evaluator every this many epochs (0: never; also at the end if > 0)")
    log_path: str | None = _f(None, "JSONL metrics file (appended; None: keep metrics in memory only)")
    checkpoint_dir: str | None = _f(None, "checkpoints folder: checkpoint-EEEEEE folders and a latest pointer, the "
                                          "image runs' layout (checksummed, written atomically; None: no checkpoints)")
    keep_last: int = _f(2, "checkpoints kept (a damaged latest falls back to the newest intact one)")
    checkpoint_every: int = _f(0, "save a checkpoint every this many epochs (0: every ~10% of the epochs; "
                                  "-1: only at the end); also at the end and on SIGINT/SIGTERM")
    overwrite: bool = _f(False, "let a fresh run (epoch 0) replace an existing log_path / checkpoint_dir "
                                "(default: refuse, naming the file)")
    progress: bool = _f(True, "show a tqdm progress bar")
    dtype: str = _f("float32", "torch dtype of rollouts and networks: 'float32' | 'float64'")

    algo = "base"


@dataclass
class SAACConfig(TrainConfig):
    """Continuous-time actor-critic ('sa_ac'): value learning + trust-region Hamiltonian surrogate (R4, R7-R9)."""

    num_inner_epochs: int = _f(4, "passes (optimizer updates) over each rollout batch on the trust-region surrogate")
    kl_penalty: float = _f(1.0, "weight of the path KL(P^theta' || P^theta_old) penalty in the surrogate (R8)")
    max_path_kl: float | None = _f(None, "clip: paths whose KL to the old policy exceeds this give no gradient")
    early_stop_path_kl: float = _f(0.0, "stop the iteration's actor updates once an update's mean path KL to the old "
                                        "policy exceeds this (0: off; as train.early_stop_path_kl on images)")
    tau_subset: int = _f(0, "actor: use a random subset of this many grid times per epoch (0: the full grid)")
    value_loss: str = _f("mc", "critic loss: 'mc' (regression on R - beta sum_{j>=k} l_j) | 'mc_cv' (on R - beta "
                               "sum_{j>=k} log(pi/pi_pre)(Y_{j+1}|Y_j): same mean, less variance near the optimum; "
                               "Euler) | 'td' (semi-gradient TD(0))")
    value_lr: float = _f(3e-3, "Adam learning rate of the critic")
    value_lr_schedule: str = _f("constant", "critic learning-rate schedule over the epochs: 'constant' | 'linear' "
                                            "| 'cosine' (decaying it averages out the critic's batch noise)")
    value_fit: str = _f("separate", "how the critic is fitted: 'separate' (value_epochs Adam steps on each rollout "
                                    "batch before the actor update) | 'joint' (its regression loss on the batch's "
                                    "targets added to every actor minibatch's loss, one optimizer with value_lr for "
                                    "its parameters; as value.fit='joint' on images)")
    value_epochs: int = _f(20, "critic gradient steps per rollout batch")
    value_batch: int = _f(2048, "critic: state samples per step (full paths at value_batch // batch_size grid times)")
    lr_coef: float = _f(0.0, "weight of an added likelihood-ratio (TD-advantage, importance-weighted) term; "
                             "use > 0 for critics of non-differentiable rewards")
    costate: str = _f("critic_next", "costate p_k of step k in the actor's surrogate: 'critic_next' (grad_y V_psi "
                                     "at the step's next state (tau_{k+1}, Y_{k+1}): chain-consistent, as on images) | "
                                     "'critic' (at the left point (tau_k, Y_k): an O(dtau) bias on coarse grids) | "
                                     "'pathwise' (sampled discrete adjoint P_{k+1}, unbiased for the N-step chain; "
                                     "differentiable reward, Euler)")
    estimator: str = _f("value_gradient", "actor gradient: 'value_gradient' (R4: costates through the trust-region "
                                          "surrogate) | 'likelihood_ratio' (R5: importance-weighted TD advantages "
                                          "with the critic as baseline, the KL term differentiated exactly; Euler)")
    value_grad_coef: float = _f(0.0, "weight of the Sobolev critic term |grad_y V_psi - P_k|^2 (P_k: pathwise "
                                     "costates; differentiable reward, Euler); 0: value regression only")
    final_distill_steps: int = _f(0, "after the last iteration, Adam steps regressing the actor onto the critic's "
                                     "greedy policy s + grad V_psi / beta on its own fresh paths (no reward queries; "
                                     "0: off)")
    final_distill_paths: int = _f(4096, "final distillation: fresh actor paths whose states it fits (batch_size "
                                        "of them per step)")
    final_distill_lr: float = _f(1e-2, "Adam learning rate of the final distillation (cosine-decayed to 0)")
    algo = "sa_ac"


@dataclass
class DDPOSFConfig(TrainConfig):
    """DDPO-SF: REINFORCE on the N-step Euler chain; the sampled log-ratio KL is put in the return so the
    algorithm optimises the same J (DDPO itself has no KL: set beta=0 for the original)."""

    normalize_advantages: bool = _f(True, "standardise the per-path returns over the batch (DDPO's normalisation)")
    algo = "ddpo_sf"


@dataclass
class DDPOISConfig(TrainConfig):
    """DDPO-IS: PPO-clip on per-step likelihood ratios with a fixed clip range (KL in the return, see SF)."""

    num_inner_epochs: int = _f(4, "PPO passes (optimizer updates) over each rollout batch")
    clip_range: float = _f(0.1, "fixed per-step ratio clip range (an N-dependent trust region, theory.md R8)")
    normalize_advantages: bool = _f(True, "standardise the per-path returns over the batch")
    algo = "ddpo_is"


@dataclass
class DPOKConfig(TrainConfig):
    """DPOK: policy gradient with a learned value baseline and a per-step KL regulariser."""

    value_fit: str = _f("separate", "how the value baseline is fitted: 'separate' (value_epochs Adam steps on each "
                                    "rollout batch before the actor update) | 'joint' (its regression loss on R added "
                                    "to the actor's loss, one optimizer with value_lr for its parameters; as "
                                    "value.fit='joint' on images)")
    value_lr: float = _f(3e-3, "Adam learning rate of the value baseline")
    value_epochs: int = _f(20, "value-baseline gradient steps per rollout batch")
    value_batch: int = _f(2048, "value baseline: state samples per step "
                                 "(full paths at value_batch // batch_size times)")
    ratio_clamp: float = _f(1e-4, "per-step likelihood ratio clamped to [1 - c, 1 + c] (DPOK's 1e-4)")
    algo = "dpok"


CONFIGS: dict[str, type[TrainConfig]] = {c.algo: c for c in (SAACConfig, DDPOSFConfig, DDPOISConfig, DPOKConfig)}

_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_value(name: str, typ: Any, value: Any) -> Any:
    """Convert ``value`` (often a string) to ``typ``; ``ValueError`` naming ``name`` if it cannot."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        typ = args[0]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError(value)
                return int(f)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field {name!r} expects {getattr(typ, '__name__', typ)}, got {value!r}") from err
    return value


#: renamed fields, old name -> new name: the names the image configs use for the same quantities (``t2i.config``'s
#: ``train.*``); old checkpoints load under the new names, an override with an old name is refused naming the new one
RENAMED = {"lr": "learning_rate", "adam_eps": "adam_epsilon", "grad_accum": "gradient_accumulation_steps",
           "epochs": "num_inner_epochs", "iterations": "num_epochs", "sampler_steps": "num_steps",
           "lr_warmup": "lr_warmup_epochs", "checkpoint_path": "checkpoint_dir"}


def override(cfg, updates: dict[str, Any] | None = None, **kw):
    """A copy of ``cfg`` with fields replaced (values converted to the declared types).

    Unknown keys raise ``KeyError`` naming them and listing the valid fields; a renamed one (:data:`RENAMED`)
    raises ``KeyError`` naming its new name.
    """
    updates = {**(updates or {}), **kw}
    types_ = _field_types(type(cfg))
    qualified = qualified_names(cfg)
    by_qualified = {q: n for n, q in qualified.items()}
    new = {}
    for key, value in updates.items():
        k = key.replace("-", "_")
        k = by_qualified.get(k, k)
        if k in RENAMED:
            raise KeyError(f"config field {key!r} was renamed to {RENAMED[k]!r} "
                           f"({qualified.get(RENAMED[k], RENAMED[k])})")
        if k not in qualified:
            raise KeyError(f"unknown config field {key!r} for {type(cfg).__name__}; valid fields: "
                           f"{sorted(qualified.values())}")
        new[k] = convert_value(k, types_[k], value)
    return dataclasses.replace(cfg, **new)


def to_dict(cfg) -> dict[str, Any]:
    """Plain dict of the config's fields (JSON-serialisable), with ``algo``."""
    return {"algo": type(cfg).algo, **dataclasses.asdict(cfg)}


def from_dict(d: dict[str, Any]):
    """Inverse of :func:`to_dict` (a dict with old names, :data:`RENAMED`, loads under the new ones)."""
    d = {RENAMED.get(k, k): v for k, v in d.items()}
    cls = CONFIGS[d.pop("algo")]
    return override(cls(), d)


def describe(cfg_or_cls, prefix: str = "") -> str:
    """One line per field: ``prefix + qualified name (type) = default  # help`` (the values of an instance, else the
    class defaults)."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    types_ = _field_types(cls)
    qualified = qualified_names(cls)
    lines = [f"{cls.__name__}: {cls.__doc__.splitlines()[0] if cls.__doc__ else ''}"]
    for f in dataclasses.fields(cls):
        if not isinstance(cfg_or_cls, type):
            val = getattr(cfg_or_cls, f.name)
        else:
            val = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        t = types_[f.name]
        tname = getattr(t, "__name__", str(t).replace("typing.", ""))
        lines.append(f"  {prefix}{qualified[f.name]} ({tname}) = {val!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject no-op or contradictory settings with a ``ValueError`` naming the field (returns ``cfg``)."""

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"config field {name!r} {rule}, got {getattr(cfg, name)!r}")

    def finite(name: str) -> bool:
        v = getattr(cfg, name)
        return v is not None and math.isfinite(v)

    for name in ("num_epochs", "batch_size", "num_steps", "gradient_accumulation_steps", "log_every"):
        need(getattr(cfg, name) >= 1, name, "must be >= 1")
    for name in ("eval_every", "beta_warmup", "lr_warmup_epochs"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.keep_last >= 1, "keep_last", "must be >= 1")
    need(cfg.checkpoint_every >= -1, "checkpoint_every", "must be >= 1, 0 (auto) or -1 (only at the end)")
    for name in ("beta", "beta_start"):
        need(finite(name) and getattr(cfg, name) >= 0, name, "must be finite and >= 0")
    for name in ("learning_rate", "adam_epsilon"):
        need(finite(name) and getattr(cfg, name) > 0, name, "must be finite and > 0")
    need(finite("max_grad_norm"), "max_grad_norm", "must be finite (<= 0: no clipping)")
    need(cfg.beta_schedule in ("constant", "linear"), "beta_schedule", "must be 'constant' or 'linear'")
    need(cfg.dtype in ("float32", "float64"), "dtype", "must be 'float32' or 'float64'")
    names = {f.name for f in dataclasses.fields(cfg)}
    for name in ("num_inner_epochs", "value_epochs", "value_batch"):
        if name in names:
            need(getattr(cfg, name) >= 1, name, "must be >= 1 (0 makes the update a no-op)")
    for name in ("kl_penalty", "lr_coef"):
        if name in names:
            need(finite(name) and getattr(cfg, name) >= 0, name, "must be finite and >= 0")
    for name in ("value_lr", "clip_range"):
        if name in names:
            need(finite(name) and getattr(cfg, name) > 0, name, "must be finite and > 0")
    if "early_stop_path_kl" in names:
        need(finite("early_stop_path_kl") and cfg.early_stop_path_kl >= 0, "early_stop_path_kl",
             "must be finite and >= 0 (0: off)")
    if "max_path_kl" in names and cfg.max_path_kl is not None:
        need(finite("max_path_kl") and cfg.max_path_kl > 0, "max_path_kl", "must be > 0 (or none: no clip)")
    if "value_fit" in names:
        need(cfg.value_fit in ("separate", "joint"), "value_fit", "must be 'separate' or 'joint'")
        need(cfg.value_fit == "separate" or getattr(cfg, "value_grad_coef", 0.0) == 0, "value_fit",
             "must be 'separate' with value_grad_coef > 0 (the Sobolev term is fitted in the critic phase)")
    if "tau_subset" in names:
        need(0 <= cfg.tau_subset <= cfg.num_steps, "tau_subset", "must be in [0, num_steps]")
    return cfg


#: fields a resumed run may change (applied and reported); any other difference refuses to resume
RESUME_MUTABLE = frozenset({"num_epochs", "progress", "log_every", "eval_every", "checkpoint_every", "log_path",
                            "checkpoint_dir", "keep_last", "overwrite", "eval_paths"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, requested: dict, mutable=RESUME_MUTABLE) -> dict[str, tuple[Any, Any]]:
    """Compare a checkpoint's config with the requested one (nested dicts allowed; keys missing on either side,
    e.g. fields added since, are skipped). Returns the changed fields of ``mutable`` (matched by the last name
    component or the full dotted name) as ``{name: (saved, requested)}``; any other change raises
    ``ValueError`` naming every such field with both values."""
    a, b = _flat(saved), _flat(requested)
    changed = {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]}
    bad = {k: v for k, v in changed.items() if k not in mutable and k.rsplit(".", 1)[-1] not in mutable}
    if bad:
        desc = "; ".join(f"{k}: checkpoint has {v[0]!r}, requested {v[1]!r}" for k, v in sorted(bad.items()))
        raise ValueError(f"cannot resume: the run was made with different settings ({desc}). Resume with the "
                         f"checkpoint's values, or start a new run in another folder (only "
                         f"{', '.join(sorted(mutable))} may change on resume)")
    return {k: v for k, v in changed.items() if k not in bad}


def parse_overrides(rest: list[str], aliases: dict[str, str] | None = None, dashes_to_underscores: bool = True
                    ) -> dict[str, str]:
    """The one command-line override parser of both CLIs: ``--key value``, ``--key=value``, ``--set key=value``
    and a bare ``--flag`` (= ``true``) -> ``{key: value}`` (strings; dashes in keys become underscores unless
    ``dashes_to_underscores`` is False; ``aliases`` renames keys). A stray token raises ``ValueError``."""
    aliases = aliases or {}
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--set":
            if i + 1 >= len(rest) or "=" not in rest[i + 1]:
                raise ValueError("--set needs key=value")
            k, v = rest[i + 1].split("=", 1)
            i += 2
        elif tok.startswith("--") and len(tok) > 2:
            body = tok[2:]
            if "=" in body:
                (k, v), i = body.split("=", 1), i + 1
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                k, v, i = body, rest[i + 1], i + 2
            else:  # bare flag: boolean true
                k, v, i = body, "true", i + 1
        else:
            raise ValueError(f"unexpected argument {tok!r} (use --field value or --set field=value)")
        if dashes_to_underscores:
            k = k.replace("-", "_")
        out[aliases.get(k, k)] = v
    return out
