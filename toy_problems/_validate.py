"""Input validation shared by the toy problems: clear errors that name the offending parameter."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["real_array", "real_scalar", "positive_int", "as_vector", "as_matrix", "check_spd", "check_symmetric",
           "check_beta", "check_init", "INITS"]

INITS = ("p_T", "standard")


def real_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a float64 array; TypeError if not real numbers, ValueError if NaN/Inf."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        raw = np.asarray(value)
    except Exception as err:  # pragma: no cover - exotic objects
        raise TypeError(f"{name!r} must be an array of real numbers, got {type(value).__name__}") from err
    real = np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
    if raw.dtype == bool or not real:
        raise TypeError(f"{name!r} must be an array of real numbers, got dtype {raw.dtype}")
    arr = raw.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name!r} contains NaN or Inf")
    return arr


def real_scalar(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray | torch.Tensor):
        raise TypeError(f"{name!r} must be a real number, got {value!r}")
    arr = real_array(name, value)
    if arr.ndim != 0 and arr.size != 1:
        raise ValueError(f"{name!r} must be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name!r} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name!r} must be >= 1, got {value}")
    return int(value)


def as_vector(name: str, x, d: int | None = None) -> np.ndarray:
    v = real_array(name, x)
    if v.ndim != 1 or (d is not None and v.shape[0] != d) or v.shape[0] < 1:
        want = f"({d},)" if d is not None else "(d,) with d >= 1"
        raise ValueError(f"{name!r} must have shape {want}, got {v.shape}")
    return v


def as_matrix(name: str, x, d: int) -> np.ndarray:
    m = real_array(name, x)
    if m.shape != (d, d):
        raise ValueError(f"{name!r} must have shape ({d}, {d}), got {m.shape}")
    return m


def _label(name: str, index: int | None) -> str:
    return f"{name!r}" if index is None else f"{name!r}[{index}]"


def check_symmetric(name: str, m: np.ndarray, tol: float = 1e-8, index: int | None = None) -> np.ndarray:
    """Symmetric within ``tol`` relative to ``max(1, max|m|)``; returns the symmetrised matrix."""
    if np.max(np.abs(m - m.T)) > tol * max(1.0, float(np.abs(m).max(initial=0.0))):
        raise ValueError(f"{_label(name, index)} must be symmetric")
    return 0.5 * (m + m.T)


def check_spd(name: str, m: np.ndarray, index: int | None = None) -> np.ndarray:
    """Symmetric positive definite (Cholesky); ``index`` labels one matrix of a stack, e.g. ``'covs'[1]``."""
    label = _label(name, index)
    try:
        m = check_symmetric(name, m, index=index)
    except ValueError as err:
        raise ValueError(f"{label} is not symmetric positive definite (not symmetric)") from err
    try:
        np.linalg.cholesky(m)
    except np.linalg.LinAlgError as err:
        raise ValueError(f"{label} is not symmetric positive definite") from err
    return m


def check_beta(beta) -> float:
    b = real_scalar("beta", beta)
    if b <= 0:
        raise ValueError(f"'beta' must be > 0, got {b}")
    return b


def check_init(init: str) -> str:
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"'init' must be one of {INITS}, got {init!r}")
    return init
