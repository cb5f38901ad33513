"""A few iterations of ``sa_ac`` raise a simple reward (issue #5 leftover), and ``ddpo_sf`` (REINFORCE)
changes only LoRA weights like the other methods.

The random tiny VAE decoder ignores latent shifts (and the tiny random UNet with an identity decoder gives
saturated images whose brightness does not move), so the reward test uses a real, very small trained
model: the pixel-space digits diffusion model of :mod:`digits` (``digits.experiment.QUICK().pretrain``, 150
steps, cached by config hash in ``$TMPDIR/sa_digits_test_cache``; shared with ``tests/test_digits.py``),
loaded by ``t2i.models.load_pipeline`` with the identity :class:`t2i.models.PixelSpaceVAE`, trained with
the t2i Trainer on the built-in ``brightness`` reward: ``sa_ac`` with the residual critic as baseline, 12
epochs x 16 samples (192 reward queries), 4 DDIM steps, lr 1e-2 (about 10 s of training on one CPU thread;
measured: brightness 0.313 -> 0.401, SE 0.010, z = 8.6; with 4 epochs and no critic it was 0.313 -> 0.304).

Reward rise: the policy after training and the pretrained model (adapters disabled) each sample ``N = 32``
images (same prompts and evaluation seed, not used in training). With sample means :math:`\\bar r_1,
\\bar r_0` and sample standard deviations :math:`s_1, s_0`, the standard error of the difference is
Welch's :math:`SE = \\sqrt{s_1^2/N + s_0^2/N}`; the test asserts :math:`\\bar r_1 - \\bar r_0 > 4\\,SE`.
(The two samples share the noise seed, which correlates them positively; treating them as independent
over-estimates the SE, so the test is conservative.)
"""

import math
import os
import tempfile

import pytest
import torch

from t2i.models import lora_state_dict, pretrained
from t2i.rewards import Brightness
from t2i.rollout import sample_rollout
from t2i.trainer import make_trainer

from .conftest import tiny_config
from .test_training import FAST, _frozen_state

TEST_CACHE = os.path.join(tempfile.gettempdir(), "sa_digits_test_cache")


def _rewards(tr, n=32, seed=999):
    gen = torch.Generator().manual_seed(seed)
    prompts = [tr.cfg.prompts[i % len(tr.cfg.prompts)] for i in range(n)]
    b = sample_rollout(tr.env, prompts, gen, record_reference=True)
    return Brightness()(b.images, prompts), b.path_kl


def test_few_sa_ac_iterations_raise_brightness_by_several_standard_errors(tmp_path):
    from digits.data import ALL_PROMPTS
    from digits.experiment import QUICK
    from digits.pretrain import pretrain

    folder = pretrain(QUICK().pretrain, TEST_CACHE)
    over = {
        "model.pretrained": folder,
        "sample.num_steps": 4,
        "sample.batch_size": 16,
        "sample.guidance_scale": 1.0,
        "train.batch_size": 8,
        "train.num_epochs": 12,
        "train.learning_rate": 1e-2,
        "train.beta": 1e-3,
        "train.kl_penalty": 0.1,
        "train.per_prompt_norm": True,
        "value.kind": "residual",
        "log.save_every": 0,
        "prompts": "|".join(ALL_PROMPTS),
    }
    tr = make_trainer(tiny_config(tmp_path, "sa_ac", **over))
    with pretrained(tr.pipe.unet):
        r0, _ = _rewards(tr)
    tr.train()
    r1, kl1 = _rewards(tr)
    n = r0.numel()
    se = math.sqrt(float(r0.var()) / n + float(r1.var()) / n)
    diff = float(r1.mean() - r0.mean())
    assert diff > 4 * se, f"brightness {float(r0.mean()):.4f} -> {float(r1.mean()):.4f}, SE {se:.3g}"
    assert torch.isfinite(kl1).all() and float(kl1.mean()) > 0


@pytest.mark.parametrize("method", ["ddpo_sf"])
def test_ddpo_sf_one_iteration_changes_only_lora_weights(tmp_path, method):
    tr = make_trainer(tiny_config(tmp_path, method, **{**FAST, "value.kind": "none"}))
    frozen = _frozen_state(tr)
    lora0 = {k: v.clone() for k, v in lora_state_dict(tr.pipe.unet).items()}
    m = tr.train_iteration()
    assert m["updates"] == 1 and torch.isfinite(torch.tensor(m["train/loss"]))
    after = _frozen_state(tr)
    for k in frozen:
        assert torch.equal(frozen[k], after[k]), f"non-LoRA tensor {k} changed"
    lora1 = lora_state_dict(tr.pipe.unet)
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0), "LoRA weights did not change"
