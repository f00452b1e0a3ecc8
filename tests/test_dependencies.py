"""The dependencies the suite runs with are the ones a user installs: every runtime and test
dependency is pinned exactly (requirements*.txt, read by setup.py), and the installed versions
equal the pins of the running Python -- so a release the suite never ran cannot reach a user
through a range.

Two stacks share the files through environment markers: the primary one (megatron-core 0.19.2 on
Python >= 3.12) and the fallback (0.16.1 on Python 3.11). CI runs this file on both (the whole
suite on 3.12, a smoke subset including this file on 3.11: tests/run_tests.sh), so every pin is
one a CI run installed and tested.

Behaviours the project relies on in a dependency are guarded where they are used (for example
the cache keyword transformers passes to the GateSWA remote code: tests/test_export.py).
"""

import collections
import os
import re
import sys
from importlib.metadata import requires, version

import pytest
from packaging.requirements import Requirement

from conftest import ROOT

FILES = ("requirements.txt", "requirements-test.txt")
PYTHONS = ("3.11", "3.12", "3.13")  # the fallback stack's Python, the primary stack's, and one newer
# the one form of marker the files use: which stack a pin belongs to
MARKER = r'python_version (>=|<) "3\.12"'


def _pins(name):
    lines = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, name))]
    return [Requirement(line) for line in lines if line]


def _applies(req, python):
    return req.marker is None or req.marker.evaluate({"python_version": python})


@pytest.mark.parametrize("name", FILES)
def test_every_dependency_is_pinned_exactly_once_per_python(name):
    pins = _pins(name)
    assert pins
    for req in pins:
        assert re.fullmatch(r"==[0-9][A-Za-z0-9.]*", str(req.specifier)), f"{name}: {req} is not an exact pin"
        assert req.marker is None or re.fullmatch(MARKER, str(req.marker)), f"{name}: {req}: only {MARKER} may choose a stack"
    for python in PYTHONS:
        count = collections.Counter(req.name for req in pins if _applies(req, python))
        assert set(count) == {req.name for req in pins} and max(count.values()) == 1, f"{name} on Python {python}: {count}"


@pytest.mark.parametrize("name", FILES)
def test_installed_versions_are_the_pinned_ones(name):
    python = "%d.%d" % sys.version_info[:2]
    for req in _pins(name):
        if _applies(req, python):
            pinned = str(req.specifier).removeprefix("==")
            assert version(req.name) == pinned, f"{req.name} {version(req.name)} installed, {pinned} pinned: run bash launch/install.sh"


def test_the_installed_package_declares_the_pins():
    declared = {str(Requirement(r)) for r in requires("megatron-attnedit") or []}
    runtime = {str(req) for req in _pins("requirements.txt")}
    assert runtime <= declared, runtime - declared
    # nothing unpinned besides the optional extras' own (gpu / npu: not installable here)
    loose = {r for r in declared if "==" not in r and not r.startswith(("transformer-engine", "torch_npu", "torch-npu"))}
    assert not loose, loose

