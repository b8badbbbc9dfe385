import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

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


def test_a_fit_stopped_short_is_said(capsys):
    """The shipped guide of ``normal_mean`` at 300 Adam steps: its ELBO is still rising.

    Before, its sd came out far from the closed form's and nothing was said: the run
    prints the finding under its table, and ``findings()`` holds it.
    """
    from ppl_notes import infer
    from ppl_notes.guides.conjugate import normal_mean_guide
    from ppl_notes.models.conjugate import normal_mean

    assert main(["run", "normal_mean", "--method", "svi", "--set", "steps=300",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "warning: 1 of 1 fit(s) stopped at the step cap (300 steps) with the ELBO " \
           "still moving" in printed
    with pytest.warns(UserWarning, match="stopped at the step cap"):
        fit = infer(normal_mean, method="svi", guide=normal_mean_guide, steps=300,
                    progress=False)
    assert [f.check for f in fit.findings()].count("stopped_short") == 1
    assert not fit.check()


def test_user_mistakes_print_one_line(capsys):
    assert main(["run", "normal_mean", "--set", "stepz=3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppl-notes: method 'svi' has no option 'stepz'")
    assert main(["run", "unicorns"]) == 2


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main job, as a user runs it: ``ppl-notes compare heights --out DIR``.

    Run once per test session, not once per xdist worker: the first worker to get here
    runs it under a file lock in the session's shared temporary folder, and the other
    reads its output (about a minute of worker time saved).
    """
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder all workers of this session share
    out, printed = shared / "main_job_heights", shared / "main_job_heights.stdout"
    with FileLock(str(shared / "main_job_heights.lock")):
        if not printed.exists():
            result = subprocess.run(
                [sys.executable, "-m", "ppl_notes.cli", "compare", "heights", "--no-progress",
                 "--out", str(out)],
                capture_output=True, text=True, timeout=600, check=True,
            )
            printed.write_text(result.stdout)
    return printed.read_text(), out


def test_compare_heights_is_the_main_job(main_job):
    """SVI (full-rank guide) and NUTS on Galton's heights: tables, figures, a page, results."""
    out, folder = main_job
    assert "smd" in out and "sd_ratio" in out and "svi (AutoMultivariateNormal)" in out
    assert "P(taller component | height=180 cm)" in out
    assert "agreement with recorded gender: 0.8" in out
    for name in ("parameters.csv", "posteriors.csv", "warnings.csv", "loo.csv", "report.html",
                 "marginals.png", "forest.png", "elbo.png", "trace.png", "rank.png", "ppc.png",
                 "svi.nc", "nuts.nc"):
        assert (folder / name).exists(), name


def test_heights_vi_means_agree_with_nuts_within_a_tenth_of_a_posterior_sd(main_job):
    """The issue's bar: |mean_VI - mean_NUTS| < 0.1 posterior sd for every parameter.

    NUTS's mean is itself an estimate: its Monte Carlo error is sd / sqrt(ESS), and its
    bulk ESS for the heights' mus falls to about 400 on some seeds (a 4-seed spread of
    0.11 sd in mu[1]'s mean, measured); VI's 4000 draws add sd_VI / sqrt(4000). The
    observed difference is held to the bar plus 3 such standard errors, computed from
    this run's own ESS: a true difference at the bar fails with probability 0.13%. The
    full-rank Gaussian's own shift is about 0.09-0.10 sd here (against the mean of 4 NUTS
    seeds): the family's KL optimum on a skewed posterior, docs/vi.md.
    """
    import arviz_stats  # noqa: F401 - registers the .azstats accessor
    import xarray as xr

    _, folder = main_job
    table = pd.read_csv(folder / "parameters.csv", index_col=[0, 1])
    vi = table.xs("svi (AutoMultivariateNormal)", level="posterior")
    assert len(vi) == 6  # alpha, mu, sigma: two components each
    draws = xr.open_datatree(folder / "nuts.nc")["posterior"].to_dataset()
    for parameter, row in vi.iterrows():
        site, index = parameter[:-1].split("[")
        ess = float(draws[site].isel({draws[site].dims[-1]: int(index)})
                    .azstats.ess(method="bulk"))
        error = math.sqrt(1 / ess + row["sd_ratio"] ** 2 / 4000)  # in NUTS sds
        assert abs(row["smd"]) < 0.1 + 3 * error, (parameter, row["smd"], ess)
    nuts = pd.read_csv(folder / "posteriors.csv", index_col=0).loc["nuts"]
    assert nuts["divergences"] == 0 and nuts["max_r_hat"] < 1.01


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(main_job):
    """The page opens in a real browser with every figure decoded and every table drawn."""
    if _chromium() is None:
        pytest.skip("no chromium on PATH: .ci/run installs Debian's chromium with apt-get "
                    "(as root); elsewhere run `apt-get install chromium`")
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e .[test]")
    _, folder = main_job
    page_path = (folder / "report.html").resolve()
    figures = len(list(folder.glob("*.png")))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=_chromium(), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            failed_requests = []
            page.on("requestfailed", lambda request: failed_requests.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate(
                "() => [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])")
            headings = page.locator("h2").all_inner_texts()
            tables = page.locator("table").count()
            page.screenshot(path=str(folder / "report_screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) == figures
    assert all(complete and width > 100 for _, complete, width in images), images
    assert {"Warnings", "Posteriors", "Parameters", "Figures", "Run settings",
            "Versions"} <= set(headings)
    assert tables >= 3
    assert failed_requests == []  # self-contained: nothing fetched


def test_two_runs_cannot_write_one_out_folder_at_once(tmp_path, capsys):
    """Issue 41 item 11: both reported success, and only the later run's files remained."""
    import time

    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "ppl_notes.cli", "compare", "normal_mean",
                              "--no-progress", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = out / ".ppl-notes.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not (
            lock.exists() and lock.read_text().startswith("pid")):
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could try"
    assert main(["compare", "normal_mean", "--no-progress", "--out", str(out)]) == 2
    assert "is being written by another ppl-notes run (pid" in capsys.readouterr().err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
