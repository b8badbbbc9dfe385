"""Native libraries are verified before they are loaded (issue 41 item 7).

A cached library cut short crashed every NUTS run with SIGBUS (exit 135, no message) and
was never rebuilt; one planted under the expected name ran its constructor at load.
Each case runs the loader in a fresh process, as a user's next run would, with its own
cache folder and ``$CC`` set (so that the cache, not the install's library, is used).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ppl_notes.native import loader

SOURCE = Path(loader.__file__).with_name("trajectory.c")
COMPILER = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler")

LOAD = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ppl_notes.native import loader
    source = Path(loader.__file__).with_name("trajectory.c")
    library = loader.build(source, "NUTS transitions")
    print("loaded" if library is not None else "fallback")
    print(loader._target(source, loader.compiler()))
""")


def _load(cache: Path) -> tuple[str, Path, str]:
    environment = {**os.environ, "PPL_NOTES_CACHE": str(cache), "CC": COMPILER}
    done = subprocess.run([sys.executable, "-c", LOAD], env=environment, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, target = done.stdout.split()
    return outcome, Path(target), done.stderr


def test_a_cached_library_cut_short_is_built_again(tmp_path):
    outcome, target, _ = _load(tmp_path)
    assert outcome == "loaded" and target.with_name(target.name + ".sig").exists()
    whole = target.read_bytes()
    target.write_bytes(whole[: len(whole) // 3])
    outcome, again, said = _load(tmp_path)
    assert outcome == "loaded" and again == target
    assert "not the library this user built" in said
    assert len(target.read_bytes()) == len(whole)


def test_a_library_planted_under_the_expected_name_is_never_loaded(tmp_path):
    _, target, _ = _load(tmp_path)
    marker = tmp_path / "CONSTRUCTOR_RAN"
    planted = tmp_path / "planted.c"
    planted.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void run(void) {{
            FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}
        }}
    """))
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(target), str(planted)],
                   check=True)
    outcome, _, said = _load(tmp_path)
    assert outcome == "loaded" and "not the library this user built" in said
    assert not marker.exists()


def test_an_installed_library_that_does_not_match_its_hash_is_not_loaded(
        tmp_path, monkeypatch, caplog):
    built = tmp_path / "built.so"
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lm"],
                   check=True)
    installed = tmp_path / "installed.so"
    installed.write_bytes(built.read_bytes()[:4096])  # cut short after the install
    installed.with_name("installed.so.sha256").write_text(loader._file_digest(built))
    monkeypatch.setattr(loader, "packaged", lambda source: installed)
    monkeypatch.setenv("PPL_NOTES_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="ppl_notes.native.loader"):
        library = loader.build(SOURCE, "NUTS transitions")
    assert library is not None
    assert "do not match the SHA-256" in caplog.text
    assert loader._target(SOURCE, loader.compiler()).exists()  # built into the cache
