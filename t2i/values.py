r"""Value networks on SD latents (theory.md R10), behind sa_theory's ``value(tau, y, cond) -> (B,)``
interface.

``cond`` is a dict: ``"text"`` the pooled text embedding ``(B, D)``; ``"tweedie"`` (when available) the
reward of the denoised image :math:`r(\mathrm{decode}(\hat x_0(t, x)))` ``(B,)``, with the environment's
prediction :math:`\hat x_0` (:meth:`t2i.environments.ImageEnvironment.x0_hat`: Tweedie
:math:`(x + \sigma_t^2 s)/\alpha_t` for UNets through :func:`sa_theory.parametrization.x0_from_score`,
:math:`x - t v` for flow models), computed once per recorded state by :func:`tweedie_rewards` from the
*pretrained* guided action.

Designs (``value.kind``):

* ``"tweedie"`` -- :math:`V = r(\hat x_0)`, no parameters (:func:`tweedie_value`).
* ``"critic"``  -- :class:`LatentCritic`: a small conv net on (latent, pooled text embedding, tau).
* ``"residual"`` -- :class:`sa_theory.value.ResidualValue`: :math:`(1 + t\gamma) r(\hat x_0) +
t\,\mathrm{NN}`,
  terminal condition built in.
* ``"none"``    -- no baseline.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sa_theory.value import ResidualValue

__all__ = ["LatentCritic", "tweedie_value", "tweedie_rewards", "make_value_model", "VALUE_KINDS"]

VALUE_KINDS = ("critic", "tweedie", "residual", "none")


def _time_features(tau: torch.Tensor, B: int, dim: int = 16) -> torch.Tensor:
    tau = torch.as_tensor(tau, dtype=torch.float32).reshape(-1).expand(B)
    freqs = torch.exp(torch.linspace(0, math.log(100.0), dim // 2, device=tau.device))
    ang = tau[:, None] * freqs[None] * math.pi
    return torch.cat([ang.sin(), ang.cos()], 1)


class LatentCritic(nn.Module):
    """Small critic :math:`\\mathrm{NN}(\\tau, x, c)` on SD latents ``(B, 4, h, w)``: two strided convs,
    global average pooling, concatenated with a projection of the pooled text embedding and sinusoidal
    features of tau, then an MLP to a scalar. Last layer zero-initialised (starts at V = 0)."""

    def __init__(self, latent_channels: int = 4, text_dim: int = 768, width: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(latent_channels, width // 2, 3, 2, 1),
            nn.SiLU(),
            nn.Conv2d(width // 2, width, 3, 2, 1),
            nn.SiLU(),
        )
        self.text = nn.Linear(text_dim, width)
        self.mlp = nn.Sequential(nn.Linear(2 * width + 16, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, tau, y, cond=None):
        B = y.shape[0]
        h = self.conv(y.float()).mean(dim=(2, 3))
        txt = self.text(cond["text"].float()) if cond is not None and "text" in cond else torch.zeros_like(h)
        return self.mlp(torch.cat([h, txt, _time_features(tau, B).to(y.device)], 1)).squeeze(-1)


def tweedie_value(tau, y, cond):
    """:math:`V = r(\\hat x_0)` read from ``cond["tweedie"]`` (precomputed by :func:`tweedie_rewards`)."""
    return cond["tweedie"]


class _Tweedie(nn.Module):
    def forward(self, tau, y, cond):
        return cond["tweedie"]


@torch.no_grad()
def tweedie_rewards(env, latents: torch.Tensor, actions: torch.Tensor, reward, prompts: list[str],
                    decode_batch: int = 8) -> torch.Tensor:
    r""":math:`r(\mathrm{decode}(\hat x_0(t_k, x_k)))` for every recorded state ``k < K``: ``(K, B)``.

    ``actions`` ``(K, B, ...)`` define the prediction (``env.x0_hat``: Tweedie for UNets, :math:`x - t v` for
    flow models); pass the pretrained ``ref_actions`` for the design of theory.md R10. Costs K decodes and
    reward calls per path.
    """
    K, B = actions.shape[:2]
    out = torch.empty(K, B, device=latents.device)
    for k in range(K):
        x0 = env.x0_hat(k, latents[k], actions[k])
        for s in range(0, B, decode_batch):
            imgs = env.decode(x0[s : s + decode_batch].float())
            out[k, s : s + decode_batch] = reward(imgs, prompts[s : s + decode_batch]).float()
    return out


def make_value_model(kind: str, latent_channels: int, text_dim: int, width: int = 64) -> nn.Module | None:
    """``critic`` -> :class:`LatentCritic`; ``residual`` -> :class:`sa_theory.value.ResidualValue`
    (Tweedie + critic, T = 1); ``tweedie`` -> a parameter-free module; ``none`` -> None."""
    if kind == "critic":
        return LatentCritic(latent_channels, text_dim, width)
    if kind == "residual":
        return ResidualValue(_Tweedie(), LatentCritic(latent_channels, text_dim, width), T=1.0)
    if kind == "tweedie":
        return _Tweedie()
    if kind == "none":
        return None
    raise ValueError(f"value.kind: unknown value design {kind!r}; choose one of {VALUE_KINDS}")
