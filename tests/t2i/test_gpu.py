"""CUDA checks (``pytest -m gpu``; skipped without a CUDA device, excluded from the default run).

* The sampling loop on CUDA is the CPU's loop: the noise comes from a CPU generator, so with TF32 off a float32
  rollout of the tiny UNet and the tiny SD3 pipeline on the GPU equals the CPU's up to float32 rounding of the
  denoiser (states and log-probs within 1e-3 relative; a wrong device placement or a GPU-side noise draw gives
  O(1) differences).
* One bf16 training iteration per method and family on the GPU (``model.mixed_precision bf16``): frozen weights
  bf16 and unchanged, LoRA fp32 and changed, every metric finite, and the log-prob recomputed by the first update
  equals the rollout's (``logprob_parity_max``; bf16 rounding of a batched call, bound stated below).
"""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PRESET = {"unet": "tiny_cpu", "sd3": "tiny_flow_cpu"}


def _rollout(cfg, device):
    from t2i.checkpointing import build_pipeline
    from t2i.environments import make_environment
    from t2i.models import add_lora, denoiser, lora_targets
    from t2i.rollout import sample_rollout

    torch.manual_seed(0)
    pipe = build_pipeline(cfg, device, torch.float32)
    add_lora(denoiser(pipe), 4, targets=lora_targets(pipe), init_seed=0)
    env = make_environment(pipe, cfg.sample)
    with torch.no_grad():
        return sample_rollout(env, ["a cat", "a dog", "a cat", "a dog"], torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_cuda_rollout_equals_the_cpu_rollout_in_float32(tmp_path, family):
    cfg = tiny_config(tmp_path, "sa_ac", PRESET[family])
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cpu, gpu = _rollout(cfg, torch.device("cpu")), _rollout(cfg, torch.device("cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for name in ("latents", "actions", "log_probs", "ref_actions"):
        a, b = getattr(cpu, name), getattr(gpu, name).cpu()
        err = float((a - b).abs().max() / a.abs().max())
        assert err < 1e-3, f"{name}: max relative difference {err:.2e} between CPU and CUDA"


@pytest.mark.parametrize("family,method", [("unet", "sa_ac"), ("unet", "ddpo_is"), ("sd3", "sa_ac"),
                                           ("sd3", "flow_grpo")])
def test_one_bf16_iteration_on_cuda_trains_only_fp32_lora(tmp_path, family, method):
    from accelerate.state import AcceleratorState

    from t2i.models import denoiser
    from t2i.trainer import make_trainer

    over = {"model.mixed_precision": "bf16", "log.save_every": 0, "train.num_epochs": 1}
    if method == "flow_grpo":
        over.update({"sample.flow_noise": "flow_grpo", "sample.flow_noise_value": 0.7, "train.logprob_units": "mean",
                     "value.kind": "none", "sample.group_size": 2})
    AcceleratorState._reset_state(True)
    try:
        tr = make_trainer(tiny_config(tmp_path, method, PRESET[family], **over))
        assert tr.acc.device.type == "cuda"
        net = denoiser(tr.pipe)
        lora = {n: p for n, p in net.named_parameters() if "lora_" in n}
        frozen = {n: p for n, p in net.named_parameters() if "lora_" not in n}
        assert lora and all(p.dtype == torch.float32 and p.is_cuda for p in lora.values())
        assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in frozen.values())
        before = {n: p.detach().clone() for n, p in lora.items()}
        frozen0 = {n: p.detach().clone() for n, p in frozen.items()}
        m = tr.train_iteration()
    finally:
        AcceleratorState._reset_state(True)
    bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"non-finite metrics on CUDA: {bad}"
    assert m["updates"] >= 1
    assert any(not torch.equal(before[n], p) for n, p in lora.items())
    assert all(torch.equal(frozen0[n], p) for n, p in frozen.items())
    # bf16 keeps 8 bits of mantissa: the update's batched call (minibatches of 2, the rollout's were 4) can move a
    # step mean by ~2^-8 of the action's scale, i.e. the summed log-prob of a d-dim Gaussian step by ~sqrt(d) * 2^-8
    # * (mean gain / sigma); the tiny latents have d = 1024 (UNet) and 256 (SD3): 2 nats bounds that with room,
    # while a wrong step index, kernel or units gives O(d) nats.
    assert m["logprob_parity_max"] < 2.0, m["logprob_parity_max"]
