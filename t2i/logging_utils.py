"""Run logging: local JSONL and TensorBoard by default, wandb optional (import-guarded), PNG image grids."""

from __future__ import annotations

import json
import math
import os

import torch

from sa_theory.algorithms.checkpoint import rewrite_jsonl

__all__ = ["RunLogger", "image_grid", "save_png"]


def image_grid(images: torch.Tensor, ncols: int | None = None) -> torch.Tensor:
    """Tile ``(B, 3, H, W)`` images in [0, 1] into one ``(3, rows*H, cols*W)`` image."""
    B, C, H, W = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(B)))
    nrows = int(math.ceil(B / ncols))
    grid = torch.ones(C, nrows * H, ncols * W)
    for i in range(B):
        r, c = divmod(i, ncols)
        grid[:, r * H : (r + 1) * H, c * W : (c + 1) * W] = images[i].detach().float().cpu()
    return grid


def save_png(image: torch.Tensor, path: str) -> None:
    """Save a ``(3, H, W)`` image in [0, 1] as PNG (PIL)."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(arr).save(path)


class RunLogger:
    """``log(metrics, step)`` appends one JSON line to ``metrics.jsonl`` (and TensorBoard / wandb scalars).

    Only the main process writes (``enabled``). ``truncate(epoch)`` drops records with ``epoch >= epoch``
    (used on resume so a killed run's post-checkpoint records are not duplicated).
    """

    def __init__(
        self,
        output_dir: str,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "scores-as-actions",
        config: dict | None = None,
    ):
        self.dir, self.enabled = output_dir, enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError as err:
                raise ImportError(
                    "log.wandb=true needs the optional package 'wandb': pip install wandb"
                ) from err
            self.wandb = wb.init(project=wandb_project, config=config, dir=output_dir)

    def truncate(self, epoch: int) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        rewrite_jsonl(self.path, lambda r: r.get("epoch", -1) < epoch)

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def images(self, images: torch.Tensor, name: str) -> str | None:
        if not self.enabled:
            return None
        path = os.path.join(self.dir, "images", f"{name}.png")
        save_png(image_grid(images), path)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
