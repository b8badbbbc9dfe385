"""``import ppl_notes`` pays for torch and Pyro only; ArviZ, xarray, matplotlib and
scikit-learn load where they are used (the time itself: benchmarks/bench_import.py)."""

import subprocess
import sys

import pytest

import ppl_notes

HEAVY = ("arviz_base", "arviz_stats", "arviz_plots", "matplotlib", "xarray", "sklearn",
         "scipy.stats", "h5netcdf")


def _loaded_after(statement: str) -> list[str]:
    code = (f"import sys; {statement}; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_importing_the_package_loads_none_of_the_result_libraries():
    assert _loaded_after("import ppl_notes") == []


def test_the_public_names_load_on_first_use():
    assert "matplotlib" in _loaded_after("from ppl_notes import write_report")
    assert set(ppl_notes.__all__) <= set(dir(ppl_notes))
    for name in ppl_notes.__all__:
        assert getattr(ppl_notes, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'infers'"):
        ppl_notes.infers  # noqa: B018 - the attribute access is the test
