import os

import numpy as np
import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


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
