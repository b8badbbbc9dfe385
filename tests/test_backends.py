"""One table of back ends (issue 29): infer(), calibrate() and the command line read it."""

import inspect

import pytest

from ppl_notes import calibrate, infer
from ppl_notes.cli import main
from ppl_notes.errors import OptionError
from ppl_notes.inference import backends
from ppl_notes.inference.backends import BACKENDS, Backend, Runner
from ppl_notes.models.conjugate import normal_mean


def test_every_backend_is_declared_and_runs_a_function_with_the_protocols_signature():
    expected = list(inspect.signature(Runner.__call__).parameters)[1:]
    for name, backend in BACKENDS.items():
        assert isinstance(backend, Backend) and backend.name == name
        assert backend.summary and backend.options
        parameters = list(inspect.signature(backend.run).parameters)
        assert parameters[:len(expected)] == expected, name


def test_infer_calibrate_and_the_cli_take_their_methods_from_the_table(capsys, monkeypatch):
    with pytest.raises(OptionError, match="unknown method 'gibbs'"):
        infer(normal_mean, method="gibbs")
    points = backends.methods_with(lambda b: not b.draws)
    assert set(points) == {"map", "mle", "em"}
    with pytest.raises(OptionError, match=r"one that gives draws.*'pathfinder'"):
        calibrate(normal_mean, method="map", replicates=2)
    assert main(["methods"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(BACKENDS)
    # a method added to the table is a method of infer() at once
    extra = Backend("nuts_again", BACKENDS["nuts"].run, BACKENDS["nuts"].options, "test")
    monkeypatch.setitem(BACKENDS, "nuts_again", extra)
    fit = infer(normal_mean, method="nuts_again", chains=1, warmup=100, draws=100,
                progress=False)
    assert fit.num_draws == 100


def test_a_guide_goes_only_to_a_method_that_takes_one():
    with pytest.raises(OptionError, match=r"takes no guide; only \['bbvi', 'svi'\]"):
        infer(normal_mean, method="nuts", guide=lambda x=None: None)
    with pytest.raises(OptionError, match="guide='fullrank'"):
        infer(normal_mean, method="map", guide="fullrank")
