"""Shared test setup: quiet, offline, one thread per test process (tiny models run fastest so
and several suites may share the 2 cores of a CI machine)."""

import os

os.environ.setdefault("DIFFLAB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
