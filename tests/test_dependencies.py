"""The dependencies the suite runs with are the ones a user installs: every runtime and test
dependency is pinned exactly (requirements*.txt, read by setup.py), and the installed versions
equal the pins -- so a release the suite never ran cannot reach a user through a range.

Behaviours the project relies on in a dependency are guarded where they are used (for example
the cache keyword transformers passes to the GateSWA remote code: tests/test_export.py).
"""

import os
import re
from importlib.metadata import requires, version

import pytest

from conftest import ROOT

FILES = ("requirements.txt", "requirements-test.txt")


def _pins(name):
    lines = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, name))]
    return [line for line in lines if line]


@pytest.mark.parametrize("name", FILES)
def test_every_dependency_is_pinned_exactly(name):
    pins = _pins(name)
    assert pins
    for line in pins:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", line), f"{name}: {line!r} is not an exact pin"


@pytest.mark.parametrize("name", FILES)
def test_installed_versions_are_the_pinned_ones(name):
    for line in _pins(name):
        dist, pinned = line.split("==")
        assert version(dist) == pinned, f"{dist} {version(dist)} installed, {pinned} pinned: run bash launch/install.sh"


def test_the_installed_package_declares_the_pins():
    declared = {r.split(";")[0].replace(" ", "") for r in requires("megatron-attnedit") or []}
    runtime = set(_pins("requirements.txt"))
    assert runtime <= declared, runtime - declared
    # nothing unpinned besides the optional extras' own (gpu / npu: not installable here)
    loose = {r for r in declared if "==" not in r and not r.startswith(("transformer-engine", "torch_npu", "torch-npu"))}
    assert not loose, loose
