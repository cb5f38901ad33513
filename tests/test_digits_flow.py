"""The flow-matching digits model (issue #16): cached / shipped pretraining, loading through t2i, and a tiny
fine-tune of ``sa_ac`` and ``flow_grpo`` through :func:`t2i.trainer.make_trainer` on it (finite metrics, only LoRA
weights change, on-policy log-prob parity). The QUICK models are shipped in ``digits/weights``, so the default
suite copies them into a temporary cache instead of training."""

import dataclasses
import json
import math
import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

TEST_CACHE = os.path.join(tempfile.gettempdir(), "sa_digits_test_cache")


@pytest.fixture(scope="module")
def flow_setup():
    from digits.flow_experiment import QUICK_FLOW_EXPERIMENT, flow_assets

    fc = QUICK_FLOW_EXPERIMENT()
    fc.base.epochs, fc.base.batch_size, fc.base.minibatch = 1, 8, 4
    return fc, flow_assets(fc, TEST_CACHE)


def test_quick_flow_model_loads_in_t2i_and_samples(flow_setup):
    from digits.pretrain_flow import flow_config_hash, pretrain_flow, sample_ode
    from t2i.checkpointing import build_pipeline
    from t2i.config import Config
    from t2i.models import PixelSpaceVAE, is_flow_pipeline

    fc, assets = flow_setup
    folder = assets["flow_model"]
    assert pretrain_flow(fc.flow, TEST_CACHE) == folder and os.path.basename(folder) == flow_config_hash(fc.flow)
    c = Config()
    c.model.pretrained, c.model.family = folder, "sd3"
    pipe = build_pipeline(c, "cpu")
    assert is_flow_pipeline(pipe) and isinstance(pipe.vae, PixelSpaceVAE)
    assert pipe.transformer.config.in_channels == 1 and pipe.transformer.config.sample_size == 8
    img = sample_ode(pipe, ["a handwritten digit 3"] * 2, 4, generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 8, 8) and torch.isfinite(img).all() and 0 <= float(img.min()) <= float(img.max()) <= 1


@pytest.mark.parametrize("method", ["sa_ac", "flow_grpo"])
def test_tiny_finetune_changes_only_lora_with_logprob_parity(flow_setup, tmp_path, method):
    from digits.flow_experiment import make_flow_config
    from t2i.models import lora_state_dict
    from t2i.trainer import make_trainer

    fc, assets = flow_setup
    cfg = make_flow_config(fc, assets, method, 0, fc.base.num_steps, str(tmp_path / method))
    assert cfg.sample.sampler == "flow" and (method != "flow_grpo" or cfg.sample.group_size == 4)
    # no flow output reads the training-time KL curve, but a method whose loss needs the reference records it
    # (path_kl_mean below); ddpo_is (beta = 0) skips it
    assert not cfg.log.reference_kl
    tr = make_trainer(cfg)
    frozen = {f"{n}.{k}": v.clone() for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
              for k, v in getattr(tr.pipe, n).state_dict().items() if "lora_" not in k}
    lora0 = {k: v.clone() for k, v in lora_state_dict(tr.pipe.transformer).items()}
    m = tr.train_iteration()
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["reward_mean"]) and math.isfinite(m["path_kl_mean"])
    assert m["logprob_parity_max"] < 1e-3, m["logprob_parity_max"]
    after = {f"{n}.{k}": v for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
             for k, v in getattr(tr.pipe, n).state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    lora1 = lora_state_dict(tr.pipe.transformer)
    assert any(not torch.equal(lora0[k], lora1[k]) for k in lora0), "LoRA weights did not change"
    # negative control: a recomputation that is not the sampling policy (action shifted by 0.05) fails the check
    orig = tr.method.policy_actions
    tr.method.policy_actions = lambda batch, ks: orig(batch, ks) + 0.05
    assert tr.train_iteration()["logprob_parity_max"] > 1e-2


def test_flow_evaluation_reports_finite_metrics(flow_setup):
    from digits.flow_experiment import _pretrained_eval

    fc, assets = flow_setup
    ev = _pretrained_eval(fc, assets, fc.base.num_steps, "flow")
    for k in ("reward_mean", "path_kl_mean", "path_kl_ct_mean", "eval_accuracy", "fd", "diversity_mean"):
        assert math.isfinite(ev[k]), k
    assert ev["path_kl_mean"] == 0.0  # the pretrained model against itself


def test_shipped_flow_weights_match_their_config_hashes_and_a_changed_config_trains(tmp_path, monkeypatch):
    """Shipped default and QUICK flow models: recorded config hashes to the stored name, files pass SHA-256, the
    weights fit the architecture; a changed config is not shipped and trains (training made to raise first to
    show that the shipped one is copied). Negative control: a flipped byte fails the SHA-256 check."""
    import shutil

    import digits.pretrain_flow as PF
    from digits.pretrain import WEIGHTS_DIR, read_manifest
    from t2i.flow_models import PIXEL_SD3_MARKER, load_pixel_sd3_pipeline

    section = read_manifest()[PF.SECTION]
    quick, default = PF.QUICK_FLOW(), PF.FlowPretrainConfig()
    assert {PF.flow_config_hash(quick), PF.flow_config_hash(default)} <= set(section)
    for h, entry in section.items():
        cfg = PF.FlowPretrainConfig(**entry["config"])
        assert PF.flow_config_hash(cfg) == h
        folder = PF.shipped_flow_pretrained(cfg)
        assert folder is not None and os.path.basename(folder) == h
        with open(os.path.join(folder, PIXEL_SD3_MARKER)) as f:
            assert json.load(f)["hash"] == h
        got, fresh = load_pixel_sd3_pipeline(folder).transformer, PF.build_untrained_flow_pipeline(cfg).transformer
        assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    for change in ({"seed": 1}, {"num_train_steps": 59}, {"extra": {"x": 1}}):
        assert PF.shipped_flow_pretrained(dataclasses.replace(quick, **change)) is None, change
    wd = str(tmp_path / "weights")
    shutil.copytree(WEIGHTS_DIR, wd)
    w = os.path.join(wd, PF.SECTION, PF.flow_config_hash(quick), "transformer",
                     "diffusion_pytorch_model.safetensors")
    data = bytearray(open(w, "rb").read())
    data[-1] ^= 1
    open(w, "wb").write(data)
    with pytest.warns(UserWarning, match="SHA-256"):
        assert PF.shipped_flow_pretrained(quick, wd) is None

    def no_training(*a, **k):
        raise AssertionError("trained although shipped")

    monkeypatch.setattr(PF, "_train", no_training)
    folder = PF.pretrain_flow(quick, str(tmp_path / "cache"))
    assert os.path.basename(folder) == PF.flow_config_hash(quick)
    tiny = dataclasses.replace(quick, num_train_steps=2, warmup_steps=1, batch_size=4)
    with pytest.raises(AssertionError, match="trained although shipped"):
        PF.pretrain_flow(tiny, str(tmp_path / "cache"))
    monkeypatch.undo()
    info = PF.flow_pretrain_info(PF.pretrain_flow(tiny, str(tmp_path / "cache")))
    assert info["steps"] == 2 and info["hash"] == PF.flow_config_hash(tiny) and math.isfinite(info["final_loss"])


def test_flow_experiment_reuses_the_digits_experiments_identical_vp_runs(flow_setup, tmp_path):
    """A VP ``sa_ac`` run the digits experiment already made (same :func:`finetune_key`) is taken, not trained again;
    the key ignores the lists of runs but not a setting such as ``beta``."""
    from digits.experiment import finetune_key
    from digits.flow_experiment import run_flow_experiment

    fc, _ = flow_setup
    fc = dataclasses.replace(fc, methods=(), sweep_seeds=(0,),
                             base=dataclasses.replace(fc.base, seeds=(0,), step_counts=(fc.base.num_steps,)))
    K = fc.base.num_steps
    key = finetune_key(fc.base, "sa_ac", 0, K)
    assert key == finetune_key(dataclasses.replace(fc.base, seeds=(0, 1, 2), step_counts=(4, 10)), "sa_ac", 0, K)
    assert key != finetune_key(dataclasses.replace(fc.base, beta=0.5), "sa_ac", 0, K)
    assert key != finetune_key(fc.base, "sa_ac", 1, K)
    final = {m: 0.5 for m in ("reward_mean", "reward_se", "path_kl_mean", "path_kl_ct_mean", "eval_accuracy", "fd",
                              "diversity_mean")}
    digits_run = {"method": "sa_ac", "seed": 0, "K": K, "key": key, "train_time_s": 9.0, "queries": [8],
                  "reward": [0.5], "reward_se": [0.1], "path_kl": [1.0], "final": final}
    seen = []
    res = run_flow_experiment(fc, str(tmp_path), TEST_CACHE, workers=1, fig_dir=None,
                              on_done=lambda k, s: seen.append((k, s)), reuse_runs=[digits_run])
    assert [(r["model"], r["reused"], r["final"]["fd"]) for r in res["runs"]] == [("vp", True, 0.5)]
    assert not os.path.exists(os.path.join(tmp_path, "runs"))  # nothing was trained
    assert (f"flow/vp_sa_ac_s0_K{K}", 0.0) in seen  # no work for the progress bar
