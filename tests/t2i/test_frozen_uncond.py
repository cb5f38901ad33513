"""``model.lora_uncond = false``: CFG's unconditional branch frozen at the pretrained model (t2i.environments).

The policy's guided output is o_u^pre + w (o_c^theta - o_u^pre); the pretrained unconditional output at a state is
computed once and shared by the policy's and the reference's action, so a guided step with the reference costs 3
denoiser forwards per image instead of 4. Checked on the tiny UNet (DDIM) and the tiny SD3 transformer (flow), with
a non-zero LoRA so that every branch differs from the pretrained one.
"""

import pytest
import torch

from t2i.models import add_lora, denoiser, lora_parameters, lora_targets, pretrained

W = 3.0
PROMPTS = ["a cat", "a dog"]


def _perturbed(pipe):
    add_lora(denoiser(pipe), 4, targets=lora_targets(pipe), init_seed=0)
    with torch.no_grad():
        for p in lora_parameters(denoiser(pipe)):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return pipe


@pytest.fixture(scope="module", params=["unet", "flow"])
def setup(request):
    """(pipe, make_env(lora_uncond, guidance_scale)) on a 3-step stochastic kernel."""
    from t2i.config import Config
    from t2i.environments import make_environment

    if request.param == "unet":
        from t2i.models import build_tiny_pipeline

        pipe, sampler = _perturbed(build_tiny_pipeline(0)), "ddim"
    else:
        from t2i.flow_models import build_tiny_sd3_pipeline

        pipe, sampler = _perturbed(build_tiny_sd3_pipeline(0)), "flow"

    def make_env(lora_uncond, w=W):
        s = Config().sample
        s.sampler, s.num_steps, s.guidance_scale = sampler, 3, w
        return make_environment(pipe, s, lora_uncond=lora_uncond)

    return pipe, make_env


def _state(env, k=1):
    x = env.initial_latents(2, torch.Generator().manual_seed(3))
    return k, x, env.encode(PROMPTS)


def test_policy_is_pretrained_uncond_plus_lora_cond_and_reference_is_unchanged(setup):
    """a = (1 - w) a_u^pre + w a_c^theta (the action is affine in the network output); the reference is the same
    guided pretrained action as with the LoRA on both branches, and a - a^pre = w (a_c^theta - a_c^pre). Negative
    control: the default policy (LoRA on both branches) differs from the frozen one."""
    pipe, make_env = setup
    frozen, default, cond_only = make_env(False), make_env(True), make_env(True, 1.0)
    k, x, text = _state(frozen)
    uncond_text = dict(text, embeds=text["neg_embeds"], pooled=text.get("neg_pooled", text["pooled"]))
    with torch.no_grad():
        a = frozen.action(k, x, text)
        ref = frozen.reference_action(k, x, text)
        a_c = cond_only.action(k, x, text)
        with pretrained(denoiser(pipe)):
            a_u_pre, a_c_pre = cond_only.action(k, x, uncond_text), cond_only.action(k, x, text)
        a_default, ref_default = default.action(k, x, text), default.reference_action(k, x, text)
    tol = dict(rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    torch.testing.assert_close(a, (1 - W) * a_u_pre + W * a_c, **tol)
    torch.testing.assert_close(ref, ref_default, **tol)
    torch.testing.assert_close(a - ref, W * (a_c - a_c_pre), **tol)
    assert (a - a_default).abs().max() > 100 * tol["atol"]


def _count_rows(net):
    rows = {"adapters_on": 0, "adapters_off": 0, "with_grad": 0}
    from t2i.models import _tuner_layers

    layer = _tuner_layers(net)[0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        rows["adapters_off" if layer.disable_adapters else "adapters_on"] += int(x.shape[0])
        rows["with_grad"] += int(x.shape[0]) if torch.is_grad_enabled() else 0

    return rows, net.register_forward_pre_hook(hook, with_kwargs=True)


def test_rollout_costs_three_forwards_per_guided_step_and_training_recomputes_the_sampled_actions(setup):
    """Sampling with the reference: 3 batch-1 forwards per image and step frozen (one adapters on), 4 with the
    LoRA on both branches; without the reference 2 either way. The recorded reference actions are the guided
    pretrained actions at the sampled states (the shared unconditional output is the right one), and the
    update pass's recomputation (grad on) gives back the sampled actions, back-propagating through the
    conditional half only (B rows with grad per step, the unconditional B rows without)."""
    from t2i.rollout import sample_rollout

    pipe, make_env = setup
    net, K, B = denoiser(pipe), 3, len(PROMPTS)
    counts = {}
    for lora_uncond in (False, True):
        for record in (True, False):
            rows, h = _count_rows(net)
            try:
                batch = sample_rollout(make_env(lora_uncond), PROMPTS, torch.Generator().manual_seed(0),
                                       record_reference=record, decode=False)
            finally:
                h.remove()
            counts[lora_uncond, record] = rows
            if not lora_uncond and record:
                frozen_batch = batch
    assert counts[False, True] == {"adapters_on": K * B, "adapters_off": 2 * K * B, "with_grad": 0}
    assert counts[True, True] == {"adapters_on": 2 * K * B, "adapters_off": 2 * K * B, "with_grad": 0}
    assert sum(counts[False, False].values()) == sum(counts[True, False].values()) == 2 * K * B
    env, default = make_env(False), make_env(True)
    text = frozen_batch.text
    for k in range(K):
        x = frozen_batch.latents[k]
        with torch.no_grad():
            ref = default.reference_action(k, x, text)
        scale = 1e-5 * float(ref.abs().max())
        torch.testing.assert_close(frozen_batch.ref_actions[k], ref, rtol=1e-5, atol=scale)
        rows, h = _count_rows(net)
        try:
            a = env.action(k, x.clone(), text)  # grad on, as in the update pass
        finally:
            h.remove()
        assert a.requires_grad and rows == {"adapters_on": B, "adapters_off": B, "with_grad": B}
        torch.testing.assert_close(a.detach(), frozen_batch.actions[k], rtol=1e-5, atol=scale)


def test_gradient_reaches_the_lora_through_the_conditional_branch_only(setup):
    """d<a, r>/d theta = w d<a_c^theta, r>/d theta for the frozen policy (float64 sum of float32 grads)."""
    pipe, make_env = setup
    params = lora_parameters(denoiser(pipe))
    frozen, cond_only = make_env(False), make_env(True, 1.0)
    k, x, text = _state(frozen)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    g_frozen = torch.autograd.grad((frozen.action(k, x, text) * r).sum(), params, allow_unused=True)
    g_cond = torch.autograd.grad((cond_only.action(k, x, text) * r).sum(), params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
    gf, gc = flat(g_frozen), flat(g_cond)
    assert gc.abs().max() > 0
    torch.testing.assert_close(gf, W * gc, rtol=1e-4, atol=1e-5 * float(gf.abs().max()))


def test_shared_output_is_recomputed_when_the_state_changes(setup):
    """The cached unconditional output is keyed on the state: an in-place change of x, another step or another
    tensor gives the fresh value (compared with a new environment that has no cache)."""
    _, make_env = setup
    env = make_env(False)
    k, x, text = _state(env)
    with torch.no_grad():
        env.action(k, x, text)
        x.add_(0.5)  # same tensor object, new version
        got = [env.reference_action(k, x, text), env.reference_action(k + 1, x, text),
               env.reference_action(k, x * 1.0, text)]
        fresh = make_env(False)
        want = [fresh.reference_action(k, x, text), make_env(False).reference_action(k + 1, x, text),
                make_env(False).reference_action(k, x * 1.0, text)]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_sample_images_runs_the_unconditional_half_with_adapters_off(setup):
    """The evaluation samplers follow the policy: per step one B-row call adapters off (unconditional) and one
    B-row call adapters on (conditional); ``lora_uncond=True``: one 2B-row call adapters on."""
    from t2i.rollout import sample_images

    pipe, make_env = setup
    sampler = "flow" if hasattr(pipe, "transformer") else "ddim"
    out = {}
    for lora_uncond in (False, True):
        rows, h = _count_rows(denoiser(pipe))
        try:
            sample_images(pipe, PROMPTS, sampler, 2, W, torch.Generator().manual_seed(0), lora_uncond=lora_uncond)
        finally:
            h.remove()
        out[lora_uncond] = (rows["adapters_on"], rows["adapters_off"])
    assert out[False] == (2 * 2, 2 * 2) and out[True] == (2 * 2 * 2, 0)


def test_training_with_frozen_uncond_runs_and_bad_values_name_the_field(tmp_path):
    """One sa_ac epoch on the tiny preset with ``model.lora_uncond=false``: finite metrics, the pretrained
    unconditional branch in every guided step; a non-boolean value raises naming the field."""
    from t2i.config import validate
    from t2i.trainer import make_trainer

    from .conftest import tiny_config

    cfg = tiny_config(tmp_path, "sa_ac", **{"model.lora_uncond": "false", "train.num_epochs": 1})
    assert cfg.model.lora_uncond is False
    tr = make_trainer(cfg)
    assert tr.env.lora_uncond is False
    rows, h = _count_rows(denoiser(tr.pipe))
    try:
        tr.train()
    finally:
        h.remove()
    s = cfg.sample
    n = s.batch_size * s.num_batches_per_epoch
    assert rows["adapters_off"] >= 2 * s.num_steps * n  # unconditional + reference conditional per step
    metrics = [ln for ln in (tmp_path / "run_sa_ac" / "metrics.jsonl").read_text().splitlines() if ln]
    assert metrics and "nan" not in metrics[-1].lower()
    cfg.model.lora_uncond = "no"
    with pytest.raises(ValueError, match="model.lora_uncond"):
        validate(cfg)


def test_unet_environment_honours_sample_resolution(tmp_path):
    """``sample.resolution`` sets a UNet environment's latent size too (it used to land in ``prediction_type``)."""
    from t2i.config import Config
    from t2i.environments import latent_size, make_environment
    from t2i.models import build_tiny_pipeline
    from t2i.rollout import sample_rollout

    pipe = _perturbed(build_tiny_pipeline(0))
    s = Config().sample
    s.num_steps, s.guidance_scale = 2, 1.0
    native = make_environment(pipe, s)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    s.resolution = 2 * native.latent_size * scale
    env = make_environment(pipe, s)
    assert env.prediction_type == pipe.scheduler.config.get("prediction_type", "epsilon")
    assert env.latent_size == latent_size(pipe, s.resolution) == 2 * native.latent_size
    b = sample_rollout(env, PROMPTS, torch.Generator().manual_seed(0), record_reference=False)
    assert b.images.shape[-2:] == (s.resolution, s.resolution)
