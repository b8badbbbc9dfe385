"""Build the package's C libraries (the tape interpreter, the NUTS transitions) with it.

The metadata is in setup.cfg. The libraries are plain shared libraries that
``ctypes`` loads (no Python module inside); built here they cost nothing at first use.
Where no C compiler works, the install goes on without them: the package then compiles
them at first use, or runs without them (``ppl_notes.native.loader``).
"""

import hashlib
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "ppl_notes" / "native"
RECIPE = runpy.run_path(str(NATIVE / "build_recipe.py"))


class BuildNativeLibraries(build_ext):
    """Compile each C source with the package's own command line, not as a module."""

    def build_extension(self, ext):
        """Compile ``ext``'s one source; a failure is said, and the install goes on."""
        source = Path(ext.sources[0])
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            print(f"ppl_notes: no C compiler; {source.name} is compiled at first use",
                  file=sys.stderr)
            return
        for vectorise in (True, False):
            done = subprocess.run(RECIPE["command"](compiler, source, target, vectorise),
                                  capture_output=True, text=True)
            if done.returncode == 0:
                # the loader checks the library against it before loading it
                digest = hashlib.sha256(target.read_bytes()).hexdigest()
                target.with_name(target.name + ".sha256").write_text(digest + "\n")
                return
        print(f"ppl_notes: compiling {source.name} failed ({done.stderr.strip()[:300]}); "
              "it is compiled at first use", file=sys.stderr)

    def copy_extensions_to_source(self):
        """An editable install's copies, each with its SHA-256 manifest beside it."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            package = ".".join(fullname.split(".")[:-1])
            copied = Path(build_py.get_package_dir(package)) / Path(
                self.get_ext_filename(fullname)).name
            if copied.exists():
                digest = hashlib.sha256(copied.read_bytes()).hexdigest()
                copied.with_name(copied.name + ".sha256").write_text(digest + "\n")

    def get_export_symbols(self, ext):
        """None: there is no ``PyInit_`` function, as ``ctypes`` loads the library."""
        return []  # no PyInit_ function: ctypes loads the library


def _libraries():
    libraries = []
    for name in RECIPE["SOURCES"]:
        source = NATIVE / name
        stem = RECIPE["packaged_name"](source).split(".")[0]
        libraries.append(Extension(f"ppl_notes.native.{stem}",
                                   sources=[str(source.relative_to(HERE))]))
    return libraries


setup(ext_modules=_libraries(), cmdclass={"build_ext": BuildNativeLibraries})
