"""`accelerate launch --num_processes 2` on CPU (gloo): trains, saves on every rank, resumes, no hang, and the
LoRA weights are identical on both ranks (DDP synchronises the LoRA gradients)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _launch(out, phase, preset="tiny_cpu", timeout=240):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        os.path.join(HERE, "ddp_worker.py"),
        str(out),
        phase,
        preset,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"accelerate launch phase {phase} hung (> {timeout}s): {err.stderr!s:.3000}")
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.load(open(os.path.join(out, f"hash_{phase}_{r}.json"))) for r in (0, 1)]


@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_flow_cpu"])
def test_two_process_train_save_resume_and_equal_lora_on_both_ranks(tmp_path, preset):
    a = _launch(tmp_path, "a", preset)
    assert [h["world"] for h in a] == [2, 2] and a[0]["lora"] == a[1]["lora"]
    ck = tmp_path / "checkpoints" / "checkpoint-000001"
    assert (ck / "random_states_0.pkl").exists() and (ck / "random_states_1.pkl").exists()
    b = _launch(tmp_path, "b", preset)
    assert [h["epoch"] for h in b] == [2, 2]
    assert b[0]["lora"] == b[1]["lora"] != a[0]["lora"]
