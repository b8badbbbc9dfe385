"""Fits on a Dask cluster (ppl_notes._cluster): a scheduler and 2 one-thread workers on
127.0.0.1, started as subprocesses and torn down after (tests/dask_cluster.py)."""

import threading
import time

import numpy as np
import pytest

pytest.importorskip("distributed")
pytestmark = pytest.mark.xdist_group("dask_cluster")  # one cluster for the module's tests

from ppl_notes import calibrate, infer  # noqa: E402
from ppl_notes.errors import OptionError  # noqa: E402
from ppl_notes.models.conjugate import normal_mean  # noqa: E402
from tests.dask_cluster import dask_cluster  # noqa: E402

QUICK_NUTS = {"warmup": 200, "draws": 400}


@pytest.fixture(scope="module")
def cluster():
    with dask_cluster(workers=2) as running:
        yield running


def test_nuts_on_the_conjugate_normal_mean_is_calibrated_on_the_cluster(cluster, tmp_path):
    result = calibrate(normal_mean, "nuts", replicates=100, scheduler=cluster.address,
                       store=tmp_path / "sbc.jsonl", progress=False)
    assert result.ranks.sizes == {"replicate": 100, "parameter": 1}
    # Bonferroni over one parameter: a false alarm has probability 5% by construction,
    # and the seed is fixed, so this is deterministic (KS p-value printed on failure).
    assert result.calibrated, result
    assert (result.ranks["rank"] <= result.ranks["num_draws"]).all()
    assert result.to_arviz()["prior_sbc"]["pit"].shape == (100, 1)


def test_a_deliberately_wrong_fit_is_flagged_on_the_cluster(cluster):
    """Mean-field SVI on a Gaussian with correlation 0.9: q's sds are sqrt(1 - 0.81) of
    the truth's, so the truth ranks in q's tails and SBC must say so."""
    from ppl_notes.models.correlated import gaussian

    result = calibrate(gaussian, "svi", replicates=30, scheduler=cluster.address,
                       store=False, progress=False, guide="meanfield", restarts=1,
                       num_draws=400)
    assert not result.calibrated, result
    # under-dispersed q: PIT values pile up near 0 and 1 (a U shape), yet symmetric,
    # which VSBC's symmetry test sees (Yao et al. 2018)
    pit = result.ranks["pit"].values
    assert ((pit < 0.1) | (pit > 0.9)).mean() > 0.4
    assert (result.vsbc_pvalues > 0.01).all()


def test_chains_on_the_cluster_equal_local_chains_with_the_same_seed(cluster):
    options = dict(method="nuts", chains=3, seed=7, progress=False, **QUICK_NUTS)
    remote = infer(normal_mean, scheduler=cluster.address, **options)
    local = infer(normal_mean, **options)
    np.testing.assert_array_equal(remote.to_arviz()["posterior"]["mu"].values,
                                  local.to_arviz()["posterior"]["mu"].values)


def test_svi_restarts_on_the_cluster_equal_local_restarts(cluster):
    """Each restart a task on the workers; seeds belong to restarts, so the draws are a
    local run's element for element."""
    options = dict(method="svi", restarts=3, seed=3, steps=600, progress=False)
    remote = infer(normal_mean, scheduler=cluster.address, **options)
    local = infer(normal_mean, processes=1, **options)
    assert remote.tree["posterior"].sizes["chain"] == 3
    np.testing.assert_array_equal(remote.to_arviz()["posterior"]["mu"].values,
                                  local.to_arviz()["posterior"]["mu"].values)
    assert [r["restart"] for r in remote.info["restarts"]] == [0, 1, 2]


def test_a_client_object_serves_as_well_as_an_address(cluster):
    import distributed

    with distributed.Client(cluster.address, set_as_default=False) as client:
        result = calibrate(normal_mean, "nuts", replicates=4, scheduler=client, store=False,
                           progress=False, **QUICK_NUTS)
    local = calibrate(normal_mean, "nuts", replicates=4, store=False, processes=1,
                      progress=False, **QUICK_NUTS)
    np.testing.assert_array_equal(result.ranks["rank"].values, local.ranks["rank"].values)


def test_a_scheduler_nobody_answers_at_is_named():
    with pytest.raises(OptionError, match="127.0.0.1:9"):
        calibrate(normal_mean, "nuts", replicates=2, scheduler="tcp://127.0.0.1:9",
                  store=False, progress=False)
    with pytest.raises(OptionError, match="scheduler"):
        infer(normal_mean, method="nuts", scheduler=3, progress=False)
    with pytest.raises(OptionError, match="engine='pyro'"):
        infer(normal_mean, method="nuts", engine="pyro", scheduler="tcp://127.0.0.1:9",
              progress=False)


def test_the_command_line_sends_a_calibration_to_the_scheduler(cluster, capsys):
    from ppl_notes.cli import main

    code = main(["calibrate", "normal_mean", "--replicates", "4", "--scheduler",
                 cluster.address, "--store", "none", "--no-progress", "--set", "warmup=200",
                 "--set", "draws=400"])
    printed = capsys.readouterr().out
    assert "Calibration of 'normal_mean' by nuts: 4 replicates" in printed
    assert code in (0, 1)


def test_a_worker_killed_mid_calibration_loses_nothing(cluster, tmp_path):
    """Last in the module: it leaves the shared cluster with one worker."""
    store = tmp_path / "sbc.jsonl"
    outcome = {}

    def run():
        outcome["result"] = calibrate(normal_mean, "nuts", replicates=8,
                                      scheduler=cluster.address, store=store,
                                      progress=False, **QUICK_NUTS)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        if store.exists() and len(store.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    cluster.workers[0].kill()  # SIGKILL mid-run: its replicate goes to the other worker
    thread.join(timeout=600)
    clean = calibrate(normal_mean, "nuts", replicates=8, store=False, progress=False,
                      **QUICK_NUTS)
    result = outcome["result"]
    assert result.ranks.sizes["replicate"] == 8
    np.testing.assert_array_equal(result.ranks["rank"].values, clean.ranks["rank"].values)
