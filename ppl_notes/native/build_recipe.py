"""How the C sources are compiled: one command line, shared by install and first use.

This module imports nothing from the package or torch: ``setup.py`` runs it by path
when ``pip install`` builds the libraries with the package, and
:mod:`~ppl_notes.native.loader` when a library is built at first use instead.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

#: Portable optimisation only (no ``-march=native``: a cache directory may be shared by
#: machines with other CPUs); ``-ffp-contract=off`` keeps ``a * b + c`` unfused, as torch
#: rounds it, also where fused multiply-add is in the base instruction set (ARM) and
#: under Clang, which fuses by default.
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off")
#: GCC's vectoriser with runtime alias checks: the tape's maps run 1.6x faster (earnings:
#: 110 -> 70 us a call) for 0.3 s more compiling, where -O3 takes 2 s more. A compiler
#: that refuses the flag builds with FLAGS alone.
VECTORISE = ("-fvect-cost-model=dynamic",)
#: The C sources, beside this file.
SOURCES = ("tape.c", "trajectory.c")


def command(compiler: str, source: Path, target: Path, vectorise: bool = True) -> list[str]:
    """The compiler's command line that builds ``source`` into the library ``target``."""
    extra = VECTORISE if vectorise else ()
    return [compiler, *FLAGS, *extra, "-o", str(target), str(source), "-lm"]


def packaged_name(source: Path) -> str:
    """The file name of ``source``'s library as ``pip install`` builds it into the package.

    The name holds a hash of the source, so an edited source (an editable install)
    never loads the library of an older one, and the interpreter's platform tag
    (``EXT_SUFFIX``: ``.cpython-312-x86_64-linux-gnu.so``), so one built for another
    machine is never loaded.
    """
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return f"{source.stem}_{digest}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
