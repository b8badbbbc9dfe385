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
