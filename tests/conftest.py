import os

import numpy as np
import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One xdist worker per core: each runs torch on one thread, and so do the processes
    # it starts (notebook kernels, NUTS workers). Two workers of two threads each on two
    # cores made OpenMP's spinning threads wait on each other: a VAE fit that takes 8 s
    # alone took 145 s in the suite.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """As Pyro's own conftest: a clean param store, validation on, a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    np.random.seed(0)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


#: The runs that take a minute or more here (measured in CI), by a part of their test id.
#: They start first: xdist hands out tests in collection order, and a long run picked up
#: last leaves the other worker idle while it finishes.
_LONGEST_FIRST = ("hmm_example", "arK-arK", "hmm_markov", "test_cluster.py", "garch",
                  "test_compare_heights_is_the_main_job", "03_mcmc", "test_data_parallel.py",
                  "test_calibration.py")


def pytest_collection_modifyitems(items):
    """Longest runs first (stable otherwise), so that both workers finish together."""
    def rank(item):
        return next((i for i, part in enumerate(_LONGEST_FIRST) if part in item.nodeid),
                    len(_LONGEST_FIRST))

    items.sort(key=rank)
