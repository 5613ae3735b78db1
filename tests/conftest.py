"""Shared test setup: quiet, offline, one thread per test process (tiny models run fastest so
and several suites may share the 2 cores of a CI machine)."""

import os

os.environ.setdefault("DIFFLAB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Each test starts from the same random state, whichever tests ran before it (a test that
    draws unseeded data then sees the same data alone, under -k, and in the whole suite)."""
    torch.manual_seed(0)
