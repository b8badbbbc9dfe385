"""The VI layer: what fits a variational family, below the ``svi`` and ``pathfinder`` menus.

* on the potential: :mod:`~ppl_notes.vi.gaussian_family` (the Gaussians and their
  autoguides), :mod:`~ppl_notes.vi.gaussian_vi` (natural-gradient Newton VI),
  :mod:`~ppl_notes.vi.fixed_draws` (DADVI), :mod:`~ppl_notes.vi.lbfgs_paths`
  (Pathfinder's L-BFGS paths), :mod:`~ppl_notes.vi.laplace_start` and
  :mod:`~ppl_notes.vi.potential_svi`, which runs them with restarts in lockstep;
* Pyro's loop for guides written by hand: :mod:`~ppl_notes.vi.pyro_loop`,
  :mod:`~ppl_notes.vi.compiled_svi` (the compiled ELBO step), :mod:`~ppl_notes.vi.stl`,
  :mod:`~ppl_notes.vi.guide_checks`, :mod:`~ppl_notes.vi.checkpoint`,
  :mod:`~ppl_notes.vi.data_parallel`;
* what both share: :mod:`~ppl_notes.vi.convergence` (the stopping rule),
  :mod:`~ppl_notes.vi.guide_distance`, :mod:`~ppl_notes.vi.restarts`.
"""
