"""Rewards behind one interface and a registry.

Reward statistics (per-prompt normalisation, Flow-GRPO groups, diversity) live in :mod:`t2i.reward_stats`.
A reward is ``reward(images, prompts) -> (B,)`` float tensor with ``images`` float ``(B, 3, H, W)`` in
``[0, 1]`` and ``prompts`` a list of B strings, plus an attribute ``differentiable`` (True when gradients
flow from the reward to the images). Build one by name with :func:`make_reward`:

==================  ===================================================================  ==============
name                what                                                                  differentiable
==================  ===================================================================  ==============
``jpeg_compress``   minus the JPEG size in kB (PIL, quality 95): higher = more compressible  no
``jpeg_incompress`` the JPEG size in kB                                                  no
``brightness``      mean pixel value in [0, 1] (a cheap test/demo reward)                yes
``left_right_contrast`` left-half minus right-half mean intensity (spatial test reward)   yes
``aesthetic``       linear/MLP head on CLIP image embeddings (LAION-aesthetic style);     yes
                    needs ``clip_path`` (CLIPModel folder) and ``weights_path`` (head)
``clip_score``      cosine(CLIP image emb, CLIP text emb) x 100; needs ``clip_path``      yes
``imagereward``     ImageReward (optional ``image-reward`` package)                       no
``hpsv2``           HPSv2 (optional ``hpsv2`` package)                                    no
``pickscore``       PickScore (CLIP-H folder + processor at ``clip_path``)                yes
==================  ===================================================================  ==============

Other packages register their rewards without this module knowing them: an entry point in the group
``sa_t2i.rewards`` (``digits`` registers ``digit_prob`` and ``digit_bold`` in ``pyproject.toml``), a
``"package.module:Factory"`` name, or :func:`register_reward` at run time.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "Reward",
    "REWARDS",
    "make_reward",
    "register_reward",
    "resolve_reward",
    "available_rewards",
    "ENTRY_POINT_GROUP",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Brightness",
    "AestheticScore",
    "ClipScore",
    "MissingPackageError",
]


class MissingPackageError(ImportError):
    """An optional package needed by a reward is not installed (the message names the pip package)."""


def _require(module: str, pip_name: str, reward: str):
    try:
        return __import__(module)
    except Exception as err:  # ImportError, or a package that fails to import on this stack
        raise MissingPackageError(
            f"reward {reward!r} needs the optional package '{pip_name}': "
            f"pip install {pip_name}  (import of {module!r} failed: {err})"
        ) from err


class Reward:
    """Base class: ``__call__(images (B,3,H,W) in [0,1], prompts list[str]) -> (B,)``; ``differentiable``."""

    name: str = "reward"
    differentiable: bool = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def to(self, device):
        if isinstance(self, nn.Module):
            nn.Module.to(self, device)
        return self


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return x.permute(0, 2, 3, 1).numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size of each image in kB (PIL encoder)."""
    from PIL import Image

    sizes = []
    for arr in _to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(Reward):
    """``-size_kB`` of the JPEG encoding (DDPO's compressibility reward). Not differentiable."""

    name, differentiable = "jpeg_compress", False

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images, prompts):
        return -jpeg_size_kb(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """``+size_kB`` of the JPEG encoding. Not differentiable."""

    name = "jpeg_incompress"

    def __call__(self, images, prompts):
        return jpeg_size_kb(images, self.quality)


class Brightness(Reward):
    """Mean pixel value in [0, 1] (differentiable; a demo / test reward the tiny model moves quickly)."""

    name, differentiable = "brightness", True

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


class LeftRightContrast(Reward):
    """Mean intensity of the left half minus the right half, in [-1, 1] (differentiable).

    A spatial test reward: unlike a global brightness shift, which the GroupNorm layers of a small random
    VAE decoder normalise away, a left/right pattern in the latents survives decoding, so even the tiny
    random pipeline can move this reward.
    """

    name, differentiable = "left_right_contrast", True

    def __call__(self, images, prompts):
        w = images.shape[-1] // 2
        x = images.float()
        return x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3))


def _load_clip(clip_path: str | None, reward: str):
    if not clip_path:
        raise ValueError(f"reward {reward!r} needs 'reward.clip_path' (a local CLIPModel folder)")
    if not os.path.isdir(clip_path):
        raise FileNotFoundError(f"reward.clip_path {clip_path!r} for reward {reward!r} does not exist")
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_path, local_files_only=True).eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(clip_path, local_files_only=True)
    return model, tok


def _clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable CLIP preprocessing: bicubic resize to ``size`` and OpenAI CLIP normalisation."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=images.device).view(1, 3, 1, 1)
    x = nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    return (x - mean) / std


def _image_embeds(model, images: torch.Tensor) -> torch.Tensor:
    size = model.config.vision_config.image_size
    out = model.get_image_features(pixel_values=_clip_preprocess(images, size).to(model.dtype))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return out / out.norm(dim=-1, keepdim=True)


class AestheticScore(nn.Module, Reward):
    """LAION-aesthetic-style head on normalised CLIP image embeddings.

    ``weights_path``: a ``.safetensors`` or ``.pt`` state dict of either a linear head (``weight``/``bias``,
    shape ``(1, D)``) or the LAION MLP (``layers.{0,2,4,6,7}.*``: D-1024-128-64-16-1). Differentiable.
    """

    name, differentiable = "aesthetic", True

    def __init__(self, clip_path: str | None, weights_path: str | None):
        nn.Module.__init__(self)
        if not weights_path:
            raise ValueError("reward 'aesthetic' needs 'reward.weights_path' (the head's state dict)")
        if not os.path.exists(weights_path):
            raise FileNotFoundError(
                f"reward.weights_path {weights_path!r} for reward 'aesthetic' does not exist"
            )
        self.clip, _ = _load_clip(clip_path, "aesthetic")
        sd = _load_state(weights_path)
        D = self.clip.config.projection_dim
        if "weight" in sd:
            self.head = nn.Linear(D, 1)
        else:
            self.head = nn.Sequential(
                nn.Linear(D, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )
            sd = {k.removeprefix("layers."): v for k, v in sd.items()}
        self.head.load_state_dict(sd)
        self.requires_grad_(False).eval()

    def __call__(self, images, prompts):
        return self.head(_image_embeds(self.clip, images).float()).squeeze(-1)


def _load_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class ClipScore(nn.Module, Reward):
    """Prompt alignment: ``100 * cos(CLIP image embedding, CLIP text embedding)``. Differentiable."""

    name, differentiable = "clip_score", True

    def __init__(self, clip_path: str | None):
        nn.Module.__init__(self)
        self.clip, self.tokenizer = _load_clip(clip_path, self.name)

    def __call__(self, images, prompts):
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(
            images.device
        )
        t = self.clip.get_text_features(**tok)
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        t = t / t.norm(dim=-1, keepdim=True)
        return 100.0 * (_image_embeds(self.clip, images) * t).sum(-1)


class PickScore(ClipScore):
    """PickScore (Kirstain et al.): a CLIP-H model at ``clip_path`` (e.g. a local copy of
    ``yuvalkirstain/PickScore_v1``), score = ``logit_scale * cos``."""

    name = "pickscore"

    def __call__(self, images, prompts):
        return super().__call__(images, prompts) / 100.0 * self.clip.logit_scale.exp()


class ImageRewardWrapper(Reward):
    """ImageReward via the optional ``image-reward`` package (which does not import under transformers 5)."""

    name, differentiable = "imagereward", False

    def __init__(self, weights_path: str | None = None):
        rm = _require("ImageReward", "image-reward", self.name)
        self.model = rm.load(weights_path or "ImageReward-v1.0")

    def __call__(self, images, prompts):
        from PIL import Image

        pils = [Image.fromarray(a) for a in _to_uint8(images)]
        return torch.tensor(
            [float(self.model.score(p, im)) for p, im in zip(prompts, pils)], device=images.device
        )


class HPSv2Wrapper(Reward):
    """HPSv2 via the optional ``hpsv2`` package."""

    name, differentiable = "hpsv2", False

    def __init__(self):
        self.hps = _require("hpsv2", "hpsv2", self.name)

    def __call__(self, images, prompts):
        from PIL import Image

        pils = [Image.fromarray(a) for a in _to_uint8(images)]
        return torch.tensor(
            [float(self.hps.score(im, p)[0]) for p, im in zip(prompts, pils)], device=images.device
        )


REWARDS: dict[str, Callable[..., Reward]] = {
    "jpeg_compress": lambda **kw: JpegCompressibility(),
    "jpeg_incompress": lambda **kw: JpegIncompressibility(),
    "brightness": lambda **kw: Brightness(),
    "left_right_contrast": lambda **kw: LeftRightContrast(),
    "aesthetic": lambda clip_path=None, weights_path=None, **kw: AestheticScore(clip_path, weights_path),
    "clip_score": lambda clip_path=None, **kw: ClipScore(clip_path),
    "pickscore": lambda clip_path=None, **kw: PickScore(clip_path),
    "imagereward": lambda weights_path=None, **kw: ImageRewardWrapper(weights_path),
    "hpsv2": lambda **kw: HPSv2Wrapper(),
}

#: entry-point group through which other packages register rewards (``name = "module:Factory"``)
ENTRY_POINT_GROUP = "sa_t2i.rewards"


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_rewards() -> list[str]:
    """Names :func:`make_reward` accepts: the built-ins, runtime registrations and installed entry points
    (plus any ``"module:Factory"`` string)."""
    return sorted(set(REWARDS) | set(_entry_points()))


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    """Add a reward factory ``factory(clip_path=..., weights_path=...) -> Reward`` to the registry at run time."""
    REWARDS[name] = factory


def resolve_reward(name: str) -> Callable[..., Reward]:
    """The factory behind ``name``: a registry name, an entry point of group :data:`ENTRY_POINT_GROUP`
    (packages such as ``digits`` register theirs in ``pyproject.toml``), or ``"package.module:Factory"``.
    Unknown names raise ``KeyError`` listing the known ones."""
    if name in REWARDS:
        return REWARDS[name]
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise KeyError(f"reward {name!r}: cannot import {attr!r} from module {module!r} ({err})") from err
    raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())} "
                   "(or give 'package.module:Factory')")


def make_reward(name: str, clip_path: str | None = None, weights_path: str | None = None) -> Reward:
    """Build a reward by name (see :func:`resolve_reward`). The factory receives ``clip_path`` and
    ``weights_path`` as keywords when its signature accepts them."""
    import inspect

    factory = resolve_reward(name)
    kwargs = {"clip_path": clip_path, "weights_path": weights_path}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return factory(**kwargs)
