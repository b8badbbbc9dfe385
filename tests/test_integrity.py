"""Saved results and checkpoints with bytes overwritten: a named error, or an identical
load, never changed values (hypothesis draws where and what to overwrite)."""

import functools

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_notes import CheckpointError, DataError, infer, load
from ppl_notes.guides.conjugate import normal_mean_guide
from ppl_notes.models.conjugate import normal_mean
from ppl_notes.vi.checkpoint import load_checkpoint

FLIPS = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def _saved(folder: str) -> tuple[bytes, xr.DataTree]:
    """An SVI result, saved: its bytes and the tree it loads as."""
    svi = infer(normal_mean, method="svi", guide=normal_mean_guide, steps=50, progress=False)
    path = svi.save(f"{folder}/fit.nc")
    return path.read_bytes(), load(path).to_arviz()


@functools.cache
def _checkpoint(folder: str) -> bytes:
    path = f"{folder}/run.ckpt"
    infer(normal_mean, method="svi", guide=normal_mean_guide, steps=20, checkpoint=path,
          progress=False)
    with open(path, "rb") as handle:
        return handle.read()


def _overwrite(raw: bytes, where: float, patch: bytes) -> bytes:
    position = min(int(where * len(raw)), len(raw) - len(patch))
    return raw[:position] + patch + raw[position + len(patch):]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("integrity"))


@FLIPS
@given(where=st.floats(0, 1, exclude_max=True), patch=st.binary(min_size=1, max_size=8))
def test_an_overwritten_result_is_refused_or_loads_identically(folder, where, patch):
    raw, expected = _saved(folder)
    damaged = _overwrite(raw, where, patch)
    path = f"{folder}/damaged.nc"
    with open(path, "wb") as handle:
        handle.write(damaged)
    try:
        loaded = load(path)
    except DataError as error:
        assert "damaged.nc" in str(error)
        return
    xr.testing.assert_identical(loaded.to_arviz(), expected)


@FLIPS
@given(where=st.floats(0, 1, exclude_max=True), patch=st.binary(min_size=1, max_size=8))
def test_an_overwritten_checkpoint_is_refused_or_reads_identically(folder, where, patch):
    raw = _checkpoint(folder)
    damaged = _overwrite(raw, where, patch)
    path = f"{folder}/damaged.ckpt"
    with open(path, "wb") as handle:
        handle.write(damaged)
    if damaged == raw:
        return
    with pytest.raises(CheckpointError, match="damaged.ckpt"):
        load_checkpoint(path)


def test_a_changed_value_in_a_saved_result_is_found(folder):
    """Not only the file's structure: one draw changed in place is caught by the hash."""
    raw, expected = _saved(folder)
    draws = expected["posterior"]["mu"].values
    needle = np.ascontiguousarray(draws.ravel()[:4]).tobytes()
    position = raw.find(needle)
    assert position > 0  # the draws are stored uncompressed, so they can be found
    changed = bytearray(raw)
    changed[position:position + 8] = np.float64(7.7e303).tobytes()
    path = f"{folder}/changed.nc"
    with open(path, "wb") as handle:
        handle.write(bytes(changed))
    with pytest.raises(DataError, match="changed.nc' is damaged"):
        load(path)


def test_the_undamaged_checkpoint_reads(folder):
    """The control: the file the flips start from is itself readable."""
    _checkpoint(folder)
    state = load_checkpoint(f"{folder}/run.ckpt")
    assert torch.is_tensor(state["elbo"]) and len(state["elbo"]) == 20
