import numpy as np
import pytest
import xarray as xr

from ppl_notes import DataError, infer, load
from ppl_notes.guides.conjugate import normal_mean_guide
from ppl_notes.models.conjugate import normal_mean


@pytest.mark.parametrize("method", ["svi", "nuts"])
def test_save_and_load_round_trip(tmp_path, method):
    options = ({"steps": 200, "guide": normal_mean_guide} if method == "svi"
               else {"chains": 2, "warmup": 100, "draws": 100, "processes": 1})
    fit = infer(normal_mean, method=method, progress=False, **options)
    path = fit.save(tmp_path / "fit.nc")
    loaded = load(path)
    xr.testing.assert_identical(loaded.to_arviz(), fit.to_arviz())
    assert loaded.method == method and loaded.model is normal_mean
    assert loaded.history.equals(fit.history)
    assert loaded.summary().equals(fit.summary())


def test_loading_garbage_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.nc"
    bad.write_bytes(b"not a netcdf file")
    with pytest.raises(DataError, match="not a ppl_notes result"):
        load(bad)
    with pytest.raises(DataError, match="no saved result"):
        load(tmp_path / "missing.nc")


def test_same_seed_same_draws_different_seed_different_draws():
    first = infer(normal_mean, method="nuts", chains=2, warmup=100, draws=50, seed=3,
                  progress=False)
    again = infer(normal_mean, method="nuts", chains=2, warmup=100, draws=50, seed=3,
                  progress=False, processes=1)
    other = infer(normal_mean, method="nuts", chains=2, warmup=100, draws=50, seed=4,
                  progress=False)
    np.testing.assert_array_equal(first["mu"], again["mu"])
    assert not np.array_equal(first["mu"], other["mu"])
    svi = [infer(normal_mean, method="svi", steps=50, seed=s, progress=False)["mu"]
           for s in (1, 1, 2)]
    np.testing.assert_array_equal(svi[0], svi[1])
    assert not np.array_equal(svi[0], svi[2])
