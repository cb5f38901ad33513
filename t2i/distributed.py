"""Multi-process training: DDP (accelerate's default, unchanged) and FSDP2 for denoisers that do not fit one GPU.

Launch with ``accelerate launch --config_file configs/accelerate_fsdp.yaml ...``: accelerate shards the denoiser
with ``torch.distributed.fsdp.fully_shard`` (FSDP2), one unit per transformer block. Only FSDP2
(``fsdp_version: 2``) fits this trainer: FSDP2 shards the module *in place*, so the pipeline's own reference to it
(``pipe.transformer``, through which the sampler and the pretrained-model context call it) all-gathers on every
call; FSDP1 wraps it and leaves that reference holding flat shards (a call fails), so it is refused here.

:class:`T2IAccelerator` is accelerate's ``Accelerator`` with four adaptations, all no-ops without FSDP:

* on a CPU-only machine accelerate silently replaces FSDP by DDP (its state only promotes multi-GPU runs to FSDP);
  here a run launched with FSDP is promoted on CPU as well (torch's FSDP2 runs on gloo), so the FSDP path is
  tested on CPU exactly as it runs on GPUs;
* accelerate's FSDP2 prepares one model per ``prepare`` call; the trainer prepares the policy and a learned value
  model together, so several models are sharded as one container (each its own FSDP unit, each called directly);
* the transformer-block classes to wrap (``fsdp_transformer_layer_cls_to_wrap``) are kept to those present in the
  model, so one config serves SD3 (``JointTransformerBlock``) and UNet (``BasicTransformerBlock``) pipelines;
* FSDP casts no dtypes: parameters keep the trainer's dtypes (frozen weights in ``model.mixed_precision``, LoRA
  and value model in float32, whose gradients are reduced in float32) and autocast governs compute, as under DDP.

Under FSDP2 the LoRA (and value) parameters are ``DTensor`` shards: :func:`full_lora_state_dict`,
:func:`save_lora_files` and :func:`load_lora_files` gather / scatter them (gathering is collective: **every** rank
calls them, as every rank calls ``accelerator.save_state``). accelerate's FSDP ``save_state`` also writes the
sharded model (``pytorch_model_fsdp_0/``) and optimizer (``optimizer_0/``) with ``torch.distributed.checkpoint``;
``load_state`` reads them back (the LoRA files are re-applied by the load hook).
"""

from __future__ import annotations

import hashlib
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import FSDPModule

__all__ = ["FSDP_WRAP_CLASSES", "T2IAccelerator", "make_accelerator", "fsdp_requested", "is_fsdp", "pipeline_device",
           "place_pipeline", "full_state_dict", "full_lora_state_dict", "full_lora_hash", "save_lora_files",
           "load_lora_files", "load_into"]

#: transformer-block classes of the supported denoisers (SD3 transformer, SD UNet); the FSDP wrap units
FSDP_WRAP_CLASSES = ("JointTransformerBlock", "BasicTransformerBlock")


def fsdp_requested() -> bool:
    """Whether this process was launched with FSDP (``accelerate launch`` with an FSDP config or ``--use_fsdp``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(acc) -> bool:
    """Whether ``acc`` runs FSDP (its models are sharded)."""
    return acc.distributed_type == DistributedType.FSDP


def _keep_dtypes(plugin) -> None:
    """No FSDP dtype casting (``MixedPrecisionPolicy()``): every parameter is all-gathered in its own dtype (the
    frozen weights in ``model.mixed_precision``, the LoRA and value model in float32), gradients are reduced in
    float32 and ``accelerator.autocast()`` governs the compute -- as under DDP. (accelerate's FSDP mixed precision
    would cast the value model to bfloat16, whose float32 inputs then fail.)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy()


def _require_fsdp2(version: int) -> None:
    if version != 2:
        raise ValueError(
            f"FSDP version {version}: this trainer needs FSDP2 (fsdp_version: 2 in the accelerate config, or "
            "--fsdp_version 2): FSDP1 wraps the denoiser and leaves the pipeline's own reference to it (through "
            "which the sampler calls it) holding flat parameter shards")


class _Models(nn.Module):
    """Several models as one (accelerate's FSDP2 prepares one per call). Never called: each part is its own FSDP
    unit and is called directly (the first call of each makes it the root of its own subtree)."""

    def __init__(self, models):
        super().__init__()
        self.parts = nn.ModuleList(models)

    def forward(self, *args, **kwargs):  # pragma: no cover - guard
        raise RuntimeError("call the prepared models, not their FSDP container")


class T2IAccelerator(Accelerator):
    """``accelerate.Accelerator`` that runs FSDP2 on CPU too, prepares several models under FSDP2 and keeps the wrap
    classes to those present (see the module docstring). Identical to ``Accelerator`` without FSDP."""

    def __init__(self, *args, **kwargs):
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None and fsdp_requested():  # checked first: accelerate's FSDP1 plugin needs a GPU to exist
            _require_fsdp2(int(os.environ.get("FSDP_VERSION", "1")))
            plugin = kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
        if plugin is not None:
            _require_fsdp2(plugin.fsdp_version)
        super().__init__(*args, **kwargs)
        state = self.state
        if plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate drops FSDP on CPU; promote it the way AcceleratorState promotes MULTI_GPU (both states)
            state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = plugin
        if is_fsdp(self):
            _keep_dtypes(state.fsdp_plugin)

    def prepare(self, *args, device_placement=None):
        models = [a for a in args if isinstance(a, nn.Module)]
        if not (is_fsdp(self) and self.is_fsdp2 and models):
            return super().prepare(*args, device_placement=device_placement)
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = self.state.fsdp_plugin
        transformer_wrap = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy) is \
            transformer_auto_wrap_policy
        if transformer_wrap:  # keep the configured block classes that this model has
            present = {type(m).__name__ for model in models for m in model.modules()}
            names = plugin.transformer_cls_names_to_wrap or list(getattr(models[0], "_no_split_modules", None) or [])
            keep = [n for n in names if n in present]
            if names and not keep:
                raise ValueError(f"fsdp_transformer_layer_cls_to_wrap: none of {names} is in the model (its "
                                 f"transformer-block classes: {sorted(present & set(FSDP_WRAP_CLASSES))})")
            plugin.transformer_cls_names_to_wrap = keep
            plugin.auto_wrap_policy = transformer_auto_wrap_policy  # accelerate resolves the classes per model
        if len(models) <= 1:
            return super().prepare(*args, device_placement=device_placement)
        if not transformer_wrap:
            raise ValueError("FSDP with several models (the policy and a learned value model) needs "
                             "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP")
        # every model becomes its own FSDP unit (after its blocks); the container itself holds no parameters
        plugin.transformer_cls_names_to_wrap += [n for n in dict.fromkeys(type(m).__name__ for m in models)
                                                 if n not in plugin.transformer_cls_names_to_wrap]
        joint = _Models(models)
        others = iter(super().prepare(joint, *[a for a in args if not isinstance(a, nn.Module)],
                                      device_placement=device_placement))
        if next(others) is not joint or any(not isinstance(m, FSDPModule) for m in models):
            raise RuntimeError("FSDP2 did not shard the models in place")
        return tuple(a if isinstance(a, nn.Module) else next(others) for a in args)  # models: sharded in place


def make_accelerator(cfg):
    """The trainer's accelerator: as ``Trainer.__init__`` builds it (``cpu=True`` without CUDA, so a multi-process
    CPU launch is MULTI_CPU/gloo), as a :class:`T2IAccelerator` (FSDP2 when launched with FSDP, also on CPU)."""
    from accelerate.utils import ProjectConfiguration

    return T2IAccelerator(
        mixed_precision=cfg.model.mixed_precision,
        cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=cfg.log.output_dir),
    )


def pipeline_device(acc) -> torch.device:
    """Where to build the pipeline: the CPU under FSDP (``prepare`` then moves the denoiser to ``acc.device`` one
    shard at a time, so a denoiser larger than one GPU never lands there whole), ``acc.device`` otherwise."""
    return torch.device("cpu") if is_fsdp(acc) else acc.device


def place_pipeline(pipe, acc) -> None:
    """After ``build_pipeline(cfg, pipeline_device(acc), ...)``: under FSDP, move every component but the denoiser
    (text encoders, VAE) to ``acc.device``; a no-op otherwise."""
    if not is_fsdp(acc):
        return
    from .models import denoiser

    net = denoiser(pipe)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer"):
        m = getattr(pipe, name, None)
        if m is not None and m is not net:
            m.to(acc.device)


# ---------------------------------------------------------------------------------------------- LoRA state
def full_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    """``sd`` with every ``DTensor`` (an FSDP2 shard) gathered to the full tensor, on CPU, contiguous.
    **Collective** under FSDP (all-gathers in key order): call it on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k in sorted(sd):
        v = sd[k].detach()
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.cpu().contiguous()
    return out


def full_lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """peft's LoRA state dict of ``unet`` (diffusers key convention, as :func:`t2i.models.lora_state_dict`), full
    tensors on CPU. Collective under FSDP: every rank calls it."""
    from .models import lora_state_dict

    return full_state_dict(lora_state_dict(unet))


def full_lora_hash(unet) -> str:
    """:func:`t2i.checkpointing.lora_hash` of the gathered LoRA (collective under FSDP)."""
    h = hashlib.sha256()
    for k, v in sorted(full_lora_state_dict(unet).items()):
        h.update(k.encode())
        h.update(v.float().numpy().tobytes())
    return h.hexdigest()


def _is_sd3(unet) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(unet, SD3Transformer2DModel)  # FSDP2 renames the class (FSDPSD3Transformer2DModel)


def save_lora_files(unet, value, output_dir: str, is_main: bool) -> None:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers-loadable), ``lora_peft.safetensors`` and, if ``value``
    is given, ``value_model.safetensors`` from the main process, after gathering on **every** rank."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    lora = full_lora_state_dict(unet)
    vsd = full_state_dict(value.state_dict()) if value is not None else None
    if not is_main:
        return
    if _is_sd3(unet):  # peft keys, as diffusers' SD3 LoRA scripts save them
        StableDiffusion3Pipeline.save_lora_weights(output_dir, transformer_lora_layers=lora, safe_serialization=True)
    else:
        StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=convert_state_dict_to_diffusers(lora),
                                                  safe_serialization=True)
    save_file(lora, os.path.join(output_dir, "lora_peft.safetensors"))
    if vsd is not None:
        save_file(vsd, os.path.join(output_dir, "value_model.safetensors"))


@torch.no_grad()
def load_into(module: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full tensors ``sd`` (keys: ``module``'s parameter/buffer names) into ``module``, sharding each one that
    is a ``DTensor`` the way it is sharded (every rank holds the full tensor: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = module.state_dict(keep_vars=True)  # the parameters themselves (FSDP2: the sharded DTensors)
    missing = sorted(set(own) - set(sd)) if strict else []
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"load_into: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in sd.items():
        p = own[k]
        if tuple(v.shape) != tuple(p.shape):
            raise RuntimeError(f"load_into: {k} has shape {tuple(v.shape)}, the model {tuple(p.shape)}")
        if isinstance(p, DTensor):
            v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(v.to_local())
        else:
            p.copy_(v.to(p.device, p.dtype))


def load_lora_files(unet, value, input_dir: str) -> None:
    """Load ``lora_peft.safetensors`` (and ``value_model.safetensors`` if ``value`` is given) into possibly
    FSDP2-sharded models; every rank reads the files (no communication)."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(input_dir, "lora_peft.safetensors"))
    adapters = set(unet.active_adapters()) if hasattr(unet, "active_adapters") else {"default"}
    names = {}  # peft key (adapter name dropped) -> parameter name
    for n, _ in unet.named_parameters():
        if "lora_" in n:
            parts = n.split(".")
            names[".".join(p for p in parts if p not in adapters)] = n
    unexpected = sorted(set(sd) - set(names))
    if unexpected:
        raise RuntimeError(f"unexpected LoRA keys in checkpoint: {unexpected[:5]}")
    load_into(unet, {names[k]: v for k, v in sd.items()}, strict=False)
    if value is not None:
        load_into(value, load_file(os.path.join(input_dir, "value_model.safetensors")))
