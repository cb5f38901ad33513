"""Shared fixtures for the t2i tests: CPU, offline, one thread (2-thread BLAS under load is ~40x slower
here)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def tiny_config(tmp_path, method="sa_ac", preset="tiny_cpu", **over):
    from t2i.config import apply_overrides, get_preset

    cfg = get_preset(preset)
    cfg.train.method = method
    cfg.log.output_dir = str(tmp_path / f"run_{method}")
    cfg.log.tensorboard = False
    cfg.log.image_every = 0
    if method == "ddpo_is":
        cfg.value.kind = "none"
    apply_overrides(cfg, {k: str(v) for k, v in over.items()})
    return cfg


@pytest.fixture(scope="session")
def tiny_pipe():
    from t2i.models import add_lora, build_tiny_pipeline

    torch.manual_seed(0)
    pipe = build_tiny_pipeline(0)
    add_lora(pipe.unet, 4, init_seed=0)
    return pipe


def end_worker(acc) -> None:
    """The end of a launched test worker (``ddp_worker.py``, ``test_fsdp.py``): wait for every rank, destroy the
    process group, and leave without interpreter finalisation, where a rank once aborted under CI load (SIGABRT,
    "terminate called without an active exception": a C++ thread still joinable at exit; cause not established)."""
    import sys

    acc.wait_for_everyone()
    acc.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_two_processes(dist_args: list[str], script: str, out, phase: str, args: list[str], timeout: int) -> list[dict]:
    """``accelerate launch`` ``script`` on 2 CPU processes (``dist_args``: the distribution flags) on a fresh free
    port (a port reused right after the previous launch can still be held in TIME_WAIT); a hang fails the test,
    a non-zero exit shows stderr; returns the ranks' ``hash_<phase>_<rank>.json`` records."""
    import json
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", *dist_args, "--num_processes", "2", "--main_process_port", str(port), script,
           str(out), phase, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"accelerate launch ({phase}) hung (> {timeout}s): {err.stderr!s:.3000}")
    done = [os.path.exists(os.path.join(out, f"hash_{phase}_{r}.json")) for r in (0, 1)]
    assert res.returncode == 0, f"exit {res.returncode}; ranks that wrote their results: {done}\n{res.stderr[-4000:]}"
    return [json.load(open(os.path.join(out, f"hash_{phase}_{r}.json"))) for r in (0, 1)]
