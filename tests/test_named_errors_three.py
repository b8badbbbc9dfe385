"""Issue 41's raw errors and silent changes, as users meet them: each now a named error,
said before any fit runs, or no error at all where there is none (a reader that left a
pipe)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes import DataError, StoryError, infer, model
from ppl_notes.cli import main


@model(observed="y")
def groups(group, y=None):
    """Varying intercepts: a[group], the group an integer covariate."""
    a = pyro.sample("a", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("n", len(group)):
        pyro.sample("y", dist.Normal(a[group], 1.0), obs=y)


Y = np.array([0.1, 1.0, 2.1, -0.2, 0.9, 2.2])


def test_a_group_index_of_minus_one_is_refused():
    """``pd.factorize`` gives a missing value -1, which torch reads as the last group."""
    group = np.array([0, 1, 2, 0, -1, 2])
    with pytest.raises(DataError, match=r"'group'.*1 negative value.*last group"):
        infer(groups, {"group": group, "y": Y}, method="map", progress=False)


def test_masked_and_complex_data_are_named():
    masked = np.ma.masked_array(Y, mask=[False, False, True, False, False, False])
    with pytest.raises(DataError, match=r"'y' has 1 NaN.*1 masked value"):
        infer(groups, {"group": np.array([0, 1, 2, 0, 1, 2]), "y": masked}, method="map",
              progress=False)
    with pytest.raises(DataError, match=r"'y' are complex numbers"):
        infer(groups, {"group": np.array([0, 1, 2, 0, 1, 2]), "y": Y + 1j}, method="map",
              progress=False)
    unmasked = np.ma.masked_array(Y, mask=False)  # nothing masked: the values as they are
    fit = infer(groups, {"group": np.array([0, 1, 2, 0, 1, 2]), "y": unmasked},
                method="map", progress=False)
    assert fit.draws("a").shape == (1, 3)


def test_a_site_name_with_a_slash_is_refused_before_fitting():
    @model(observed="y", data={"y": torch.tensor(Y)})
    def layered(y=None):
        loc = pyro.sample("layer1/loc", dist.Normal(0.0, 1.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    with pytest.raises(StoryError, match=r"\['layer1/loc'\].*'/'"):
        infer(layered, method="svi", progress=False)


def test_the_command_line_checks_options_and_paths_before_fitting(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", "normal_mean", "--nuts", "chain=2", "--no-progress",
                 "--out", str(out)]) == 2
    assert "method 'nuts' has no option 'chain'" in capsys.readouterr().err
    assert not (out / "svi.nc").exists()  # SVI did not run
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert main(["compare", "normal_mean", "--no-progress", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["run", "normal_mean", "--method", "map", "--no-progress",
                 "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_show_into_a_closed_pipe_is_quiet(tmp_path):
    """``ppl-notes show fit.nc | head -1`` on a fit whose summary outgrows a pipe's buffer."""

    @model(observed="y", data={"y": torch.zeros(4000, dtype=torch.float64)})
    def many(y=None):
        with pyro.plate("n", len(y)):
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    path = infer(many, method="map", progress=False).save(tmp_path / "fit.nc")
    shown = subprocess.run(f"{sys.executable} -m ppl_notes.cli show {path} | head -1",
                           shell=True, capture_output=True, text=True, timeout=300)
    assert shown.stdout.strip()
    assert "BrokenPipe" not in shown.stderr and "Traceback" not in shown.stderr


def test_a_broken_signing_key_is_named(tmp_path, monkeypatch):
    """A key file that is a dangling link, a folder or empty; a relative cache; an empty
    HOME; a key others can read (warned, as ssh warns)."""
    import os

    from ppl_notes._signing import KEY_FILE, signing_key

    monkeypatch.setenv("PPL_NOTES_CACHE", str(tmp_path))
    key = tmp_path / KEY_FILE
    key.symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=r"signing key .* cannot be read"):
        signing_key()
    key.unlink()
    key.mkdir()
    with pytest.raises(DataError, match=r"signing key .* cannot be read"):
        signing_key()
    key.rmdir()
    key.write_bytes(b"")
    with pytest.raises(DataError, match=r"holds 0 bytes"):
        signing_key()
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with pytest.warns(UserWarning, match=r"can be read or changed by others.*chmod 600"):
        signing_key()
    key.chmod(0o600)
    assert len(signing_key()) == 32
    monkeypatch.setenv("PPL_NOTES_CACHE", "relative/cache")
    with pytest.raises(DataError, match=r"PPL_NOTES_CACHE='relative/cache' is a relative"):
        signing_key()
    monkeypatch.delenv("PPL_NOTES_CACHE")
    monkeypatch.setenv("HOME", "")
    with pytest.raises(DataError, match=r"HOME='' is not an absolute path"):
        signing_key()


def test_a_checkpoint_path_that_is_a_folder_is_refused_before_the_first_step(tmp_path):
    from ppl_notes import OptionError
    from ppl_notes.models.conjugate import normal_mean

    with pytest.raises(OptionError, match=r"checkpoint=.* is a folder"):
        infer(normal_mean, method="svi", optimizer="adam", checkpoint=str(tmp_path),
              progress=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OptionError, match=r"cannot be written"):
        infer(normal_mean, method="svi", optimizer="adam",
              checkpoint=str(blocker / "run.ckpt"), progress=False)


def test_map_that_cannot_start_names_map():
    """Not "NUTS cannot start": the message names the method that was asked for."""
    from ppl_notes import InferenceError

    @model(observed="y", data={"y": torch.tensor([1e308, -1e308], dtype=torch.float64)})
    def overflowing(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, 1e-300), obs=y)

    with pytest.raises(InferenceError, match=r"^MAP cannot start"):
        infer(overflowing, method="map", progress=False)


@model(observed="y", data={"x": [0.5, -1.0, 2.0, 0.3], "y": [1.0, 0.0, 1.0, 1.0]})
def logistic_slope(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("n", len(x)):
        pyro.sample("y", dist.Bernoulli(logits=w * x), obs=y)


def test_predict_on_a_value_the_story_cannot_compute_is_one_line(tmp_path, capsys):
    """Issue 41 item 13: ``predict --set height=1e308`` gave a raw ValueError (heights'
    component logits overflow to NaN there)."""
    from ppl_notes.models.heights import model as heights

    path = infer(heights, method="svi", guide="fullrank", restarts=1, num_draws=50,
                 progress=False).save(tmp_path / "heights.nc")
    code = main(["predict", str(path), "--set", "height=1e308", "--draws", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cannot run on the new data (height=[1e+308])" in err


def test_a_model_that_is_not_a_story_is_refused_by_name(tmp_path, capsys):
    """Issue 41 item 13: ``--model os:system`` gave a raw AttributeError."""
    path = infer(logistic_slope, method="svi", restarts=1, progress=False).save(
        tmp_path / "slope.nc")
    code = main(["predict", str(path), "--model", "os:system", "--set", "x=1.0"])
    err = capsys.readouterr().err
    assert code == 2 and "names a builtin_function_or_method, not a story" in err


def test_show_prints_every_number_to_four_significant_digits(tmp_path, capsys):
    """Issue 41 item 13: ``show`` printed the interval [161.03, 165.40] as "160 170"."""
    from ppl_notes import Posterior

    rng = np.random.default_rng(0)
    fit = Posterior.from_draws({"mu": 163.2 + 1.2 * rng.standard_normal((4, 500))},
                               method="nuts", model_name="heights-like")
    path = fit.save(tmp_path / "mu.nc")
    assert main(["show", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("mu"))
    table = fit.summary(round_to="none")
    for column in ("mean", "eti94_lb", "eti94_ub"):
        assert f"{table.loc['mu', column]:.4g}" in row.split()


@model(observed="y", data={"y": [2.0] * 20})
def normal_with_an_sd(y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    s = pyro.sample("s", dist.HalfNormal(5.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, s), obs=y)


def test_map_on_an_unbounded_density_is_a_finding_not_converged():
    """Issue 41 items 4 and 13: MAP where the density rises without bound as a scale goes
    to 0 (all-equal data here; centred hierarchical stories too) reported converged with
    gradients of 1e9-1e17, and returned s = 0.0 silently."""
    from ppl_notes.diagnostics import findings

    fit = infer(normal_with_an_sd, method="map", progress=False)
    assert fit.info["converged"] is False
    assert fit.info["unbounded"]["site"] == "s"
    found = {f.check: f for f in findings(fit)}
    assert "unbounded" in found and "converged" not in found
    assert "stopped on a slope, not at a mode" in found["unbounded"].message


def test_map_at_a_real_mode_is_not_called_unbounded():
    fit = infer(normal_with_an_sd, {"y": [1.0, 2.5, 2.0, 3.1, 1.7]}, method="map",
                progress=False)
    assert fit.info["converged"] is True and "unbounded" not in fit.info
