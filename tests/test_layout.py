"""The test tree never shadows an installed package.

Under pytest's default ``prepend`` import mode the first folder above a test file without an ``__init__.py``
goes on ``sys.path``. ``tests/`` is a package, so that folder is the repository root and every test module
imports as ``tests.<sub>.<module>``; a subfolder that lost its ``__init__.py`` (or a top-level ``tests/*.py``
helper imported by its bare name) would put ``tests/`` itself on ``sys.path`` and hide any installed package
of the same name: transformers 5.25 imports the Hugging Face ``kernels`` package, which ``tests/kernels/``
(now ``tests/_kernels/``, mirroring the package) once hid: every integration test failed on a fresh machine."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _folders(top: str) -> list[str]:
    out = []
    for base, dirs, _ in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        out += [os.path.join(base, d) for d in dirs]
    return out


def test_every_test_folder_is_a_package():
    missing = [os.path.relpath(d, ROOT) for d in [TESTS, *_folders(TESTS)]
               if not os.path.exists(os.path.join(d, "__init__.py"))]
    assert not missing, f"add an __init__.py to {missing}: without one pytest puts its parent on sys.path"


def _installed_names(names: list[str]) -> dict[str, str]:
    """Which of ``names`` an interpreter started outside the checkout imports from somewhere else."""
    code = ("import importlib.util, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: s = importlib.util.find_spec(n)\n"
            "    except Exception: s = None\n"
            "    if s is not None: out[n] = s.origin or str(list(s.submodule_search_locations or []))\n"
            "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-c", code, *names], cwd="/", env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_no_test_folder_is_named_like_an_installed_package():
    """``tests`` itself and every folder under it: none may be importable from outside the checkout (a
    dependency might import it; ``tests/kernels`` hid Hugging Face's ``kernels``, hence ``tests/_kernels``)."""
    names = sorted({"tests", *(os.path.basename(d) for d in _folders(TESTS) if os.path.basename(d).isidentifier())})
    found = {n: where for n, where in _installed_names(names).items() if not where.startswith(TESTS)}
    assert not found, f"test folders named like installed packages (rename them): {found}"


@pytest.mark.parametrize("name", ["_kernels", "layer", "ops", "integrations"])
def test_test_folders_import_under_tests(name):
    """The test folders are ``tests.<name>``; the bare name stays free for whatever is installed."""
    mod = sys.modules.get(f"tests.{name}") or importlib.import_module(f"tests.{name}")
    assert mod.__file__.startswith(TESTS)
    bare = sys.modules.get(name)
    assert bare is None or not (getattr(bare, "__file__", None) or "").startswith(TESTS), \
        f"'{name}' was imported from the test tree: {bare.__file__}"
