import subprocess
import sys

from ppl_notes.cli import main


def test_list_names_every_story(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for story in ("heights", "normal_mean", "beta_bernoulli"):
        assert story in out


def test_run_then_show(tmp_path, capsys):
    path = tmp_path / "fit.nc"
    assert main(["run", "normal_mean", "--method", "svi", "--set", "steps=300",
                 "--no-progress", "--out", str(path)]) == 0
    assert "normal_mean by svi" in capsys.readouterr().out
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "normal_mean by svi" in out and "mu" in out


def test_user_mistakes_print_one_line(capsys):
    assert main(["run", "normal_mean", "--set", "stepz=3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppl-notes: method 'svi' has no option 'stepz'")
    assert main(["run", "unicorns"]) == 2


def test_compare_heights_is_the_main_job(tmp_path):
    """The README's main job, as a user runs it: SVI and NUTS side by side on Galton."""
    result = subprocess.run(
        [sys.executable, "-m", "ppl_notes.cli", "compare", "heights", "--no-progress",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    out = result.stdout
    assert "svi mean" in out and "nuts r_hat" in out
    assert "P(taller component | height=180 cm)" in out
    assert "agreement with recorded gender: 0.8" in out
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "nuts.nc").exists()
