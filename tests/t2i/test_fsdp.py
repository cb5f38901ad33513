"""FSDP2 (``configs/accelerate_fsdp.yaml``) on CPU: torch's ``fully_shard`` runs on gloo, and
:class:`t2i.distributed.T2IAccelerator` promotes an FSDP launch on CPU (accelerate alone silently falls back to
DDP there). Two processes under ``accelerate launch --config_file configs/accelerate_fsdp.yaml`` train the tiny
flow pipeline with its LoRA (and learned value model) sharded, save a checkpoint on every rank, resume exactly,
and end with the same gathered LoRA on both ranks -- equal, up to float rounding, to a DDP run of the same config.

This file is also the worker (``accelerate launch ... test_fsdp.py OUT PHASE PRESET [key=value ...]``). The
worker's trainer subclass only swaps in the FSDP-aware LoRA save/load hooks of :mod:`t2i.distributed` (until
:mod:`t2i.checkpointing` calls them itself)."""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(ROOT, "configs", "accelerate_fsdp.yaml")


# ----------------------------------------------------------------------------------------------- worker
def _worker(out_dir: str, phase: str, preset: str, *extra: str) -> None:
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from t2i.config import apply_overrides, get_preset
    from t2i.distributed import (
        full_lora_hash,
        full_lora_state_dict,
        full_state_dict,
        load_lora_files,
        save_lora_files,
    )
    from t2i.models import denoiser, lora_parameters
    from t2i.trainer import make_trainer
    from tests.t2i.conftest import end_worker  # the launched script's import (PYTHONPATH: the repository root)

    cfg = get_preset(preset)
    apply_overrides(cfg, {
        "sample.num_steps": "2", "sample.batch_size": "2", "train.batch_size": "1",
        "train.gradient_accumulation_steps": "2", "train.num_epochs": "1" if phase == "a" else "2",  # c: 2, fresh
        "log.tensorboard": "false", "log.image_every": "0", "train.per_prompt_norm": "true",
        "log.output_dir": out_dir, **dict(kv.split("=", 1) for kv in extra)})
    if phase == "b":
        cfg.resume_from = "auto"  # continues phase a's run

    tr = make_trainer(cfg)  # the trainer's own accelerator: FSDP2 under the FSDP launch config
    net, rank = denoiser(tr.pipe), tr.acc.process_index
    lora_init = full_lora_hash(net)  # collective (as every gather below)
    tr.train()
    lora = full_lora_state_dict(net)  # collective
    vsd = full_state_dict(tr.value.state_dict()) if tr.learned_value else None
    info = {"rank": rank, "world": tr.acc.num_processes, "epoch": tr.state.epoch, "lora": full_lora_hash(net),
            "lora_init": lora_init,
            "distributed_type": str(tr.acc.distributed_type), "net_class": type(net).__name__,
            "lora_dtensor": all(isinstance(p, DTensor) for p in lora_parameters(net)),
            "value_dtensor": tr.learned_value and all(isinstance(p, DTensor) for p in tr.value.parameters())}
    # the LoRA files round-trip through the DTensor shards: save (collective), clobber, load, gather
    value = tr.value if tr.learned_value else None
    rt = os.path.join(out_dir, f"roundtrip_{phase}")
    os.makedirs(rt, exist_ok=True)
    save_lora_files(net, value, rt, tr.acc.is_main_process)
    tr.acc.wait_for_everyone()
    with torch.no_grad():
        for p in [*lora_parameters(net), *(value.parameters() if value is not None else [])]:
            p.add_(1.0)
    load_lora_files(net, value, rt)
    info["roundtrip"] = full_lora_hash(net) == info["lora"] and (
        value is None or all(torch.equal(v, w) for v, w in
                             zip(full_state_dict(value.state_dict()).values(), vsd.values())))
    save_file(lora, os.path.join(out_dir, f"lora_{phase}_{rank}.safetensors"))
    with open(os.path.join(out_dir, f"hash_{phase}_{rank}.json"), "w") as f:
        json.dump(info, f)
    end_worker(tr.acc)


# ----------------------------------------------------------------------------------------------- launcher
def _launch(out, phase, preset="tiny_flow_cpu", *extra, fsdp=True, mixed="no", timeout=150):
    from .conftest import run_two_processes  # here: this file is also the launched worker script

    dist = ["--config_file", CONFIG] if fsdp else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    return run_two_processes([*dist, "--mixed_precision", mixed], os.path.abspath(__file__), out, phase,
                             [preset, f"model.mixed_precision={mixed}", *extra], timeout)


def _lora(out, phase, rank):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, f"lora_{phase}_{rank}.safetensors"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, _launch(out, "a")


# ----------------------------------------------------------------------------------------------- tests
def test_config_file_names_fsdp2():
    """The shipped config parses, selects FSDP2 with a transformer-block wrap policy and sharded checkpoints, and
    accelerate's plugin reads it as such."""
    import yaml

    with open(CONFIG) as f:
        c = yaml.safe_load(f)
    assert c["distributed_type"] == "FSDP"
    fc = c["fsdp_config"]
    assert fc["fsdp_version"] == 2 and fc["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert set(fc["fsdp_transformer_layer_cls_to_wrap"].split(",")) == {"JointTransformerBlock",
                                                                         "BasicTransformerBlock"}
    assert fc["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    from accelerate.commands.config.config_args import load_config_from_file

    cc = load_config_from_file(CONFIG)
    assert str(cc.distributed_type).endswith("FSDP") and cc.fsdp_config["fsdp_version"] == 2


def test_lora_files_single_process_match_save_lora_and_round_trip(tmp_path):
    """Without FSDP, :func:`save_lora_files` writes what :func:`t2i.models.save_lora` writes, and
    :func:`load_lora_files` restores it."""
    import torch
    from safetensors.torch import load_file

    from t2i.distributed import full_lora_hash, load_lora_files, save_lora_files
    from t2i.flow_models import build_tiny_sd3_pipeline
    from t2i.models import add_lora, lora_parameters, lora_targets, save_lora

    torch.set_num_threads(1)
    pipe = build_tiny_sd3_pipeline(0)
    net = pipe.transformer
    add_lora(net, 4, targets=lora_targets(pipe), init_seed=0)
    with torch.no_grad():
        for p in lora_parameters(net):
            p.add_(0.01 * torch.randn_like(p))
    value = torch.nn.Linear(3, 2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_lora_files(net, value, str(tmp_path / "a"), is_main=True)
    save_lora(net, str(tmp_path / "b"))
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    h = full_lora_hash(net)
    w = value.weight.detach().clone()
    with torch.no_grad():
        for p in [*lora_parameters(net), *value.parameters()]:
            p.zero_()
    load_lora_files(net, value, str(tmp_path / "a"))
    assert full_lora_hash(net) == h and torch.equal(value.weight, w)


def test_place_pipeline_keeps_the_denoiser_off_the_device_under_fsdp():
    """Under FSDP the pipeline is built on the CPU and everything but the denoiser moves to the device (the
    denoiser moves shard by shard in ``prepare``); without FSDP nothing changes."""
    import types

    import torch
    from accelerate.utils import DistributedType

    from t2i.distributed import pipeline_device, place_pipeline
    from t2i.flow_models import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(0)
    ddp = types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, device=torch.device("meta"))
    fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP, device=torch.device("meta"))
    assert pipeline_device(ddp).type == "meta" and pipeline_device(fsdp).type == "cpu"
    place_pipeline(pipe, ddp)
    assert pipe.text_encoder.device.type == "cpu"
    place_pipeline(pipe, fsdp)
    assert pipe.transformer.device.type == "cpu"
    assert {m.device.type for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)} == {"meta"}


def test_fsdp_two_process_train_save_equal_lora(fsdp_run):
    out, a = fsdp_run
    assert [h["world"] for h in a] == [2, 2]
    assert {h["distributed_type"] for h in a} == {"DistributedType.FSDP"}  # not silently DDP
    assert all(h["lora_dtensor"] and h["value_dtensor"] for h in a)  # LoRA and value model sharded
    assert a[0]["net_class"].startswith("FSDP")  # sharded in place: pipe.transformer is the FSDP module
    assert a[0]["lora"] == a[1]["lora"] and a[0]["lora"] != a[0]["lora_init"]  # trained, identically
    assert all(h["roundtrip"] for h in a)  # save_lora_files / load_lora_files through the shards
    ck = out / "checkpoints" / "checkpoint-000001"
    for f in ("random_states_0.pkl", "random_states_1.pkl", "lora_peft.safetensors", "value_model.safetensors",
              "pytorch_lora_weights.safetensors", "checksums.sha256"):
        assert (ck / f).exists(), f
    assert (ck / "pytorch_model_fsdp_0").is_dir() and (ck / "optimizer_0").is_dir()
    # the checkpoint holds the gathered LoRA (not one rank's shard): a single process loads it to the same hash
    import torch

    from t2i.checkpointing import load_policy_from_checkpoint, lora_hash
    from t2i.models import denoiser

    torch.set_num_threads(1)
    _, pipe = load_policy_from_checkpoint(str(ck))
    assert lora_hash(denoiser(pipe)) == a[0]["lora"]


def test_fsdp_matches_ddp(fsdp_run, tmp_path):
    """The same config under DDP (T2IAccelerator without FSDP is accelerate's DDP) ends with the same LoRA, up to
    float rounding (all-reduce vs reduce-scatter)."""
    import torch

    out, a = fsdp_run
    d = _launch(tmp_path, "a", fsdp=False)
    assert {h["distributed_type"] for h in d} == {"DistributedType.MULTI_CPU"} and not d[0]["lora_dtensor"]
    f_sd, d_sd = _lora(out, "a", 0), _lora(tmp_path, "a", 0)
    assert f_sd.keys() == d_sd.keys()
    for k in f_sd:  # (bitwise equal with torch 2.13 on CPU, 2 ranks)
        torch.testing.assert_close(f_sd[k], d_sd[k], rtol=1e-5, atol=1e-7)
    from safetensors.torch import load_file

    for name in ("pytorch_lora_weights.safetensors", "value_model.safetensors"):  # the checkpoints' files agree
        f_ck, d_ck = (load_file(str(o / "checkpoints" / "checkpoint-000001" / name)) for o in (out, tmp_path))
        assert f_ck.keys() == d_ck.keys()
        for k in f_ck:
            torch.testing.assert_close(f_ck[k], d_ck[k], rtol=1e-5, atol=1e-7)


def test_fsdp_matches_ddp_in_bf16(tmp_path):
    """bf16 (frozen weights in bfloat16, float32 LoRA and value model, autocast): FSDP all-gathers each parameter
    in its own dtype and casts nothing, so it ends where DDP ends (accelerate's FSDP mixed-precision policy would
    cast the value model to bfloat16 and fail on its float32 inputs)."""
    import torch

    f = _launch(tmp_path / "f", "a", mixed="bf16")
    d = _launch(tmp_path / "d", "a", fsdp=False, mixed="bf16")
    assert f[0]["distributed_type"] == "DistributedType.FSDP" and f[0]["value_dtensor"] and f[0]["roundtrip"]
    assert f[0]["lora"] == f[1]["lora"] != f[0]["lora_init"] and d[0]["distributed_type"].endswith("MULTI_CPU")
    f_sd, d_sd = _lora(tmp_path / "f", "a", 0), _lora(tmp_path / "d", "a", 0)
    for k in f_sd:  # (bitwise equal with torch 2.13 on CPU)
        torch.testing.assert_close(f_sd[k], d_sd[k], rtol=1e-5, atol=1e-7)


def test_fsdp_resume_continues_on_both_ranks(fsdp_run):
    out, a = fsdp_run
    b = _launch(out, "b")
    assert [h["epoch"] for h in b] == [2, 2] and all(h["lora_dtensor"] for h in b)
    assert b[0]["lora"] == b[1]["lora"] != a[0]["lora"]
    assert (out / "checkpoints" / "checkpoint-000002" / "pytorch_model_fsdp_0").is_dir()


def test_fsdp_resume_is_exact(fsdp_run, tmp_path):
    """Interrupted after epoch 1 and resumed (sharded model and optimizer from torch.distributed.checkpoint) ends
    where an uninterrupted 2-epoch run ends."""
    out, _ = fsdp_run
    if not (out / "hash_b_0.json").exists():
        _launch(out, "b")
    b = [json.load(open(out / f"hash_b_{r}.json")) for r in (0, 1)]
    c = _launch(tmp_path, "c")
    assert [h["epoch"] for h in c] == [2, 2] and c[0]["lora"] == b[0]["lora"]


def test_fsdp_unet_and_single_model(tmp_path):
    """The same config on the tiny UNet (wrap class BasicTransformerBlock) with no learned value model (one model
    prepared: accelerate's own FSDP2 path)."""
    a = _launch(tmp_path, "a", "tiny_cpu", "value.kind=none")
    assert {h["distributed_type"] for h in a} == {"DistributedType.FSDP"} and all(h["lora_dtensor"] for h in a)
    assert a[0]["lora"] == a[1]["lora"] != a[0]["lora_init"] and not a[0]["value_dtensor"]


def test_fsdp1_is_refused(monkeypatch):
    """A launch with FSDP1 is refused before any state is built (the sampler calls ``pipe.transformer`` directly,
    which FSDP1 leaves holding flat shards)."""
    from t2i.distributed import T2IAccelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP2"):
        T2IAccelerator(cpu=True)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
