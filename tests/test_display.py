"""Rich display in notebooks (issue 43 item 4): what Jupyter shows for a Posterior, a
Verdict and a Calibration, rendered in headless Chromium as the report is."""

import shutil

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import xarray as xr

import ppl_notes as pn
from ppl_notes.calibration import Calibration
from ppl_notes.models import get_story

HOSTILE = "<script>document.title='owned'</script>"


@pn.model(observed="y", name=HOSTILE)
def hostile(y):
    mu = pyro.sample("mu<b>", dist.Normal(0.0, 10.0))
    with pyro.plate("rows", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _calibration(calibrated: bool) -> Calibration:
    replicates = 20
    ranks = xr.Dataset(
        {"rank": (("replicate", "parameter"), np.zeros((replicates, 2))),
         "pit": (("replicate", "parameter"), np.linspace(0, 1, replicates * 2).reshape(-1, 2)),
         "truth": (("replicate", "parameter"), np.zeros((replicates, 2))),
         "num_draws": (("replicate",), np.full(replicates, 100))},
        coords={"parameter": ["mu", "sigma"]})
    pvalues = pd.Series({"mu": 0.4, "sigma": 0.3 if calibrated else 0.001})
    return Calibration("svi", "normal_mean", ranks, pvalues, calibrated)


def _rendered(fragments: dict[str, str]) -> dict[str, dict]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH: .ci/run installs Debian's chromium with apt-get")
    playwright = pytest.importorskip("playwright.sync_api")
    seen = {}
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            for name, fragment in fragments.items():
                page.set_content(f"<html><head><title>t</title></head><body>{fragment}"
                                 "</body></html>")
                seen[name] = {"title": page.title(), "text": page.inner_text("body"),
                              "tables": page.locator("table").count(),
                              "scripts": page.locator("script").count(),
                              "rows": page.locator("tr").count()}
        finally:
            browser.close()
    return seen


def test_notebook_display_of_a_posterior_a_verdict_and_a_calibration():
    fit = pn.infer(get_story("normal_mean").load_model(), method="svi", seed=0,
                   progress=False)
    rng = np.random.default_rng(0)
    attacked = pn.infer(hostile, data={"y": rng.normal(size=20)}, method="svi",
                        guide="meanfield", progress=False)
    verdict = fit.check()
    seen = _rendered({"posterior": fit._repr_html_(), "verdict": verdict._repr_html_(),
                      "attacked": attacked._repr_html_(),
                      "calibrated": _calibration(True)._repr_html_(),
                      "not calibrated": _calibration(False)._repr_html_()})
    shown = seen["posterior"]
    assert shown["tables"] == 1 and "mu" in shown["text"] and "mean" in shown["text"]
    assert ("NOT reliable" in shown["text"]) is (not verdict.reliable)
    assert "by svi" in shown["text"]
    assert all(reason.split(":")[0] in seen["verdict"]["text"] for reason in verdict.reasons)
    # a story named like a script shows its name as text, and runs nothing
    assert seen["attacked"]["title"] == "t" and seen["attacked"]["scripts"] == 0
    assert HOSTILE in seen["attacked"]["text"] and "mu<b>" in seen["attacked"]["text"]
    assert "NOT calibrated" in seen["not calibrated"]["text"]
    assert "NOT calibrated" not in seen["calibrated"]["text"]
    assert seen["calibrated"]["rows"] == 3  # the header and one row per parameter


def test_plain_reprs_stay_short():
    fit = pn.infer(get_story("normal_mean").load_model(), method="svi", seed=0,
                   progress=False)
    assert "\n" not in repr(fit) and "\n" not in repr(fit.check())
    assert repr(fit.check()).startswith("<Verdict: ")
    assert "\n" in str(fit.check())  # print() lists the reasons


def test_a_display_that_cannot_be_made_falls_back_to_text():
    class Broken:
        tree = None

        def __repr__(self):
            return "<broken <thing>>"

    from ppl_notes.display import posterior_html

    shown = posterior_html(Broken())
    assert "&lt;broken &lt;thing&gt;&gt;" in shown and "no rich display" in shown
