"""Fuzzing the IDX reader: any bytes either parse consistently or raise DataError, cheaply."""

from __future__ import annotations

import gzip
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.data import read_idx, write_idx
from difflab.errors import DataError

PEAK_LIMIT = 32 << 20  # no input here may make the reader hold more than 32 MiB at once
FUZZ = settings(max_examples=50, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("idx_fuzz")


def _read(path, ndim):
    """(array or None, DataError message or None), with the reader's peak memory checked."""
    tracemalloc.start()
    try:
        return read_idx(path, ndim=ndim), None
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return None, msg
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < PEAK_LIMIT, f"reader peaked at {peak:,} bytes"


def _check_consistent(path, ndim):
    a, err = _read(path, ndim)
    b, err2 = _read(path, ndim)
    assert err == err2
    if a is not None:
        assert a.dtype == np.uint8 and np.array_equal(a, b)
        assert ndim is None or a.ndim == ndim
    return a, err


@FUZZ
@given(data=st.binary(max_size=400), ndim=st.sampled_from([None, 1, 3]), gz=st.booleans())
def test_random_bytes(workdir, data, ndim, gz):
    path = workdir / "random"
    path.write_bytes(gzip.compress(data) if gz else data)
    _check_consistent(path, ndim)


@FUZZ
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    edits=st.lists(st.tuples(st.integers(0, 19), st.integers(0, 255)), max_size=4),
    cut=st.integers(-8, 8),
    gz=st.booleans(),
    ndim=st.sampled_from([None, 1, 3]),
)
def test_mutated_headers(workdir, shape, edits, cut, gz, ndim):
    """A valid file with header bytes overwritten, then truncated (cut < 0) or padded."""
    path = workdir / "mutated"
    body = np.arange(math.prod(shape), dtype=np.uint64).astype(np.uint8).reshape(shape)
    blob = bytearray(write_idx(path, body).read_bytes())
    for pos, value in edits:
        if pos < len(blob):
            blob[pos] = value
    blob = blob[: len(blob) + cut] if cut < 0 else blob + bytes(cut)
    path.write_bytes(gzip.compress(bytes(blob)) if gz else bytes(blob))
    a, _ = _check_consistent(path, ndim)
    if a is not None:  # whatever parsed must be exactly what the (edited) header declares
        d = blob[3]
        dims = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(d))
        assert a.shape == dims and len(blob) == 4 + 4 * d + a.size


def test_untouched_file_parses(workdir):
    path = write_idx(workdir / "ok.gz", np.ones((2, 3, 4), np.uint8))
    a, err = _check_consistent(path, 3)
    assert err is None and a.shape == (2, 3, 4)
