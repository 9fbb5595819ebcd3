"""Settings of the saecheck fixtures: one table, read from markers, the command line and ini files.

Every setting ``NAME`` can be given four ways, and the first that is present wins:

1. ``--saecheck-override NAME=VALUE`` on the command line (repeatable): forces a value on every test, for smoke
   runs and full CI runs;
2. the ``@pytest.mark.saecheck(NAME=...)`` marker closest to the test (the test itself, a ``pytest.param``'s
   marks, its class, then the module's ``pytestmark``); markers further out fill in the keys closer ones omit;
3. the command-line option ``--saecheck-NAME`` (underscores become dashes): a default for tests whose markers
   leave the key out (the plugin warns when a marker shadows it);
4. the ini key ``saecheck_NAME``;

and otherwise the default in :data:`SETTINGS`. This module imports nothing heavy (:func:`check_device` imports
torch when it is called).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from pytest_saecheck.errors import ConfigError

MARKER = "saecheck"
_UNSET = object()


class SettingsUsageError(ConfigError, pytest.UsageError):
    """A malformed ``--saecheck-*`` option or ``saecheck_*`` ini value: pytest reports it as a usage error."""


def _text(name: str, value: Any) -> str | None:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(
            f"saecheck setting {name!r} must be a string, got {type(value).__name__} {value!r}; "
            f'write it as {name}="..."'
        )
    value = value.strip()
    return value or None


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"saecheck setting {name!r} must be an integer, got the boolean {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d[\d_]*\s*", value):
        number = int(
            value.strip().replace("_", "")
        )  # a sign is parsed so that "-1" gets the "at least" message
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise ConfigError(
            f"saecheck setting {name!r} must be an integer, got {value!r}; "
            f"write it as a whole number, e.g. {name}=1024 (underscores allowed: 200_000)"
        )
    if number < minimum:
        raise ConfigError(f"saecheck setting {name!r} must be at least {minimum}, got {number}")
    return number


def _optional_positive_int(name: str, value: Any) -> int | None:
    if isinstance(value, str) and value.strip().lower() in ("", "auto", "none"):
        return None
    return _positive_int(name, value)


def _seed(name: str, value: Any) -> int:
    return _positive_int(name, value, minimum=0)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(
        f"saecheck setting {name!r} must be a boolean, got {value!r}; use true/false (or 1/0, yes/no, on/off)"
    )


_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:\d+)?")


def _device(name: str, value: Any) -> str | None:
    text = _text(name, value)
    if text is None or text.lower() == "auto":
        return None
    if not _DEVICE.fullmatch(text):
        raise ConfigError(
            f"saecheck setting {name!r} is not a device: {text!r}; use 'auto', 'cpu', 'cuda', 'cuda:1', 'mps', ..."
        )
    return text


# what people type for a device torch calls something else
_DEVICE_ALIASES: Mapping[str, str] = {
    "gpu": "cuda",
    "nvidia": "cuda",
    "rocm": "cuda",
    "metal": "mps",
    "apple": "mps",
}
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "npu", "xla", "mtia", "meta")


def check_device(name: str, device: str | None) -> None:
    """Check that torch knows the device ``device`` and that this machine has it, at start-up.

    ``device`` is a parsed ``device`` setting (``None``: auto, always fine). Imports torch, so call it from a hook,
    never at import time; the answer is cached per device string.

    Raises:
        ConfigError: an unknown device type (``"gpu"``: did you mean ``"cuda"``?), a device type this machine
            has not got (``cuda`` on a CPU-only machine or build), or an index past the number of visible
            devices (``cuda:3`` with two GPUs).
    """
    if device is None:
        return
    problem = _device_problem(device)
    if problem is not None:
        raise ConfigError(f"saecheck setting {name!r} is {device!r}: {problem}")


@functools.cache
def _device_problem(device: str) -> str | None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        kind = device.split(":", 1)[0]
        guess = _DEVICE_ALIASES.get(kind) or next(
            iter(difflib.get_close_matches(kind, _DEVICE_TYPES, n=1)), None
        )
        hint = f" (did you mean {guess!r}?)" if guess else ""
        return (
            f"torch knows no device type {kind!r}{hint}; use 'auto' (cuda when available, else cpu), 'cpu', "
            "'cuda', 'cuda:1', 'mps', ..."
        )
    kind, index = parsed.type, parsed.index
    if kind in ("cpu", "meta"):
        return None
    if kind == "mps":
        module: Any = getattr(torch.backends, "mps", None)
    else:
        module = getattr(torch, kind, None)  # torch.cuda, torch.xpu, ...: each has is_available()
    is_available = getattr(module, "is_available", None)
    if callable(is_available) and not is_available():
        build = " (this torch is a CPU-only build)" if kind == "cuda" and torch.version.cuda is None else ""
        return (
            f"this machine has no {kind} device available to torch {torch.__version__}{build}; use 'auto' "
            "(cuda when available, else cpu) or 'cpu'"
        )
    count = getattr(getattr(torch, kind, None), "device_count", None)
    if index is not None and callable(count) and index >= count():
        visible = count()
        pinned = (
            "; under pytest-xdist each worker is pinned to one GPU: use 'cuda', or --saecheck-no-gpu-pinning"
            if kind == "cuda" and os.environ.get("PYTEST_XDIST_WORKER")
            else ""
        )
        return (
            f"only {visible} {kind} device{'' if visible == 1 else 's'} visible (indices 0 to {visible - 1}); "
            f"use '{kind}' or an index below {visible}{pinned}"
        )
    return None


DTYPES: Mapping[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}


def _dtype(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str) and str(value).startswith("torch."):
        value = str(value)  # a torch.dtype object
    text = _text(name, value)
    if text is None or text.lower() == "auto":
        return None
    key = text.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(
            f"saecheck setting {name!r} is not a dtype: {text!r}; use one of float32, float16, bfloat16, float64"
        )
    return DTYPES[key]


# Chinchilla (Hoffmann et al. 2022): E = 1.69 nats, gamma = alpha*beta/(alpha+beta) with alpha 0.34, beta 0.28.
# Spelled out here rather than imported from metrics.py, which imports numpy (the plugin imports this module).
CHINCHILLA = (1.69, 0.34 * 0.28 / (0.34 + 0.28))


def _scaling_law(name: str, value: Any) -> tuple[float, float] | None:
    """``(E, gamma)``, ``"E,gamma"``, ``"chinchilla"``, or ``"none"`` (``None``: no compute_fraction)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "chinchilla", "default"):
            return CHINCHILLA
        if text == "none":
            return None
        value = [part for part in re.split(r"[,\s]+", text.strip("()[] ")) if part]
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            irreducible, gamma = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            pass
        else:
            if irreducible >= 0 and gamma > 0:
                return (irreducible, gamma)
    raise ConfigError(
        f"saecheck setting {name!r} must be (E, gamma) with E >= 0 nats and gamma > 0 for L(C) = E + A*C^-gamma, "
        f'"chinchilla" or "none"; got {value!r}, e.g. scaling_law=(1.69, 0.1535) or --saecheck-scaling-law=1.69,0.1535'
    )


UNAVAILABLE_POLICIES = ("skip", "error")


def _unavailable(name: str, value: Any) -> str:
    text = (_text(name, value) or "").lower()
    if text not in UNAVAILABLE_POLICIES:
        raise ConfigError(f"saecheck setting {name!r} must be 'skip' or 'error', got {value!r}")
    return text


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configurable value: its name, parser, default and help text."""

    name: str
    parse: Callable[[str, Any], Any]
    default: Any
    help: str
    metavar: str

    @property
    def option(self) -> str:
        return "--saecheck-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "saecheck_" + self.name

    @property
    def ini(self) -> str:
        return "saecheck_" + self.name


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "model",
        _text,
        None,
        'model under test: a TransformerLens name ("gpt2"), a local Hugging Face model directory, or "demo". '
        "Default: the model named in the SAE's config",
        "SPEC",
    ),
    Setting(
        "sae",
        _text,
        None,
        'SAE under test: an SAE Lens "release/id", a local SAE Lens directory, or "demo/<name>"',
        "SPEC",
    ),
    Setting(
        "tokens",
        _text,
        None,
        'evaluation tokens: a .txt/.jsonl/.parquet/.npy/.pt file, a saved datasets directory, "hf:<dataset>", '
        'or "demo". Default: the SAE\'s training dataset (the demo corpus for demo SAEs)',
        "SOURCE",
    ),
    Setting("n_tokens", _positive_int, 16_384, "number of tokens to evaluate (default 16384)", "N"),
    Setting(
        "context_size",
        _optional_positive_int,
        None,
        "tokens per sequence. Default: the SAE's training context size, else 128",
        "N",
    ),
    Setting("batch_size", _positive_int, 16, "sequences per forward pass (default 16)", "N"),
    Setting(
        "device", _device, None, "device for model and SAE (default: cuda when available, else cpu)", "DEVICE"
    ),
    Setting("dtype", _dtype, None, "dtype for model and SAE (default: float32)", "DTYPE"),
    Setting(
        "exclude_bos", _boolean, True, "leave position 0 (BOS) out of every metric (default true)", "BOOL"
    ),
    Setting(
        "seed", _seed, 0, "seed for token sampling by the demo corpus and custom loaders (default 0)", "N"
    ),
    Setting(
        "scaling_law",
        _scaling_law,
        CHINCHILLA,
        "(E, gamma) of the model family's scaling curve L(C) = E + A*C^-gamma, for compute_fraction: "
        '"E,gamma", "chinchilla" (default: 1.69,0.1535) or "none"',
        "E,GAMMA",
    ),
    Setting(
        "unavailable",
        _unavailable,
        "skip",
        "what a test does when weights or data are not available offline: skip (default) or error",
        "skip|error",
    ),
)

SETTINGS_BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class SAECheckSettings:
    """The resolved settings of one test. Hashable; ``sources`` says where each value came from."""

    model: str | None = None
    sae: str | None = None
    tokens: str | None = None
    n_tokens: int = 16_384
    context_size: int | None = None
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None
    exclude_bos: bool = True
    seed: int = 0
    scaling_law: tuple[float, float] | None = CHINCHILLA
    unavailable: str = "skip"
    sources: Mapping[str, str] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def to_dict(self) -> dict[str, Any]:
        return {setting.name: getattr(self, setting.name) for setting in SETTINGS}


def add_options(parser: pytest.Parser) -> None:
    """Register ``--saecheck-*`` options and ``saecheck_*`` ini keys (called from ``pytest_addoption``)."""
    group = parser.getgroup("saecheck", "sparse autoencoder acceptance tests (pytest-saecheck)")
    for setting in SETTINGS:
        group.addoption(
            setting.option, dest=setting.dest, default=None, metavar=setting.metavar, help=setting.help
        )
        parser.addini(setting.ini, help=setting.help, default=None)
    group.addoption(
        OVERRIDE_OPTION,
        dest="saecheck_override",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="force a setting on every test, over markers, options and ini keys (repeatable), "
        "e.g. --saecheck-override n_tokens=2048 for a smoke run",
    )


OVERRIDE_OPTION = "--saecheck-override"


def _check_key(key: str, where: str) -> None:
    if key not in SETTINGS_BY_NAME:
        close = difflib.get_close_matches(key, list(SETTINGS_BY_NAME), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown key {key!r} in {where}{hint}; known keys: {', '.join(SETTINGS_BY_NAME)}")


def overrides(config: pytest.Config) -> dict[str, str]:
    """The raw ``--saecheck-override NAME=VALUE`` values by setting name (the last one given wins).

    Raises:
        ConfigError: an entry without ``=`` or with an unknown name.
    """
    raw: dict[str, str] = {}
    for entry in config.getoption("saecheck_override", default=None) or ():
        key, equals, value = str(entry).partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise ConfigError(
                f"{OVERRIDE_OPTION} takes NAME=VALUE, got {entry!r}; e.g. {OVERRIDE_OPTION} n_tokens=200000"
            )
        _check_key(key, OVERRIDE_OPTION)
        raw[key] = value
    return raw


def _raw_option(config: pytest.Config, setting: Setting) -> Any:
    return config.getoption(setting.dest, default=None)


def _raw_ini(config: pytest.Config, setting: Setting) -> Any:
    try:
        value = config.getini(setting.ini)
    except ValueError:  # the ini key was not registered (plugin loaded late)
        return None
    if isinstance(value, list):  # pytest returns [] for unset keys of some types
        value = " ".join(value) if value else None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def validate_command_line(config: pytest.Config) -> None:
    """Parse every override, option and ini value once at start-up so that a typo fails the run, not each test.

    A ``device`` is also checked against this machine (:func:`check_device`, which imports torch then).

    Raises:
        SettingsUsageError: the first malformed value, naming the option or ini key and the fix.
    """
    try:
        forced = overrides(config)
    except ConfigError as error:
        raise SettingsUsageError(str(error)) from None
    for setting in SETTINGS:
        for raw, where in (
            (forced.get(setting.name), f"{OVERRIDE_OPTION} {setting.name}"),
            (_raw_option(config, setting), setting.option),
            (_raw_ini(config, setting), setting.ini),
        ):
            if raw is None:
                continue
            try:
                value = setting.parse(setting.name, raw)
                if setting.name == "device":
                    check_device(setting.name, value)
            except ConfigError as error:
                raise SettingsUsageError(f"{where}: {error}") from None


def marker_kwargs(markers: Iterable[pytest.Mark]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge ``saecheck`` markers, closest first, into one dict; also return where each key came from.

    A key given as ``None`` counts as not given at that level.

    Positional arguments and unknown keys raise :class:`ConfigError` naming the known keys.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for mark in markers:
        if mark.args:
            raise ConfigError(
                f"@pytest.mark.saecheck takes keyword arguments only, got positional {mark.args!r}; "
                f'write e.g. @pytest.mark.saecheck(sae="demo/good")'
            )
        for key, value in mark.kwargs.items():
            _check_key(key, "@pytest.mark.saecheck")
            if key not in merged and value is not None:  # None: not set at this level
                merged[key] = value
                origin[key] = "marker"
    return merged, origin


def resolve(config: pytest.Config, markers: Iterable[pytest.Mark] = ()) -> SAECheckSettings:
    """Resolve every setting: ``--saecheck-override`` > marker > command line > ini > default."""
    from_markers, _ = marker_kwargs(markers)
    forced = overrides(config)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        for raw, where, label in (
            (forced.get(setting.name, _UNSET), f"{OVERRIDE_OPTION} {setting.name}", "override"),
            (from_markers.get(setting.name, _UNSET), "@pytest.mark.saecheck", "marker"),
            (_raw_option(config, setting), setting.option, "command line"),
            (_raw_ini(config, setting), setting.ini, "ini"),
        ):
            if raw is _UNSET or raw is None:
                continue
            try:
                values[setting.name] = setting.parse(setting.name, raw)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            sources[setting.name] = label
            break
        else:
            values[setting.name] = setting.default
            sources[setting.name] = "default"
    return SAECheckSettings(**values, sources=sources)


def resolve_for_item(item: pytest.Item) -> SAECheckSettings:
    """The settings of one collected test, from its markers and the run's options."""
    return resolve(item.config, item.iter_markers(MARKER))


def shadowed_options(config: pytest.Config, markers: Iterable[pytest.Mark]) -> dict[str, tuple[Any, Any]]:
    """Command-line options that a test's markers shadow: ``{name: (option value, marker value)}``.

    Only options given on the command line and set to a different value by a marker count (an ini key is a
    project default that markers are meant to refine); a key forced by ``--saecheck-override`` shadows nothing.

    Raises:
        ConfigError: a malformed marker (as :func:`marker_kwargs`).
    """
    from_markers, _ = marker_kwargs(markers)
    forced = overrides(config)
    shadowed: dict[str, tuple[Any, Any]] = {}
    for name, marked in from_markers.items():
        setting = SETTINGS_BY_NAME[name]
        option = _raw_option(config, setting)
        if option is None or name in forced:
            continue
        try:
            differs = setting.parse(name, option) != setting.parse(name, marked)
        except ConfigError:  # the test itself errors on its malformed marker value
            differs = True
        if differs:
            shadowed[name] = (option, marked)
    return shadowed


def short_id(spec: str) -> str:
    """A short name for a model, SAE or token spec in test ids and tables: a local path's last component.

    A spec that is a path (absolute, ``./``, ``../``, ``~``, or an existing file or directory) becomes its last
    component (``/data/runs/run-42/`` -> ``run-42``); anything else (``gpt2``, ``release/id``, ``hf:...``,
    ``demo/good``) is returned as it is.
    """
    text = str(spec)
    path = os.path.expanduser(text)
    path_like = os.path.isabs(path) or text.startswith(("./", "../", ".\\", "..\\", "~"))
    if not path_like and not os.path.exists(path):
        return text
    return os.path.basename(os.path.normpath(path)) or text


def saecheck_param(sae: str | os.PathLike[str], *values: Any, id: str | None = None, **settings: Any) -> Any:
    """One case of a test parametrised over several SAEs: ``pytest.param(*values)`` marked with the SAE.

    ``values`` are the test's own parameters for this SAE (its thresholds); without any, the one value is the
    SAE spec itself (for ``@pytest.mark.parametrize("sae", [...])``). ``settings`` are any other marker keys
    (``model=``, ``tokens=``, ...). The test id defaults to the SAE spec (a local directory's name)::

        @pytest.mark.parametrize("min_score", [
            saecheck_param("demo/good", 0.9),
            saecheck_param("demo/dead", 0.5, id="dead"),
        ])
        def test_ce(saecheck, min_score):
            assert_ce_recovery(saecheck, min_score=min_score)
    """
    spec = _text("sae", sae)
    if spec is None:
        raise ConfigError("saecheck_param needs an SAE spec as its first argument")
    settings["sae"] = spec
    marker_kwargs([pytest.mark.saecheck(**settings).mark])  # unknown keys fail at collection, not per test
    for key, value in settings.items():
        SETTINGS_BY_NAME[key].parse(key, value)
    if id is None:
        id = short_id(spec)
    return pytest.param(*(values or (spec,)), marks=pytest.mark.saecheck(**settings), id=id)
