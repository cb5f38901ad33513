"""Shared fixtures for the t2i tests: CPU, offline, one thread (2-thread BLAS under load is ~40x slower
here)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def tiny_config(tmp_path, method="sa_ac", **over):
    from t2i.config import apply_overrides, get_preset

    cfg = get_preset("tiny_cpu")
    cfg.train.method = method
    cfg.log.output_dir = str(tmp_path / f"run_{method}")
    cfg.log.tensorboard = False
    cfg.log.image_every = 0
    if method == "ddpo_is":
        cfg.value.kind = "none"
    apply_overrides(cfg, {k: str(v) for k, v in over.items()})
    return cfg


@pytest.fixture(scope="session")
def tiny_pipe():
    from t2i.models import add_lora, build_tiny_pipeline

    torch.manual_seed(0)
    pipe = build_tiny_pipeline(0)
    add_lora(pipe.unet, 4, init_seed=0)
    return pipe
