"""The MCMC layer: NUTS on a flat vector, in small pieces.

The shape is that of NumPyro's ``hmc_util`` and BlackJAX's kernels.

* :mod:`~ppl_notes.mcmc.kernel`: one transition (the Python specification of the C one);
* :mod:`~ppl_notes.mcmc.metrics`: the mass matrix and its estimators;
* :mod:`~ppl_notes.mcmc.adaptation`: step size and metric adaptation in warmup windows;
* :mod:`~ppl_notes.mcmc.driver`: chains as generators, driven in lockstep;
* :mod:`~ppl_notes.mcmc.chains`: chains in this process, in worker processes, or on a
  Dask cluster, with progress bars and Ctrl-C.

The layer sees a potential (a function of a flat vector) and nothing of the story.
"""
