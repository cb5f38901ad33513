"""Run folders and checkpoints of the image trainer: finding, verifying and loading them; guarding a run folder.

A run folder (``log.output_dir``) holds ``metrics.jsonl``, ``summary.json``, ``images/``, ``tensorboard/`` and
``checkpoints/checkpoint-EEEEEE/`` folders with a ``checkpoints/latest`` pointer: the one checkpoint layout of
:mod:`sa_theory.algorithms.checkpoint` (the toys' too), with checksums, rotation and
:func:`resolve_intact_checkpoint` falling back to the newest intact folder when ``latest`` is damaged.
:func:`guard_run_dir` refuses to start a fresh run over an existing one unless ``log.overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from sa_theory.algorithms import checkpoint as ckpt_folders
from sa_theory.algorithms.checkpoint import atomic_write_text, commit_checkpoint, resolve_checkpoint
from sa_theory.algorithms.config import resume_changes

from .config import RESUME_MUTABLE, Config, config_to_dict
from .flow_models import build_tiny_sd3_pipeline, is_pixel_sd3_pipeline, load_pixel_sd3_pipeline, load_sd3_pipeline
from .models import (
    PixelPipeline,
    PixelSpaceVAE,
    add_lora,
    build_tiny_pipeline,
    denoiser,
    load_pipeline,
    lora_state_dict,
    lora_targets,
)

__all__ = ["resolve_checkpoint", "resolve_intact_checkpoint", "has_checkpoint", "guard_run_dir", "lora_hash",
           "build_pipeline", "load_policy_from_checkpoint", "RUN_ENTRIES", "CheckpointMixin"]

#: what a run writes into its folder (all that ``log.overwrite`` removes)
RUN_ENTRIES = ("metrics.jsonl", "summary.json", "checkpoints", "images", "tensorboard")


def lora_hash(unet) -> str:
    """SHA-256 of the LoRA weights (sorted keys, float32 bytes): equal on all ranks iff weights are equal."""
    h = hashlib.sha256()
    for k, v in sorted(lora_state_dict(unet).items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


#: the files every image checkpoint folder must hold (besides what its checksums list)
REQUIRED = ("trainer_state.json", "config.json", "lora_peft.safetensors")


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir/checkpoints`` holds a ``latest`` pointer or any checkpoint folder."""
    return ckpt_folders.has_checkpoint(os.path.join(run_dir, "checkpoints"))


def resolve_intact_checkpoint(path: str) -> tuple[str, list[str]]:
    """``(folder, notes)``: :func:`sa_theory.algorithms.checkpoint.resolve_intact_checkpoint` for image checkpoints
    (the LoRA, the trainer state and the config required)."""
    return ckpt_folders.resolve_intact_checkpoint(path, REQUIRED)


def guard_run_dir(cfg: Config, resuming: bool, is_main: bool) -> None:
    """Before a fresh run (``resuming`` False): refuse an output folder that already holds a run (naming it and
    what is there) unless ``log.overwrite``, in which case the main process removes :data:`RUN_ENTRIES`."""
    out = cfg.log.output_dir
    if resuming or not os.path.isdir(out):
        return
    metrics = os.path.join(out, "metrics.jsonl")
    found = [e for e in RUN_ENTRIES if os.path.exists(os.path.join(out, e))
             and not (e == "metrics.jsonl" and os.path.getsize(metrics) == 0)
             and not (os.path.isdir(os.path.join(out, e)) and not os.listdir(os.path.join(out, e)))]
    if not found:
        return
    if not cfg.log.overwrite:
        hint = " (it has no checkpoint to resume from)" if not has_checkpoint(out) else \
            "; resume it with resume_from='auto' (CLI: --resume_from auto)"
        raise FileExistsError(f"log.output_dir: {out!r} already holds a run ({', '.join(found)}){hint}; choose "
                              f"another folder, or set log.overwrite=true to replace it")
    if is_main:
        for e in found:
            p = os.path.join(out, e)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def build_pipeline(cfg: Config, device, weight_dtype=torch.float32):
    if cfg.model.pretrained == "tiny":
        pipe = build_tiny_pipeline(cfg.model.tiny_seed)
    elif cfg.model.pretrained == "tiny_pixel":  # tiny UNet/text encoder, identity VAE (images respond)
        t = build_tiny_pipeline(cfg.model.tiny_seed)
        pipe = PixelPipeline(t.unet, t.text_encoder, t.tokenizer, t.scheduler)
    elif cfg.model.pretrained in ("tiny_sd3", "tiny_sd3_pixel"):
        pipe = build_tiny_sd3_pipeline(cfg.model.tiny_seed)
        if cfg.model.pretrained == "tiny_sd3_pixel":  # identity VAE: images respond to the latents
            pipe.vae = PixelSpaceVAE(pipe.transformer.config.in_channels, 3)
    elif cfg.model.family == "sd3" and is_pixel_sd3_pipeline(cfg.model.pretrained):  # pixel SD3 (digits flow)
        pipe = load_pixel_sd3_pipeline(cfg.model.pretrained)
    elif cfg.model.family == "sd3":
        pipe = load_sd3_pipeline(cfg.model.pretrained, cfg.model.revision, weight_dtype)
    else:
        pipe = load_pipeline(cfg.model.pretrained, cfg.model.revision)
    names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")
    for m in (getattr(pipe, n, None) for n in names):
        if m is not None:
            m.requires_grad_(False)
            m.to(device, dtype=weight_dtype)
    return pipe


def load_policy_from_checkpoint(checkpoint: str, device="cpu", overrides: dict | None = None):
    """Rebuild ``(cfg, pipe)`` from a checkpoint folder (or run dir: its newest intact one) with its LoRA (fp32)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .config import apply_overrides, config_from_dict

    ckpt, notes = resolve_intact_checkpoint(checkpoint)
    for n in notes:
        print(n)
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = config_from_dict(json.load(f))
    cfg.resume_from = None
    if overrides:
        apply_overrides(cfg, overrides)
    torch.manual_seed(cfg.train.seed)
    pipe = build_pipeline(cfg, device)
    net = denoiser(pipe)
    add_lora(net, cfg.model.lora_rank, cfg.model.lora_alpha, targets=lora_targets(pipe), init_seed=cfg.train.seed)
    set_peft_model_state_dict(net, load_file(os.path.join(ckpt, "lora_peft.safetensors")))
    net.eval()
    return cfg, pipe


class CheckpointMixin:
    """The :class:`~t2i.task.ImageTask`'s checkpoint side: accelerate save/load hooks, checksummed
    checkpoint folders written by every rank, the checked resume target, and the end-of-run summary."""

    def _check_resume_target(self, cfg: Config) -> tuple[str | None, list[str]]:
        """The intact checkpoint to resume from (None: fresh run) and notes, after checking that its config
        matches ``cfg`` (``ValueError`` naming the differing fields; allowed changes are printed)."""
        path = cfg.resume_from
        if not path or (path == "auto" and not has_checkpoint(cfg.log.output_dir)):
            return None, []
        ckpt, notes = resolve_intact_checkpoint(cfg.log.output_dir if path == "auto" else path)
        with open(os.path.join(ckpt, "config.json")) as f:
            saved = json.load(f)
        changes = resume_changes(saved, config_to_dict(cfg), RESUME_MUTABLE)
        notes += [f"resume: {k} changed from {a!r} to {b!r} (applied)" for k, (a, b) in sorted(changes.items())
                  if k != "resume_from"]
        return ckpt, notes

    # ------------------------------------------------------------------ checkpoint hooks
    def _save_hook(self, models, weights, output_dir):
        from .distributed import save_lora_files

        # every rank: under FSDP2 the LoRA / value shards are gathered (collective); the main process writes
        save_lora_files(denoiser(self.pipe), self.value if self.learned_value else None, output_dir,
                        self.acc.is_main_process)
        weights.clear()  # accelerate saves no model weights of its own (under FSDP it saves the sharded model)

    def _load_hook(self, models, input_dir):
        from .distributed import load_lora_files

        load_lora_files(denoiser(self.pipe), self.value if self.learned_value else None, input_dir)
        models.clear()

    def save_checkpoint(self) -> str:
        """All ranks call this. Writes ``checkpoint-EEEEEE`` atomically and updates ``latest``."""
        acc = self.acc
        name = f"checkpoint-{self.state.epoch:06d}"
        tmp = os.path.join(self.ckpt_root, f".tmp-{name}")
        if acc.is_main_process:
            os.makedirs(self.ckpt_root, exist_ok=True)
            tmp, name = ckpt_folders.new_checkpoint_folder(self.ckpt_root, self.state.epoch)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        final = os.path.join(self.ckpt_root, name)
        if acc.is_main_process:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config_to_dict(self.cfg), f, indent=1)
            atomic_write_text(
                os.path.join(tmp, "trainer_state.json"),
                json.dumps({"epoch": self.state.epoch, "global_step": self.state.global_step}),
            )
            commit_checkpoint(tmp, name, self.cfg.log.keep_last)
        acc.wait_for_everyone()
        return final

    def resume(self, ckpt: str) -> None:
        """Load the checkpoint folder ``ckpt`` (verified by :meth:`_check_resume_target`) on every rank."""
        self.acc.load_state(ckpt)
        self.logger.truncate(self.state.epoch)
        self.acc.print(f"resumed from {ckpt} at epoch {self.state.epoch}, step {self.state.global_step}")

    def summary(self) -> dict:
        """The last epoch's reward and path KL (means, standard errors) and where the outputs are."""
        out = self.cfg.log.output_dir
        last = self.history[-1] if self.history else {}
        if not last and os.path.isfile(self.logger.path):  # resumed at the end: read the log
            with open(self.logger.path) as f:
                recs = [json.loads(ln) for ln in f if ln.strip()]
            last = recs[-1] if recs else {}
        keys = ("epoch", "reward_mean", "reward_se", "path_kl_mean", "path_kl_se", "path_kl_ct_mean", "path_kl_ct_se")
        try:
            ckpt = resolve_checkpoint(out)
        except FileNotFoundError:
            ckpt = None
        return {"epochs": self.state.epoch, **{k: last[k] for k in keys if k in last}, "output_dir": out,
                "metrics": self.logger.path, "checkpoint": ckpt,
                "images": os.path.join(out, "images") if os.path.isdir(os.path.join(out, "images")) else None}
