"""Settings of the saecheck fixtures: one table, read from markers, the command line and ini files.

Every setting ``NAME`` can be given four ways, and the first that is present wins:

1. ``--saecheck-override NAME=VALUE`` on the command line (repeatable): forces a value on every test, for smoke
   runs and full CI runs;
2. the ``@pytest.mark.saecheck(NAME=...)`` marker closest to the test (the test itself, a ``pytest.param``'s
   marks, its class, then the module's ``pytestmark``); markers further out fill in the keys closer ones omit;
3. the command-line option ``--saecheck-NAME`` (underscores become dashes): a default for tests whose markers
   leave the key out (the plugin warns when a marker shadows it);
4. the profile chosen with ``--saecheck-profile NAME`` (:mod:`pytest_saecheck.plugin.profiles`): a named set of
   settings in the configuration file;
5. the ini key ``saecheck_NAME``;

and otherwise the default in :data:`SETTINGS`. This module imports nothing heavy (:func:`check_device` imports
torch when it is called).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pytest_saecheck.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_N_TOKENS,
    WEIGHT_BUDGET_MIB,
)
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.naming import short_id
from pytest_saecheck.scaling import DEFAULT_LAW, PRESETS, ScalingLaw, as_scaling_law

MARKER = "saecheck"
_UNSET = object()


# pytest.UsageError is final to type checkers, but a subclass is what pytest reports as a usage error
class SettingsUsageError(ConfigError, pytest.UsageError):  # type: ignore[misc]
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


def _sae_specs(name: str, value: Any) -> str | tuple[str, ...] | None:
    """One SAE spec, or a list of them (several SAEs spliced jointly, ``splice="joint"``)."""
    if isinstance(value, (list, tuple)):
        specs = tuple(spec for spec in (_text(name, item) for item in value) if spec)
        if not specs:
            raise ConfigError(f"saecheck setting {name!r} is an empty list; give at least one SAE spec")
        return specs[0] if len(specs) == 1 else specs
    return _text(name, value)


SPLICE_MODES = ("separate", "joint")


def _token_groups(name: str, value: Any) -> str | None:
    """A grouping: ``token_class``, ``position``, ``demo_constructs`` or ``module:attribute``."""
    from pytest_saecheck.groups import check_spec

    text = _text(name, value)
    return None if text is None or text.lower() == "none" else check_spec(text)


def _splice(name: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text not in SPLICE_MODES:
        raise ConfigError(
            f"saecheck setting {name!r} must be 'separate' (each SAE spliced alone) or 'joint' (several SAEs "
            f"spliced at once), got {value!r}"
        )
    return text


BACKEND_NAMES = ("auto", "transformer_lens", "hf")
"""The ``backend`` setting's values (the engine's :data:`pytest_saecheck.engine.backends.BACKENDS`, named here
without importing torch)."""


def _backend(name: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text not in BACKEND_NAMES:
        raise ConfigError(
            f"saecheck setting {name!r} must be one of {', '.join(BACKEND_NAMES)}, got {value!r}: 'transformer_lens' "
            "loads a HookedTransformer, 'hf' a Hugging Face AutoModelForCausalLM, 'auto' the one the SAE's hook "
            "names fit"
        )
    return text


def _device_map(name: str, value: Any) -> str | FrozenKwargs | None:
    """``"auto"``/``"balanced"``/... (accelerate's strategies), or a module → device mapping (a JSON object)."""
    if isinstance(value, str) and not value.strip().startswith("{"):
        text = value.strip()
        return None if not text or text.lower() == "none" else text
    return _kwargs_object(name, value)


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


def _optional_positive_int(name: str, value: Any, *, minimum: int = 1) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none")):
        return None
    return _positive_int(name, value, minimum=minimum)


def _context_size(name: str, value: Any) -> int | None:
    """Tokens per sequence: at least 2, since a sequence of one token has no next token to predict."""
    return _optional_positive_int(name, value, minimum=2)


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


def _scaling_law(name: str, value: Any) -> ScalingLaw | None:
    """A preset name (``"chinchilla"``, ``"epoch"``, ``"kaplan"``), ``(E, gamma)`` or ``"E,gamma"``, the path of a
    fit file, or ``"none"`` (``None``: no compute_fraction); see :mod:`pytest_saecheck.scaling`."""
    try:
        return as_scaling_law(value)
    except ConfigError as error:
        raise ConfigError(f"saecheck setting {name!r}: {error}") from None


UNAVAILABLE_POLICIES = ("skip", "error")


def _unavailable(name: str, value: Any) -> str:
    text = (_text(name, value) or "").lower()
    if text not in UNAVAILABLE_POLICIES:
        raise ConfigError(f"saecheck setting {name!r} must be 'skip' or 'error', got {value!r}")
    return text


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if isinstance(items, (int, float)) or any(isinstance(item, (bool, float)) for item in items):
        raise ConfigError(
            f"saecheck setting {name!r} must be a list of integer token ids (or '1,2,3'), got {value!r}"
        )
    try:
        ids = tuple(sorted({int(item) for item in items}))
    except (TypeError, ValueError):
        raise ConfigError(
            f"saecheck setting {name!r} must be token ids (a list of integers, or '1,2,3'), got {value!r}"
        ) from None
    if any(i < 0 for i in ids) or any(isinstance(item, bool) for item in items):
        raise ConfigError(
            f"saecheck setting {name!r} must hold non-negative integer token ids, got {value!r}"
        )
    return ids


def _activation_scaler(name: str, value: Any) -> float | str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, os.PathLike)):
        raise ConfigError(
            f"saecheck setting {name!r} must be 'auto', a positive number or a path, got {value!r}"
        )
    if isinstance(value, os.PathLike):
        return str(os.fspath(value))
    try:
        factor = float(value)
    except ValueError:
        return str(value)
    if not (factor > 0 and factor != float("inf")):
        raise ConfigError(f"saecheck setting {name!r} must be a positive finite number, got {value!r}")
    return factor


class FrozenKwargs(Mapping[str, Any]):
    """A read-only, hashable mapping of keyword arguments (so that settings stay hashable cache keys)."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(json.dumps(self._items, sort_keys=True, default=repr))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


def _kwargs_object(name: str, value: Any) -> FrozenKwargs | None:
    """A dict (marker) or a JSON object (command line, ini) of keyword arguments."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError as error:
            raise ConfigError(
                f"saecheck setting {name!r} must be a JSON object, got {text!r} ({error}); "
                f"""write e.g. --saecheck-{name.replace("_", "-")}='{{"center_writing_weights": false}}'"""
            ) from None
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ConfigError(
            f"saecheck setting {name!r} must be a dict with string keys (a JSON object on the command line or in "
            f'an ini file), got {type(value).__name__} {value!r}; e.g. {name}={{"fold_ln": False}}'
        )
    return FrozenKwargs(value)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configurable value: its name, parser, default and help text."""

    name: str
    parse: Callable[[str, Any], Any]
    default: Any
    help: str
    metavar: str
    path: bool = False  # a spec that may name a local path, resolved against where it was written

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
        path=True,
    ),
    Setting(
        "sae",
        _sae_specs,
        None,
        'SAE under test: an SAE Lens "release/id", a local SAE Lens directory, or "demo/<name>" (in a marker, a '
        'list of them with splice="joint")',
        "SPEC",
        path=True,
    ),
    Setting(
        "tokens",
        _text,
        None,
        'evaluation tokens: a .txt/.jsonl/.parquet/.npy/.pt file, a saved datasets directory, "hf:<dataset>", '
        'or "demo". Default: the SAE\'s training dataset (the demo corpus for demo SAEs)',
        "SOURCE",
        path=True,
    ),
    Setting(
        "n_tokens",
        _positive_int,
        DEFAULT_N_TOKENS,
        f"number of tokens to evaluate (default {DEFAULT_N_TOKENS})",
        "N",
    ),
    Setting(
        "sequential",
        _boolean,
        False,
        "sequential gates: n_tokens is a ceiling and each SAE's evaluation grows (doubling from 32 sequences) until "
        "every gate of assert_ce_recovery with confidence= is decided at its stated error rate (default false)",
        "BOOL",
    ),
    Setting(
        "context_size",
        _context_size,
        None,
        f"tokens per sequence. Default: the SAE's training context size, else {DEFAULT_CONTEXT_SIZE}",
        "N",
    ),
    Setting(
        "batch_size",
        _positive_int,
        DEFAULT_BATCH_SIZE,
        f"sequences per forward pass (default {DEFAULT_BATCH_SIZE})",
        "N",
    ),
    Setting(
        "device", _device, None, "device for model and SAE (default: cuda when available, else cpu)", "DEVICE"
    ),
    Setting("dtype", _dtype, None, "dtype for model and SAE (default: float32)", "DTYPE"),
    Setting(
        "n_devices",
        _optional_positive_int,
        None,
        "spread the model's blocks over this many devices of the device's kind, as TransformerLens' n_devices "
        "(for models larger than one GPU; the engine keeps each activation on its block's device). Default: "
        "the model_from_pretrained_kwargs' n_devices, else 1",
        "N",
    ),
    Setting(
        "backend",
        _backend,
        "auto",
        "the model backend: transformer_lens (a HookedTransformer), hf (a Hugging Face AutoModelForCausalLM) or "
        "auto (default: hf when device_map is set, or the SAE's record names a module path or a tensor a "
        "HookedTransformer has no hook at, e.g. Gemma Scope 2 transcoders; else transformer_lens)",
        "auto|transformer_lens|hf",
    ),
    Setting(
        "device_map",
        _device_map,
        None,
        'spread a Hugging Face model over devices through accelerate: "auto", "balanced", ... or a JSON object '
        '{"module path": device} (backend hf). Default: the whole model on the device',
        "MAP",
    ),
    Setting(
        "max_memory",
        _kwargs_object,
        None,
        'the most memory per device for device_map="auto" (a JSON object, e.g. {"0": "70GiB", "cpu": "100GiB"})',
        "JSON",
    ),
    Setting(
        "exclude_bos", _boolean, True, "leave position 0 (BOS) out of every metric (default true)", "BOOL"
    ),
    Setting(
        "exclude_special_tokens",
        _boolean,
        True,
        "leave the tokenizer's BOS, EOS and PAD tokens out wherever they occur, as positions and as prediction "
        "targets (default true, as SAE Lens run_evals)",
        "BOOL",
    ),
    Setting(
        "exclude_token_ids",
        _token_ids,
        (),
        'more token ids to leave out wherever they occur ("5,7" on the command line and in ini files)',
        "IDS",
    ),
    Setting(
        "activation_scaler",
        _activation_scaler,
        None,
        "activation normalisation of a checkpoint trained with normalize_activations=expected_average_only_in: "
        '"auto" (default: the activation_scaler.json beside a local SAE directory, else SAE Lens\' estimate '
        "on the evaluation tokens, with a warning), a scaling factor, or the path of an activation_scaler.json "
        "or its directory",
        "auto|FACTOR|PATH",
    ),
    Setting(
        "seed", _seed, 0, "seed for token sampling by the demo corpus and custom loaders (default 0)", "N"
    ),
    Setting(
        "scaling_law",
        _scaling_law,
        DEFAULT_LAW,
        "the model family's compute scaling law L(C) = E + A*C^-gamma, for compute_fraction: a preset ("
        + ", ".join(f'"{name}"' + (", the default" if name == DEFAULT_LAW.name else "") for name in PRESETS)
        + ': none is fitted for your model), "E,gamma", the path of a fit file from '
        'pytest_saecheck.fit_scaling_law, "demo" (the demo family\'s fit, the default on the demo model), or "none"',
        "PRESET|E,GAMMA|PATH",
    ),
    Setting(
        "splice",
        _splice,
        "separate",
        'with several SAEs in sae=[...]: "joint" splices them all at once (circuit work), each reading the model '
        'with the SAEs upstream of it spliced in; "separate" (default) is one SAE per test',
        "separate|joint",
    ),
    Setting(
        "release_group_mib",
        lambda name, value: _optional_positive_int(name, value, minimum=0),
        None,
        "SAEs of one run that share model, tokens and settings are evaluated together in passes sized by memory: "
        "each pass holds as many SAEs as fit this many MiB beside the model, one batch's activations and logits "
        "and the per-sequence sums (the cost model, pytest_saecheck.engine.cost), each SAE's weights loaded when "
        "its pass starts. auto (default): the device's free memory; 0 evaluates each SAE alone",
        "auto|MIB",
    ),
    Setting(
        "weight_budget_mib",
        _positive_int,
        WEIGHT_BUDGET_MIB,
        "a cross-layer transcoder's weights are kept in memory through the pass up to this many MiB; a larger one "
        f"is streamed one layer's tensor at a time, and one whose single tensor exceeds it is refused (default "
        f"{WEIGHT_BUDGET_MIB})",
        "MIB",
    ),
    Setting(
        "unavailable",
        _unavailable,
        "skip",
        "what a test does when weights or data are not available offline: skip (default) or error",
        "skip|error",
    ),
    Setting(
        "model_from_pretrained_kwargs",
        _kwargs_object,
        None,
        "keyword arguments for loading the model, as for HookedTransformer.from_pretrained_no_processing "
        '(a JSON object, e.g. {"center_writing_weights": false}). Default: the SAE config\'s '
        "model_from_pretrained_kwargs, else none (no weight processing)",
        "JSON",
    ),
    Setting(
        "hook_name",
        _text,
        None,
        "the hook the SAE reads, for an SAE whose config names none (a sparsify directory whose layer folder is "
        "not layers.N). A value that contradicts the SAE's own record (hook_name, hf_hook_name) is an error "
        "unless hook_name_override is set. Default: the SAE config's record",
        "HOOK",
    ),
    Setting(
        "hook_name_override",
        _boolean,
        False,
        "let the hook_name setting replace the SAE's own record on purpose (the report shows it as an override; "
        "default false)",
        "BOOL",
    ),
    Setting(
        "token_groups",
        _token_groups,
        None,
        'break every metric down by token group ("where it hurts"): "token_class" (special, whitespace, digits, '
        'punctuation, word start, word continuation), "position" (doubling position buckets), "demo_constructs" '
        '(the demo language\'s agreement, brackets, copying, arithmetic), or a python path "module:attribute" '
        "naming a pytest_saecheck.groups.Grouping (or a function (tokens, model) returning one). Default: none",
        "GROUPING",
    ),
)

SETTINGS_BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in SETTINGS}


def _default(name: str) -> Any:
    """The default of setting ``name`` (:data:`SETTINGS` is the one place defaults are written)."""
    default = SETTINGS_BY_NAME[name].default
    if isinstance(default, (list, dict, set)):  # one object would be shared by every test's settings
        raise TypeError(f"setting {name!r} has a mutable default {default!r}")
    return default


@dataclasses.dataclass(frozen=True)
class SAECheckSettings:
    """The resolved settings of one test. Hashable; ``sources`` says where each value came from, and ``written``
    holds the ``model``/``sae``/``tokens`` values as written where a relative path was made absolute.

    One field per entry of :data:`SETTINGS`, whose defaults are the only ones (read here by name)."""

    model: str | None = _default("model")
    sae: str | tuple[str, ...] | None = _default("sae")
    tokens: str | None = _default("tokens")
    n_tokens: int = _default("n_tokens")
    sequential: bool = _default("sequential")
    context_size: int | None = _default("context_size")
    batch_size: int = _default("batch_size")
    device: str | None = _default("device")
    dtype: str | None = _default("dtype")
    n_devices: int | None = _default("n_devices")
    backend: str = _default("backend")
    device_map: str | FrozenKwargs | None = _default("device_map")
    max_memory: FrozenKwargs | None = _default("max_memory")
    exclude_bos: bool = _default("exclude_bos")
    exclude_special_tokens: bool = _default("exclude_special_tokens")
    exclude_token_ids: tuple[int, ...] = _default("exclude_token_ids")
    activation_scaler: float | str | None = _default("activation_scaler")
    seed: int = _default("seed")
    scaling_law: ScalingLaw | None = _default("scaling_law")
    splice: str = _default("splice")
    release_group_mib: int = _default("release_group_mib")
    weight_budget_mib: int = _default("weight_budget_mib")
    unavailable: str = _default("unavailable")
    model_from_pretrained_kwargs: FrozenKwargs | None = _default("model_from_pretrained_kwargs")
    hook_name: str | None = _default("hook_name")
    hook_name_override: bool = _default("hook_name_override")
    token_groups: str | None = _default("token_groups")
    sources: Mapping[str, str] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    # path settings as written, where resolving made them absolute (for short labels)
    written: Mapping[str, str] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def to_dict(self) -> dict[str, Any]:
        return {setting.name: _plain(getattr(self, setting.name)) for setting in SETTINGS}


def _plain(value: Any) -> Any:
    if isinstance(value, ScalingLaw):
        return value.spec
    return dict(value) if isinstance(value, FrozenKwargs) else value


def add_options(parser: pytest.Parser) -> None:
    """Register ``--saecheck-*`` options and ``saecheck_*`` ini keys (called from ``pytest_addoption``)."""
    group = parser.getgroup("saecheck", "sparse autoencoder acceptance tests (pytest-saecheck)")
    for setting in SETTINGS:
        group.addoption(
            setting.option, dest=setting.dest, default=None, metavar=setting.metavar, help=setting.help
        )
        parser.addini(setting.ini, help=setting.help, default=None)
    add_run_options(group)
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
PLAN_OPTION = "--saecheck-plan"
SHARD_OPTION = "--saecheck-shard"


def add_run_options(group: Any) -> None:
    """The options of the whole run rather than of a test: the plan and the CI shard."""
    group.addoption(
        PLAN_OPTION,
        dest="saecheck_plan",
        action="store_true",
        default=False,
        help="print the schedule of every release (passes, SAEs, estimated memory and FLOPs, from configs only: "
        "no weights loaded, no model run) and run no test",
    )
    group.addoption(
        SHARD_OPTION,
        dest="saecheck_shard",
        default=None,
        metavar="K/N",
        help="run only shard K of N (1 <= K <= N) for a CI matrix: every SAE's tests stay in one shard, each "
        "release is cut into N contiguous runs of SAEs balanced by the cost model, other tests go round-robin; "
        "merge the shards' --saecheck-json results with python -m pytest_saecheck.report merge",
    )


def shard_option(config: pytest.Config) -> tuple[int, int] | None:
    """``(K, N)`` of ``--saecheck-shard=K/N``, or None without it.

    Raises:
        SettingsUsageError: a value that is not ``K/N`` with ``1 <= K <= N``, naming the value and the fix.
    """
    raw = config.getoption("saecheck_shard", default=None)
    if raw is None:
        return None
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(raw))
    if found is None or not 1 <= int(found.group(1)) <= int(found.group(2)):
        raise SettingsUsageError(
            f"{SHARD_OPTION}={raw}: give K/N with 1 <= K <= N, the shard to run (K) of how many (N), "
            f"e.g. {SHARD_OPTION}=2/4 in the second of four CI jobs"
        )
    return int(found.group(1)), int(found.group(2))


def check_key(key: str, where: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` is a setting name (suggesting the closest one)."""
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
        check_key(key, OVERRIDE_OPTION)
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


#: How close (difflib ratio) a name must be to a saecheck name to be taken for a misspelling of it.
TYPO_CUTOFF = 0.75


def _ini_names(config: pytest.Config) -> list[str]:
    """Every ini key registered so far (pytest keeps them in its parser; the settings' own as a fallback)."""
    registered = getattr(getattr(config, "_parser", None), "_inidict", None)
    return list(registered) if isinstance(registered, Mapping) else [s.ini for s in SETTINGS]


def check_ini_keys(config: pytest.Config) -> None:
    """An ini key that no plugin registered and that starts with ``saecheck`` (or is close to one of ours) is a
    usage error with a suggestion: pytest itself only warns, and a misspelt key silently keeps the default
    (``saecheck_n_token = 2048`` would run 16,384 tokens).

    Raises:
        SettingsUsageError: naming the key, the ini file, the closest known key and every saecheck key.
    """
    unknown = getattr(config, "_get_unknown_ini_keys", None)  # pytest >= 6: the keys it warns about
    if unknown is None:
        return
    ours = sorted(name for name in _ini_names(config) if name.startswith("saecheck"))
    for key in sorted(unknown()):
        close = difflib.get_close_matches(key, ours, n=1, cutoff=TYPO_CUTOFF)
        if not key.lower().startswith("saecheck") and not close:
            continue
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = f" in {config.inipath}" if config.inipath is not None else ""
        raise SettingsUsageError(
            f"unknown ini key {key!r}{where}{hint}; saecheck's ini keys: {', '.join(ours)}"
        )


def misspelt_marks(item: pytest.Item) -> list[str]:
    """The names of ``item``'s marks that look like a misspelt ``saecheck`` (``saechek``, ``sae_check``)."""
    names = {mark.name for mark in item.iter_markers()} - {MARKER}
    return sorted(
        name
        for name in names
        if difflib.SequenceMatcher(None, name.lower().replace("_", ""), MARKER).ratio() >= TYPO_CUTOFF
    )


def _profile_values(config: pytest.Config) -> tuple[dict[str, Any], str]:
    """The chosen profile's raw values and where they were written (``{}`` without a profile)."""
    from pytest_saecheck.plugin import profiles

    chosen = profiles.selected(config)
    if chosen is None:
        return {}, ""
    name, values = chosen
    for key in values:
        check_key(key, profiles.where(config, name))
    return values, f"{profiles.PROFILE_OPTION} {name}"


def validate_command_line(config: pytest.Config) -> None:
    """Parse every override, option, profile and ini value once at start-up so that a typo fails the run, not
    each test.

    A ``device`` is also checked against this machine (:func:`check_device`, which imports torch then); an
    unknown ``saecheck_*`` ini key is refused (:func:`check_ini_keys`).

    Raises:
        SettingsUsageError: the first malformed value, naming the option or ini key and the fix.
    """
    check_ini_keys(config)
    shard_option(config)
    if config.getoption("saecheck_plan", default=False) and config.getoption("numprocesses", default=None):
        raise SettingsUsageError(
            f"{PLAN_OPTION} prints the schedule of one process and runs no test; leave out -n (pytest-xdist)"
        )
    try:
        forced = overrides(config)
        profile, profile_where = _profile_values(config)
    except ConfigError as error:
        raise SettingsUsageError(str(error)) from None
    for setting in SETTINGS:
        for raw, where in (
            (forced.get(setting.name), f"{OVERRIDE_OPTION} {setting.name}"),
            (_raw_option(config, setting), setting.option),
            (profile.get(setting.name), f"{profile_where} ({setting.name})"),
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
            check_key(key, "@pytest.mark.saecheck")
            if key not in merged and value is not None:  # None: not set at this level
                merged[key] = value
                origin[key] = "marker"
    return merged, origin


def _base_directories(config: pytest.Config, test_dir: Path | None) -> dict[str, Path]:
    """Where relative paths written in each place resolve: see :func:`resolve_path_spec`."""
    invocation = Path(config.invocation_params.dir)
    inipath = getattr(config, "inipath", None)
    return {
        "marker": test_dir if test_dir is not None else invocation,
        "command line": invocation,
        "override": invocation,
        "ini": Path(inipath).parent if inipath is not None else Path(config.rootpath),
        "profile": Path(inipath).parent if inipath is not None else Path(config.rootpath),
    }


def resolve_path_spec(value: str, base: Path) -> str:
    """A model/SAE/token spec that names a local path, made absolute against ``base``; any other spec as written.

    A spec names a path when it is written as one (``./x``, ``../x``, ``/x``, ``~/x``, ``x/``) or when ``base``
    holds a file or directory of that name; so ``my-release/my-id`` is a local directory when one exists there,
    and an SAE Lens release otherwise. ``hf:`` sources, TransformerLens names and ``demo`` names stay as written.
    ``base`` is the test file's directory for markers, the ini file's directory for ini keys and the invocation
    directory for command-line options.
    """
    from pytest_saecheck.loading import looks_like_path

    if value.startswith("hf:"):
        return value
    expanded = os.path.expanduser(value)
    candidate = Path(expanded) if os.path.isabs(expanded) else base / expanded
    if looks_like_path(value) or candidate.exists():
        return os.path.normpath(candidate)
    return value


def resolve(
    config: pytest.Config, markers: Iterable[pytest.Mark] = (), test_dir: Path | None = None
) -> SAECheckSettings:
    """Resolve every setting: ``--saecheck-override`` > marker > command line > profile > ini > default.

    Relative paths in ``model``, ``sae``, ``tokens`` and a ``scaling_law`` fit file (``.json``) resolve against the directory of the place that gave
    them (:func:`resolve_path_spec`): ``test_dir`` (the test file's directory; default the invocation directory)
    for markers, the ini file's directory, the invocation directory for options.
    """
    from_markers, _ = marker_kwargs(markers)
    forced = overrides(config)
    profile, profile_where = _profile_values(config)
    bases = _base_directories(config, test_dir)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    written: dict[str, str] = {}
    for setting in SETTINGS:
        for raw, where, label in (
            (forced.get(setting.name, _UNSET), f"{OVERRIDE_OPTION} {setting.name}", "override"),
            (from_markers.get(setting.name, _UNSET), "@pytest.mark.saecheck", "marker"),
            (_raw_option(config, setting), setting.option, "command line"),
            (profile.get(setting.name), profile_where, "profile"),
            (_raw_ini(config, setting), setting.ini, "ini"),
        ):
            if raw is _UNSET or raw is None:
                continue
            if (
                setting.name == "scaling_law"
                and isinstance(raw, str)
                and raw.strip().lower().endswith(".json")
            ):
                raw = os.path.normpath(bases[label] / os.path.expanduser(raw.strip()))  # a fit file
            try:
                values[setting.name] = setting.parse(setting.name, raw)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            value = values[setting.name]
            if setting.path and value is not None:
                specs = value if isinstance(value, tuple) else (value,)
                resolved_specs = tuple(resolve_path_spec(spec, bases[label]) for spec in specs)
                if resolved_specs != specs:
                    written[setting.name] = " + ".join(specs)
                values[setting.name] = resolved_specs if isinstance(value, tuple) else resolved_specs[0]
            sources[setting.name] = label
            break
        else:
            values[setting.name] = setting.default
            sources[setting.name] = "default"
    return SAECheckSettings(**values, sources=sources, written=written)


def resolve_for_item(item: pytest.Item) -> SAECheckSettings:
    """The settings of one collected test, from its markers and the run's options (paths: see :func:`resolve`)."""
    return resolve(item.config, item.iter_markers(MARKER), Path(item.path).parent)


def saecheck_items(items: Iterable[pytest.Item]) -> Iterator[tuple[pytest.Item, SAECheckSettings]]:
    """The tests among ``items`` that use the ``saecheck`` fixture, with their settings; a test whose marker cannot
    be resolved is left out (it reports its own problem when it runs)."""
    from pytest_saecheck.errors import SAECheckError

    for item in items:
        if "saecheck" not in getattr(item, "fixturenames", ()):
            continue
        try:
            yield item, resolve_for_item(item)
        except (SAECheckError, TypeError, ValueError):
            continue


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


def release_group_key(settings: SAECheckSettings) -> Hashable:
    """Every setting but the SAE and the scaling law (which changes no measured number): tests with equal keys
    share one pass."""
    return dataclasses.replace(settings, sae=None, scaling_law=None)
