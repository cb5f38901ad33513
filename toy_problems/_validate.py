"""Input validation shared by the toy problems: clear errors that name the offending parameter."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["as_vector", "as_matrix", "check_spd", "check_symmetric", "check_beta", "check_init"]


def _finite(name: str, x: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name!r} contains NaN or Inf")
    return x


def as_vector(name: str, x, d: int | None = None) -> np.ndarray:
    try:
        v = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name!r} must be a real vector, got {x!r}") from err
    if v.ndim != 1 or (d is not None and v.shape[0] != d) or v.shape[0] < 1:
        want = f"({d},)" if d is not None else "(d,) with d >= 1"
        raise ValueError(f"{name!r} must have shape {want}, got {v.shape}")
    return _finite(name, v)


def as_matrix(name: str, x, d: int) -> np.ndarray:
    try:
        m = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name!r} must be a real matrix, got {x!r}") from err
    if m.shape != (d, d):
        raise ValueError(f"{name!r} must have shape ({d}, {d}), got {m.shape}")
    return _finite(name, m)


def check_symmetric(name: str, m: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    if not np.allclose(m, m.T, atol=tol * max(1.0, float(np.abs(m).max(initial=0.0)))):
        raise ValueError(f"{name!r} must be symmetric")
    return 0.5 * (m + m.T)


def check_spd(name: str, m: np.ndarray) -> np.ndarray:
    m = check_symmetric(name, m)
    try:
        np.linalg.cholesky(m)
    except np.linalg.LinAlgError as err:
        raise ValueError(f"{name!r} is not symmetric positive definite") from err
    return m


def check_beta(beta) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"'beta' must be a positive real number, got {beta!r}") from err
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"'beta' must be finite and > 0, got {beta!r}")
    return b


def check_init(init: str) -> str:
    if init not in ("p_T", "standard"):
        raise ValueError(f"'init' must be 'p_T' or 'standard', got {init!r}")
    return init
