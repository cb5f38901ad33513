"""Digit rewards and metrics behind the ``t2i`` reward interface.

* :class:`DigitCNN` -- a small CNN on 8x8 grey images (two 3x3 convs, pooling, a 64-d feature layer, 10
  logits), trained on the **training split only** (real digits, small shifts and pixel noise as
  augmentation; never on generated images). Cached by config hash next to the diffusion model; the
  experiment's classifiers ship in ``digits/weights/`` (safetensors; used when the config hash matches).
* :class:`DigitProbReward` (registry name ``digit_prob``) -- the classifier's probability of the digit named
  in the prompt (``"a handwritten digit 7"`` -> p(7 | image)), in [0, 1]. Differentiable.
* ``jpeg_compress`` (t2i built-in) -- JPEG compressibility, usable as is on the (B, 3, H, W) images.
* Metrics: :func:`classifier_features`, :func:`frechet_distance` (classifier-feature Frechet distance,
  "FD"), :func:`accuracy`.

Images in, as everywhere in ``t2i``: ``(B, 3, H, W)`` in [0, 1]; they are averaged over channels and
area-resized to 8x8 before the classifier (so a 16x16 model is scored on the same footing).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2i.rewards import Reward

from .data import digit_of_prompt, load_split

__all__ = [
    "DigitCNN",
    "DigitProbReward",
    "train_classifier",
    "load_classifier",
    "classifier_path",
    "to_classifier_input",
    "classifier_features",
    "frechet_distance",
    "accuracy",
    "BoldReward",
    "classifier_hash",
    "shipped_classifier",
    "shipped_classifier_specs",
    "save_shipped_classifier",
]

CLF_CONFIG = {
    "width": 16,
    "feat": 64,
    "steps": 1500,
    "batch": 128,
    "lr": 3e-3,
    "shift": 1,
    "noise": 0.1,
    "format": 1,
    "target": "digit",
}


def bold_labels(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Style label "bold" (thick strokes): total ink above the median ink of the image's digit class."""
    ink = (x + 1).sum(dim=(1, 2, 3))
    out = torch.zeros_like(y)
    for k in range(10):
        m = y == k
        out[m] = (ink[m] > ink[m].median()).long()
    return out


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 1, 8, 8)`` in [-1, 1] (channel mean, area resize)."""
    x = images.float()
    if x.dim() == 3:
        x = x[:, None]
    x = x.mean(1, keepdim=True)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return x * 2 - 1


class DigitCNN(nn.Module):
    def __init__(self, width: int = 16, feat: int = 64, n_out: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feat),
            nn.ReLU(),
        )
        self.head = nn.Linear(feat, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """64-d penultimate features of ``(B, 1, 8, 8)`` inputs in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _augment(x: torch.Tensor, g: torch.Generator, shift: int, noise: float) -> torch.Tensor:
    if shift:
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
        x = torch.roll(x, (dy, dx), (2, 3))
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def classifier_hash(seed: int = 0, cfg: dict | None = None) -> str:
    """First 16 hex digits of the SHA-256 of ``{**CLF_CONFIG, **cfg, "seed": seed}`` (sorted JSON)."""
    c = {**CLF_CONFIG, **(cfg or {}), "seed": seed}
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def classifier_path(cache_root: str, seed: int = 0, cfg: dict | None = None) -> str:
    return os.path.join(cache_root, f"classifier-{classifier_hash(seed, cfg)}.pt")


def shipped_classifier_specs() -> list[tuple[int, dict]]:
    """``(seed, cfg)`` of the shipped classifiers: reward classifiers (seed 0, targets digit and bold) and the
    evaluation classifier (seed 1), at the default and the ``QUICK`` experiment's ``classifier_steps``."""
    from .experiment import QUICK, ExperimentConfig

    steps = sorted({ExperimentConfig().classifier_steps, QUICK().classifier_steps})
    return [(seed, {"steps": n, "target": t}) for n in steps for seed, t in ((0, "digit"), (0, "bold"), (1, "digit"))]


def save_shipped_classifier(model: DigitCNN, info: dict, weights_dir: str) -> tuple[str, str]:
    """Write ``classifiers/classifier-<hash>.safetensors`` (``info`` as JSON metadata); (hash, relative path)."""
    from safetensors.torch import save_file

    h = classifier_hash(info["seed"], {k: info[k] for k in CLF_CONFIG})
    rel = f"classifiers/classifier-{h}.safetensors"
    os.makedirs(os.path.join(weights_dir, "classifiers"), exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(weights_dir, rel), metadata={"info": json.dumps(info, sort_keys=True)})
    return h, rel


def shipped_classifier(seed: int = 0, cfg: dict | None = None, weights_dir: str | None = None):
    """``(model, info)`` of the shipped classifier with this seed and config hash, or ``None`` (none shipped,
    or its file fails the SHA-256 recorded in the manifest, then with a warning)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .pretrain import WEIGHTS_DIR, read_manifest, sha256_file

    wd = weights_dir or WEIGHTS_DIR
    entry = read_manifest(wd)["classifiers"].get(classifier_hash(seed, cfg))
    if entry is None:
        return None
    path = os.path.join(wd, entry["file"])
    if not os.path.isfile(path) or sha256_file(path) != entry["sha256"]:
        warnings.warn(f"shipped classifier {path} fails its SHA-256 check; training instead", stacklevel=2)
        return None
    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["info"])
    model = DigitCNN(info["width"], info["feat"], 10 if info["target"] == "digit" else 2)
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False), info


def train_classifier(seed: int = 0, cfg: dict | None = None) -> tuple[DigitCNN, dict]:
    """Train :class:`DigitCNN` on the training split; returns the model and an info dict."""
    c = {**CLF_CONFIG, **(cfg or {})}
    x, y = load_split("train", 8)
    n_out = 10 if c["target"] == "digit" else 2
    if c["target"] == "bold":
        y = bold_labels(x, y)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitCNN(c["width"], c["feat"], n_out)
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, c["steps"])
    t0 = time.time()
    for _ in range(c["steps"]):
        idx = torch.randint(len(x), (c["batch"],), generator=g)
        loss = F.cross_entropy(model(_augment(x[idx], g, c["shift"], c["noise"])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    xt, yt = load_split("test", 8)
    if c["target"] == "bold":
        yt = bold_labels(xt, yt)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return model, {"test_accuracy": acc, "time_s": time.time() - t0, "seed": seed, **c}


def load_classifier(cache_root: str, seed: int = 0, cfg: dict | None = None) -> tuple[DigitCNN, dict]:
    """Cached classifier and its info dict (path hashed from its config and seed). On a cache miss the shipped
    classifier with the same hash (``digits/weights``, :func:`shipped_classifier`) is used, else one is
    trained; either way it is written to the cache (``.pt``, the file ``reward.weights_path`` points to)."""
    path = classifier_path(cache_root, seed, cfg)
    if os.path.isfile(path):
        blob = torch.load(path, weights_only=True)
        info = json.loads(blob["info"])
        model = DigitCNN(info["width"], info["feat"], 10 if info.get("target", "digit") == "digit" else 2)
        model.load_state_dict(blob["state_dict"])
        return model.eval().requires_grad_(False), info
    model, info = shipped_classifier(seed, cfg) or train_classifier(seed, cfg)
    os.makedirs(cache_root, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"state_dict": model.state_dict(), "info": json.dumps(info)}, tmp)
    os.replace(tmp, path)
    return model, info


def _load_file(path: str) -> DigitCNN:
    blob = torch.load(path, weights_only=True)
    info = json.loads(blob["info"])
    model = DigitCNN(info["width"], info["feat"], 10 if info.get("target", "digit") == "digit" else 2)
    model.load_state_dict(blob["state_dict"])
    return model


class _ClassifierReward(Reward, nn.Module):
    """A reward read off a frozen :class:`DigitCNN`, given as a module or loaded from ``weights_path``."""

    def __init__(self, weights_path: str | None = None, model: DigitCNN | None = None):
        nn.Module.__init__(self)
        if model is None:
            if weights_path is None or not os.path.isfile(weights_path):
                raise ValueError(
                    f"reward {self.name!r} needs reward.weights_path (a classifier .pt), got {weights_path!r}"
                )
            model = _load_file(weights_path)
        self.model = model.eval().requires_grad_(False)


class BoldReward(_ClassifierReward):
    """``digit_bold``: p(thick strokes | image) from a 2-class :class:`DigitCNN` trained on the training
    split with :func:`bold_labels` (a style property; the prompt is not used)."""

    name, differentiable = "digit_bold", True

    def __call__(self, images, prompts):
        return F.softmax(self.model(to_classifier_input(images)), 1)[:, 1]


class DigitProbReward(_ClassifierReward):
    """``digit_prob``: p(prompted digit | image) from a :class:`DigitCNN` (``weights_path``: its ``.pt``)."""

    name, differentiable = "digit_prob", True

    def __call__(self, images, prompts):
        target = torch.tensor([digit_of_prompt(p) for p in prompts], device=images.device)
        logp = F.log_softmax(self.model(to_classifier_input(images)), 1)
        return logp.gather(1, target[:, None]).squeeze(1).exp()


# --------------------------------------------------------------------------- metrics
@torch.no_grad()
def classifier_features(model: DigitCNN, images: torch.Tensor) -> torch.Tensor:
    return model.features(to_classifier_input(images))


@torch.no_grad()
def accuracy(model: DigitCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(to_classifier_input(images)).argmax(1) == labels.to(images.device)).float().mean())


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    r"""Frechet distance between Gaussians fitted to two feature sets ``(N, d)`` (FID formula, squared feature units):
    :math:`|m_1 - m_2|^2 + \mathrm{tr}(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`. With fewer samples than dimensions (the
    digits evaluation: 60 images, 64 features) the covariances are singular; scipy's "matrix is singular" warning
    is then expected on every call and silenced (the square root stays accurate; tested against an eigenvalue
    formula)."""
    from scipy import linalg

    a, b = f1.double().cpu().numpy(), f2.double().cpu().numpy()
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = np.real(linalg.sqrtm(s1 @ s2))  # (no ``disp``: deprecated in scipy 1.17, removed in 1.18)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
