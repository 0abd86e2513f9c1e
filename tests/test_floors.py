"""The environment the suite runs in is the one ``pyproject.toml`` declares.

Every direct dependency (and every ``dev`` extra the tests need) is installed at a version its range allows.  In the
floors' environment (``.ci/min_versions`` sets ``JSAE_FLOORS=1``) each one is installed at exactly its floor, the
lowest version the range allows, so a green run there shows the declared floors work; a floor that uv could not
install would otherwise go unseen (the suite would pass on a newer version)."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOORS_RUN = os.environ.get("JSAE_FLOORS") == "1"


def _requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(r) for r in (*project["dependencies"], *project["optional-dependencies"]["dev"])]


def floor(req: Requirement) -> Version:
    """The lowest version ``req`` allows: its ``>=`` bound (every dependency of jsae declares one)."""
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    if len(lows) != 1:
        raise ValueError(f"{req}: declare one floor with '>=' in pyproject.toml (the floors' CI job installs it)")
    return lows[0]


def test_floor_reads_the_lower_bound():
    assert floor(Requirement("typer>=0.15.4,<1")) == Version("0.15.4")
    assert floor(Requirement("numpy>=2.0")) == Version("2.0.0")
    with pytest.raises(ValueError, match="declare one floor"):
        floor(Requirement("torch<3"))


@pytest.mark.parametrize("req", _requirements(), ids=lambda r: r.name)
def test_installed_version_is_allowed(req: Requirement):
    try:
        got = Version(version(req.name))
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed: `pip install -e '.[dev]'` (or `bash .ci/setup`)")
    assert req.specifier.contains(got, prereleases=True), f"{req.name} {got} is outside {req}"
    if FLOORS_RUN:  # the public part: torch's floor is installed as 2.13.0+cpu
        assert Version(got.public) == floor(req), f"{req.name} {got} installed where the floor {floor(req)} is tested"
