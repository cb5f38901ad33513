"""`accelerate launch --num_processes 2` on CPU (gloo): trains, saves on every rank, resumes, no hang, and the
LoRA weights are identical on both ranks (DDP synchronises the LoRA gradients)."""

import os

import pytest

from .conftest import run_two_processes

HERE = os.path.dirname(os.path.abspath(__file__))


def _launch(out, phase, preset="tiny_cpu", timeout=240):
    dist = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return run_two_processes(dist, os.path.join(HERE, "ddp_worker.py"), out, phase, [preset], timeout)


@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_flow_cpu"])
def test_two_process_train_save_resume_and_equal_lora_on_both_ranks(tmp_path, preset):
    a = _launch(tmp_path, "a", preset)
    assert [h["world"] for h in a] == [2, 2] and a[0]["lora"] == a[1]["lora"]
    ck = tmp_path / "checkpoints" / "checkpoint-000001"
    assert (ck / "random_states_0.pkl").exists() and (ck / "random_states_1.pkl").exists()
    b = _launch(tmp_path, "b", preset)
    assert [h["epoch"] for h in b] == [2, 2]
    assert b[0]["lora"] == b[1]["lora"] != a[0]["lora"]
