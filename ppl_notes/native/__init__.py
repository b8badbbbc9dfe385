"""The native layer: a story's potential recorded once and run by a C interpreter.

* :mod:`~ppl_notes.native.tape`: the recorder (a torch dispatch mode over one potential
  and gradient call) and the translator into instructions;
* :mod:`~ppl_notes.native.tape_kernels`: which instruction each aten operation becomes;
* :mod:`~ppl_notes.native.arena`: the buffers of a recording, laid out once;
* :mod:`~ppl_notes.native.trajectory`: the NUTS transitions in C, for every chain at once;
* :mod:`~ppl_notes.native.loader` and :mod:`~ppl_notes.native.build_recipe`: how the C
  sources (``tape.c``, ``trajectory.c``) are built with the package, or at first use, and
  loaded.

Nothing here imports the story, the evaluation or the engines: the layer sees torch
functions and flat vectors only.
"""
