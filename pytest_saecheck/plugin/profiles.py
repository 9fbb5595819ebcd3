"""Profiles: named sets of saecheck settings in the project's configuration file, chosen with ``--saecheck-profile``.

A smoke run and a full run differ in a handful of settings (``n_tokens``, ``batch_size``, ``device``...). Rather
than a list of ``--saecheck-override`` flags in every CI job, name the set once, next to the ini keys it refines,
in the file pytest read its configuration from (``config.inipath``):

- ``pyproject.toml``: a table per profile, ``[tool.saecheck.profiles.smoke]``, with TOML values (``n_tokens =
  2048``, ``exclude_token_ids = [50256]``). ``tool.<name>`` is where a tool's own tables live in pyproject.toml;
  pytest's ``[tool.pytest.ini_options]`` holds ini-style keys only, so a nested table cannot go there;
- ``pytest.ini``, ``tox.ini``, ``setup.cfg``: a section per profile, ``[saecheck:profile smoke]``, with the
  values written as in ini keys (``n_tokens = 2048``).

Keys are setting names (:data:`~pytest_saecheck.plugin.settings.SETTINGS`, without the ``saecheck_`` prefix).
A profile's values take their place in the precedence as **marker > command line > profile > ini** (and
``--saecheck-override`` above all): a profile refines the project's ini defaults for one kind of run, a marker
still says what one test needs. Relative paths in a profile resolve against the configuration file's directory.
The profile in use is named in the terminal header, the JSON result (``run.profile``) and the HTML report.

Imports nothing heavy (``tomllib``, or ``tomli`` on Python 3.10, which pytest itself requires there).
"""

from __future__ import annotations

import configparser
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pytest_saecheck.errors import ConfigError

PROFILE_OPTION = "--saecheck-profile"
INI_SECTION_PREFIX = "saecheck:profile "
TOML_TABLE = ("tool", "saecheck", "profiles")

_PROFILE_KEY = pytest.StashKey["tuple[str, dict[str, Any]] | None"]()


def add_option(parser: pytest.Parser) -> None:
    """Register ``--saecheck-profile NAME`` (called from ``pytest_addoption``)."""
    group = parser.getgroup("saecheck", "sparse autoencoder acceptance tests (pytest-saecheck)")
    group.addoption(
        PROFILE_OPTION,
        dest="saecheck_profile",
        default=None,
        metavar="NAME",
        help="use the named set of saecheck settings from the configuration file ([tool.saecheck.profiles.NAME] "
        "in pyproject.toml, [saecheck:profile NAME] in pytest.ini/tox.ini/setup.cfg); precedence: marker > "
        "command line > profile > ini",
    )


def read_profiles(path: Path | None) -> dict[str, dict[str, Any]]:
    """Every profile defined in the configuration file ``path`` (``{}`` without one), by name.

    Raises :class:`ConfigError` for a file that cannot be parsed or a profile that is not a table/section of
    ``key = value`` settings.
    """
    if path is None or not path.is_file():
        return {}
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
        try:
            data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"could not read profiles from {str(path)!r}: {error}") from None
        for key in TOML_TABLE:
            data = data.get(key, {}) if isinstance(data, Mapping) else {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{str(path)!r}: [{'.'.join(TOML_TABLE)}] must be a table of profile tables")
        profiles = {}
        for name, table in data.items():
            if not isinstance(table, Mapping):
                raise ConfigError(
                    f"{str(path)!r}: [{'.'.join(TOML_TABLE)}.{name}] must be a table of settings "
                    f"(e.g. n_tokens = 2048), got {type(table).__name__}"
                )
            profiles[str(name)] = dict(table)
        return profiles
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as error:
        raise ConfigError(f"could not read profiles from {str(path)!r}: {error}") from None
    return {
        section[len(INI_SECTION_PREFIX) :].strip(): dict(parser.items(section))
        for section in parser.sections()
        if section.startswith(INI_SECTION_PREFIX)
    }


def where(config: pytest.Config, name: str) -> str:
    """Where profile ``name`` is written in the configuration file (for messages)."""
    path = config.inipath
    if path is not None and path.suffix == ".toml":
        return f"[{'.'.join(TOML_TABLE)}.{name}] in {path.name}"
    return f"[{INI_SECTION_PREFIX}{name}] in {path.name if path is not None else 'the ini file'}"


def selected(config: pytest.Config) -> tuple[str, dict[str, Any]] | None:
    """The profile chosen with ``--saecheck-profile``: ``(name, raw values by setting name)``; None without one.

    Read once per run. Raises :class:`ConfigError` for a name the configuration file does not define (listing
    the ones it does); the settings check the keys (:func:`pytest_saecheck.plugin.settings.check_key`, with
    :func:`where` naming the profile).
    """
    if _PROFILE_KEY in config.stash:
        return config.stash[_PROFILE_KEY]
    name = config.getoption("saecheck_profile", default=None)
    chosen: tuple[str, dict[str, Any]] | None = None
    if name:
        path = config.inipath
        profiles = read_profiles(Path(path) if path is not None else None)
        if name not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(
                f"{PROFILE_OPTION} {name}: no such profile in {path or 'the configuration (no ini file was found)'} "
                f"(profiles defined: {known}); define it as {where(config, name)}"
            )
        chosen = (name, profiles[name])
    config.stash[_PROFILE_KEY] = chosen
    return chosen


def profile_name(config: pytest.Config) -> str | None:
    """The name of the profile in use, or None."""
    chosen = selected(config)
    return None if chosen is None else chosen[0]
