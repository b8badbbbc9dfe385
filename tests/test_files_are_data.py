"""A result file is data, not code: forged as an attacker who has read the source would.

The attacker can write any attribute and value, and recompute the content hash with
ppl_notes' own ``tree_digest``. They cannot sign with the victim's key. Whatever they
write, loading never imports or calls anything the file names (a module that leaves a
marker file when imported, on sys.path, is the bait), and a changed value never loads
silently: an unsigned or foreign-signed file is refused unless the user says
``trusted=True``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5netcdf
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_notes import CheckpointError, DataError, UntrustedFileError, calibrate, infer, load
from ppl_notes._integrity import DIGEST_ATTR, SIGNATURE_ATTR, tree_digest
from ppl_notes._signing import sign
from ppl_notes.cli import main
from ppl_notes.guides.conjugate import normal_mean_guide
from ppl_notes.models.conjugate import normal_mean
from ppl_notes.vi.checkpoint import FORMAT, load_checkpoint

BAIT = "ppl_notes_bait_module"


@pytest.fixture(scope="module")
def bait(tmp_path_factory):
    """A module that, if ever imported, leaves a marker file; and its folder on sys.path."""
    folder = tmp_path_factory.mktemp("bait")
    marker = folder / "IMPORTED"
    (folder / f"{BAIT}.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("imported")
        def story(*args, **kwargs):
            open({str(marker)!r}, "w").write("called")
        guide = story
    """))
    sys.path.insert(0, str(folder))
    yield marker
    sys.path.remove(str(folder))
    sys.modules.pop(BAIT, None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An SVI result with a guide function, saved and signed with this user's key."""
    fit = infer(normal_mean, method="svi", guide=normal_mean_guide, steps=50, progress=False)
    return fit.save(tmp_path_factory.mktemp("saved") / "fit.nc")


def _forge(source: Path, target: Path, attrs: dict | None = None, scale: float = 1.0,
           key: bytes | None = None) -> Path:
    """Rewrite attributes and values, then recompute the hash (and sign with ``key``)."""
    with xr.open_datatree(source, engine="h5netcdf") as opened:
        tree = opened.load()
    tree.attrs.update(attrs or {})
    for name in (DIGEST_ATTR, SIGNATURE_ATTR):
        tree.attrs.pop(name, None)
    posterior = tree["posterior"].to_dataset()
    tree["posterior"] = xr.DataTree(posterior * scale, name="posterior")
    tree.to_netcdf(target, engine="h5netcdf")
    with xr.open_datatree(target, engine="h5netcdf") as written:
        digest = tree_digest(written)
    with h5netcdf.File(target, "r+") as handle:
        handle.attrs[DIGEST_ATTR] = digest
        if key is not None:
            handle.attrs[SIGNATURE_ATTR] = sign(digest, key)
    return target


def _names_bait() -> dict:
    return {"model_path": f"{BAIT}:story", "guide_path": f"{BAIT}:guide",
            "model_module": BAIT, "model": "normal_mean"}


def test_a_file_naming_code_is_refused_and_nothing_is_imported(saved, bait, tmp_path):
    forged = _forge(saved, tmp_path / "forged.nc", _names_bait())
    with pytest.raises(UntrustedFileError, match="not signed"):
        load(forged)
    attacker = _forge(saved, tmp_path / "signed.nc", _names_bait(), key=b"attacker" * 4)
    with pytest.raises(UntrustedFileError, match="another key"):
        load(attacker)
    # trusted: the values load, and still nothing named in the file is imported or called
    fit = load(attacker, trusted=True)
    assert fit.model is None and fit.guide is None
    with pytest.raises(Exception, match="not attached"):
        fit.predict({})
    with pytest.raises(Exception, match="guide function"):  # the guide it names: not imported
        load(attacker, model=normal_mean, trusted=True).log_evidence(num_samples=100)
    assert main(["show", str(attacker), "--trusted"]) == 0
    assert main(["show", str(attacker)]) == 2  # refused, one line, no traceback
    assert not bait.exists() and BAIT not in sys.modules


def test_a_changed_value_never_loads_silently(saved, tmp_path):
    original = load(saved).draws("mu")
    forged = _forge(saved, tmp_path / "shifted.nc", scale=100.0)
    with pytest.raises(UntrustedFileError):
        load(forged)
    shifted = load(forged, trusted=True).draws("mu")  # the user said they trust it
    np.testing.assert_allclose(shifted, 100.0 * original)


def test_saving_signs_with_the_users_key_and_a_shipped_story_comes_from_the_registry(
        tmp_path):
    fit = infer(normal_mean, method="svi", guide="meanfield", restarts=1, progress=False)
    loaded = load(fit.save(tmp_path / "own.nc"))
    assert loaded.model is normal_mean  # the registry's own, compared by name and path
    other_key = tmp_path / "other.key"
    other_key.write_bytes(b"k" * 32)
    with pytest.raises(UntrustedFileError):
        load(tmp_path / "own.nc", key=other_key)
    assert load(fit.save(tmp_path / "theirs.nc", key=other_key), key=other_key).model \
        is normal_mean


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attribute=st.sampled_from(["model_path", "guide_path", "model", "model_module",
                                  "method", "guide", "options", "info"]),
       value=st.one_of(st.just(f"{BAIT}:story"), st.just(BAIT), st.text(max_size=30)),
       scale=st.sampled_from([1.0, -1.0, 1.5, 1e6]),
       key=st.one_of(st.none(), st.binary(min_size=16, max_size=32)))
def test_forged_files_never_run_code_nor_load_silently(saved, bait, tmp_path, attribute,
                                                         value, scale, key):
    forged = _forge(saved, tmp_path / "hypothesis.nc", {attribute: value}, scale, key)
    with pytest.raises(UntrustedFileError):
        load(forged)
    try:
        load(forged, trusted=True)
    except (ValueError, KeyError):  # a forged method or option may not read back
        pass
    assert not bait.exists() and BAIT not in sys.modules


def test_a_forged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    infer(normal_mean, method="svi", guide=normal_mean_guide, steps=20, checkpoint=str(path),
          progress=False)
    assert load_checkpoint(path)["format"] == FORMAT
    raw = path.read_bytes()
    header, digest, signature, payload = raw.split(b"\n", 3)
    # re-hashed by an attacker, without the key: the signature no longer verifies
    forged = tmp_path / "forged.ckpt"
    forged.write_bytes(b"\n".join([header, digest, b"0" * 64, payload]))
    with pytest.raises(CheckpointError, match="not signed with your key"):
        load_checkpoint(forged)
    assert load_checkpoint(forged, trusted=True)["format"] == FORMAT
    with pytest.raises(CheckpointError, match="resume_trusted=True"):
        infer(normal_mean, method="svi", guide=normal_mean_guide, steps=40,
              resume=str(forged), progress=False)


def test_a_forged_calibration_store_is_refused(tmp_path):
    store = tmp_path / "sbc.jsonl"
    calibrate(normal_mean, "nuts", replicates=3, store=store, processes=1, progress=False,
              chains=1, warmup=100, draws=200)
    lines = store.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["record"]["rank"] = {name: 0 for name in entry["record"]["rank"]}  # a forged rank
    store.write_text("\n".join([lines[0], json.dumps(entry), *lines[2:]]) + "\n")
    with pytest.raises(UntrustedFileError, match="not signed with your key"):
        calibrate(normal_mean, "nuts", replicates=3, store=store, processes=1,
                  progress=False, chains=1, warmup=100, draws=200)


def test_a_users_story_is_attached_by_the_user_in_a_fresh_process(tmp_path):
    """Nothing is imported from the file: the user names the story (--model) they trust."""
    (tmp_path / "my_stories.py").write_text(textwrap.dedent("""
        import pyro, pyro.distributions as dist
        from ppl_notes import model

        @model(observed="y", data={"t": [0.5, 1.0, 1.5], "y": [0.3, 1.2, 0.8]})
        def level(t, y=None):
            slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
            with pyro.plate("n", len(t)):
                pyro.sample("y", dist.Normal(slope * t, 1.0), obs=y)
    """))
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("ignore")
        sys.path.insert(0, ".")
        from my_stories import level
        from ppl_notes import infer
        infer(level, method="svi", restarts=1, progress=False).save("level.nc")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-m", "ppl_notes.cli", "predict", "level.nc",
                            "--set", "t=2.0", "--model", "my_stories:level"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "y: mean" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "ppl_notes.cli", "predict", "level.nc",
                              "--set", "t=2.0"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--model module:attr" in refused.stderr


def _signed_copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def test_a_coordinates_attribute_cannot_hide_signed_variables(saved, tmp_path):
    """Issue 41 item 5: the attacker adds a ``coordinates`` attribute to a signed file.

    xarray's decoding turns the variables it names into coordinates, which the content
    hash (of the decoded tree) did not see: they vanished from summary(), and a
    ``diverging`` stat hid eight schools' divergences. No value or hash changes here.
    """
    import h5py

    forged = _signed_copy(saved, tmp_path / "coordinates.nc")
    with h5py.File(forged, "r+") as handle:
        handle["sample_stats/log_p"].attrs["coordinates"] = "log_q"
    with pytest.raises(DataError, match=r"\['/sample_stats/log_q'\] coordinates"):
        load(forged)
    with pytest.raises(DataError, match="coordinates"):
        load(forged, trusted=True)  # trusting the author does not make the file ours
    assert main(["show", str(forged)]) == 2


def test_a_tiny_file_declaring_huge_values_is_refused_before_reading(saved, tmp_path):
    """Issue 41 item 8: a few hundred KB that declare 1e8 elements of fill value."""
    forged = _signed_copy(saved, tmp_path / "huge.nc")
    with h5netcdf.File(forged, "r+") as handle:
        group = handle["posterior"]
        group.dimensions["huge"] = 100_000_000
        group.create_variable("filler", ("huge",), dtype="f8", fillvalue=0.0)
    assert forged.stat().st_size < 5 * 2**20
    with pytest.raises(DataError, match="declares 763 MiB of values"):
        load(forged, trusted=True)


def _small_calibration(store, seed=0, replicates=2):
    return calibrate(normal_mean, "nuts", replicates=replicates, store=store, processes=1,
                     progress=False, seed=seed, chains=1, warmup=50, draws=100)


def test_lines_of_one_calibration_store_are_worthless_in_another(tmp_path):
    """Issue 41 item 6: one store's header, another's lines, each line validly signed.

    A mean-field store's header followed by a NUTS store's lines read as "calibrated";
    every line now carries the digest of its store's header under its signature.
    """
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    _small_calibration(ours, seed=0)
    _small_calibration(theirs, seed=1)
    spliced = tmp_path / "spliced.jsonl"
    spliced.write_text("\n".join([ours.read_text().splitlines()[0],
                                  *theirs.read_text().splitlines()[1:]]) + "\n")
    for trusted in (False, True):  # trusting the author does not make the lines ours
        with pytest.raises(CheckpointError, match="belongs to another calibration"):
            calibrate(normal_mean, "nuts", replicates=2, store=spliced, processes=1,
                      progress=False, seed=0, trusted=trusted, chains=1, warmup=50, draws=100)


def test_a_store_cut_mid_line_is_continued_on_a_line_of_its_own(tmp_path):
    """Issue 41 item 13: the next record was appended onto the partial line, and lost."""
    store = tmp_path / "cut.jsonl"
    _small_calibration(store, replicates=2)
    text = store.read_text()
    store.write_text(text[:-40])  # killed while writing replicate 1's line
    _small_calibration(store, replicates=3)  # redoes replicate 1, adds 2
    lines = store.read_text().splitlines()
    assert len(lines) == 5  # header, replicate 0, the cut line, replicates 1 and 2
    assert all(json.loads(line)["record"] for i, line in enumerate(lines) if i != 2)
    # a third run finds all three replicates in the store and runs none
    calls = []
    monkey = pytest.MonkeyPatch()
    import ppl_notes.calibration as calibration

    monkey.setattr(calibration, "_run", lambda *args, **kwargs: calls.append(args))
    try:
        assert _small_calibration(store, replicates=3) is not None
    finally:
        monkey.undo()
    assert calls == []
