"""The tested environment is the locked one: every pin of requirements.lock is what is
installed, and the lock pins every requirement of setup.cfg (so that ``make`` installing
the lock, then the package with ``--no-deps``, leaves nothing to resolve)."""

import configparser
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if found:
            pins[canonicalize_name(found.group(1).split("[")[0])] = found.group(2)
    return pins


def test_every_locked_package_is_installed_at_its_locked_version():
    pins = _pins()
    assert len(pins) > 50
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    if wrong and not (ROOT / ".venv").exists():
        pytest.skip("not in the project's environment (make env builds it from the lock)")
    assert not wrong, f"locked vs installed: {wrong}; run `make env` (or `make lock` on purpose)"


def test_the_lock_pins_every_requirement_of_setup_cfg_within_its_bounds():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    pins = _pins()
    for line in config["options"]["install_requires"].strip().splitlines():
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is required by setup.cfg but not locked"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in the lock is outside setup.cfg's {requirement.specifier}")
