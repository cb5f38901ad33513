"""Worker for the 2-process accelerate test: train, checkpoint, resume, and write each rank's LoRA hash."""

import json
import os
import sys

import torch

torch.set_num_threads(1)

from t2i.config import apply_overrides, get_preset  # noqa: E402
from t2i.models import denoiser  # noqa: E402
from t2i.trainer import lora_hash, make_trainer  # noqa: E402
from tests.t2i.conftest import end_worker  # noqa: E402  (PYTHONPATH: the repository root)


def main(out_dir: str, phase: str, preset: str = "tiny_cpu") -> None:
    cfg = get_preset(preset)
    apply_overrides(
        cfg,
        {
            "sample.num_steps": "2",
            "sample.batch_size": "2",
            "train.batch_size": "1",
            "train.gradient_accumulation_steps": "2",
            "train.num_epochs": "1" if phase == "a" else "2",
            "log.tensorboard": "false",
            "log.image_every": "0",
            "train.per_prompt_norm": "true",
            "log.output_dir": out_dir,
        },
    )
    if phase == "b":
        cfg.resume_from = "auto"
    tr = make_trainer(cfg)
    tr.train()
    rank = tr.acc.process_index
    with open(os.path.join(out_dir, f"hash_{phase}_{rank}.json"), "w") as f:
        json.dump(
            {
                "rank": rank,
                "world": tr.acc.num_processes,
                "epoch": tr.state.epoch,
                "lora": lora_hash(denoiser(tr.pipe)),
            },
            f,
        )
    end_worker(tr.acc)


if __name__ == "__main__":
    main(*sys.argv[1:])
