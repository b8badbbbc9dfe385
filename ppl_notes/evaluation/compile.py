"""Capture a value-and-gradient function as one aten graph and compile it with inductor.

Both fast engines (the NUTS potential, the SVI step) differentiate a Pyro computation
once, under :func:`~torch.fx.experimental.proxy_tensor.make_fx`, which records the
forward and backward tensor operations as one FX graph with no Python, Pyro or autograd
left in it. That graph goes straight to inductor (``torch._inductor.compile``, its entry
point for graphs captured without TorchDynamo): there is nothing for Dynamo to trace or
AOTAutograd to differentiate, and each call skips their runtime wrappers (measured:
about half the per-call overhead of ``torch.compile`` on the same graph).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Callable

import pyro
import torch

from ppl_notes.native import tape
from ppl_notes.native.loader import available


def compiler_available() -> bool:
    """Whether inductor's CPU backend can build kernels here (needs a C++ compiler)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def resolve_compiler(requested: str) -> str:
    """The compiler ``requested`` stands for.

    ``auto``: the tape where its library was installed or a C compiler exists (its
    potential falls back to inductor for a story it cannot record, or where the build
    fails), else TorchScript. Only the library or the compiler is looked for: a build
    :func:`~ppl_notes.native.loader.prebuild` started keeps running while the
    potential is recorded.
    """
    if requested != "auto":
        return requested
    if available(tape.SOURCE):
        return "tape"
    return "inductor" if compiler_available() else "torchscript"


def capture(function: Callable, *example_inputs: torch.Tensor, compile: bool = True):
    """``function`` as an aten graph, compiled with inductor when ``compile`` is true.

    The graph is recorded once on ``example_inputs`` with Pyro's validation off (its
    checks read tensor values, which a captured graph cannot) and, when compiled, built
    now rather than inside the first step of a run.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    with warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.simplefilter("ignore")
        graph = make_fx(function)(*example_inputs)
        if not compile:
            return graph
        with _cacheable():
            compiled = _inductor_compile(graph, list(example_inputs))
        compiled(*example_inputs)
    return compiled


def _inductor_compile(graph, example_inputs):
    import torch._inductor
    import torch._inductor.config as inductor_config

    with inductor_config.patch(_vector_isa_settings(inductor_config)):
        return torch._inductor.compile(graph, example_inputs)


def _vector_isa_settings(inductor_config) -> dict:
    """Trust the CPU's flags for the vector instruction set instead of test builds.

    Before its first kernel, inductor compiles and loads a probe program for each vector
    instruction set that ``/proc/cpuinfo`` lists (AVX-512, AVX2, ...) to learn whether the
    C++ compiler supports it: each probe includes ATen's vector headers, and on an empty
    cache they took 5 of the 11 s that eight schools' potential took to compile here
    (measured: 10.9 s against 5.9 s), and about 0.5 s of every later process. Every GCC
    since 4.9 and Clang since 3.9 supports the sets a CPU reports, so the probes only
    confirm what the flags say. A user's ``TORCHINDUCTOR_VEC_ISA_OK`` still decides.
    """
    if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") is not None:
        return {}
    return {"cpp.vec_isa_ok": True}


@contextlib.contextmanager
def _cacheable():
    """Let inductor's FX graph cache serve graphs captured without TorchDynamo.

    Inductor caches a compiled graph on disk (keyed by the graph, its inputs' metadata and
    its configuration) only when the compilation runs in a tracing context whose fake
    mode has a shape environment, which TorchDynamo provides and a bare
    :func:`torch._inductor.compile` does not: without one every run generates and
    loads the kernels' code again (measured: 2.3 s on eight schools, 125 s on the
    posteriordb HMM with an empty cache, against 0.03 s and about 2 s from the cache).
    The shapes stay static: the environment holds no symbols, so it adds no guards.
    The data are the graph's constants, which the cache binds at load time rather
    than baking into the code (tested: a cached graph evaluates new data correctly).
    """
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with tracing(TracingContext(fake_mode)):
        yield
