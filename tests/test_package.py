"""The package surface: lazy public API, typed marker, and a plugin import that stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest_saecheck


def test_every_public_name_resolves():
    for name in pytest_saecheck.__all__:
        assert getattr(pytest_saecheck, name) is not None, name
    assert set(pytest_saecheck.__all__) <= set(dir(pytest_saecheck))


def test_unknown_attribute_is_an_attribute_error():
    try:
        pytest_saecheck.does_not_exist  # noqa: B018
    except AttributeError as error:
        assert "does_not_exist" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_plugin_import_does_not_import_torch():
    code = (
        "import sys, pytest_saecheck, pytest_saecheck.plugin, pytest_saecheck.demo; "
        "heavy = [m for m in ('torch', 'transformer_lens', 'sae_lens', 'numpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_py_typed_is_shipped():
    from importlib.resources import files

    assert files("pytest_saecheck").joinpath("py.typed").is_file()
