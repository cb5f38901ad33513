"""Test-session settings: one intra-op thread (small tensors; avoids OpenMP contention on 2-core CI)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(1)
