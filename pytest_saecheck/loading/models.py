"""Model loaders: local Hugging Face directories and TransformerLens names (loaded as SAE Lens trains:
``from_pretrained_no_processing`` with the SAE's ``model_from_pretrained_kwargs``), after the plug-ins' hooks."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_saecheck.devices import auto_device
from pytest_saecheck.errors import (
    LoadError,
    WeightsUnavailableError,
)
from pytest_saecheck.loading.offline import is_unavailable_error, offline_state, quiet_deprecations
from pytest_saecheck.loading.resolve import hooks_then_builtin
from pytest_saecheck.loading.specs import absolute_path, local_path, looks_like_path
from pytest_saecheck.validate import PROCESSING_FLAGS

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# --------------------------------------------------------------------------------------------------------
# models

TL_LOADER = "HookedTransformer.from_pretrained_no_processing"
HF_DIRECTORY_LOADER = "pytest_saecheck.loading.load_hf_directory"
HF_LOADER = "AutoModelForCausalLM.from_pretrained"
HOOK_LOADER = "pytest_saecheck_load_model hook"

# Config fields TransformerLens reads under names current transformers no longer writes: {model_type: {the field
# TransformerLens reads: the field transformers writes}}. transformers 5 saves GPT-2 without ``n_ctx``.
_LEGACY_CONFIG_FIELDS: Mapping[str, Mapping[str, str]] = {"gpt2": {"n_ctx": "n_positions"}}


@dataclasses.dataclass(frozen=True)
class ModelLoad:
    """How a model was loaded: the loader that made it and the keyword arguments it was given.

    ``kwargs`` hold the weight processing switches explicitly (all of :data:`PROCESSING_FLAGS`, ``False`` unless
    the kwargs turned one on) and the dtype; ``device`` is recorded separately. For models from a
    ``pytest_saecheck_load_model`` hook, ``kwargs`` are what the loader was offered, unless the hook returned a
    :class:`LoadedModel` saying itself how it made the model.
    """

    loader: str
    kwargs: Mapping[str, Any]
    backend: tuple[str, str] | None = None
    """``(backend, why it was chosen)`` when the plugin chose it (``backend`` setting ``auto``)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (dtypes and other objects as strings); ``backend``: ``{"name", "reason"}`` when set."""
        plain: dict[str, Any] = {
            "loader": self.loader,
            "kwargs": {str(k): _plain(v) for k, v in self.kwargs.items()},
        }
        if self.backend is not None:
            plain["backend"] = {"name": self.backend[0], "reason": self.backend[1]}
        return plain


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What a ``pytest_saecheck_load_model`` implementation may return instead of the bare model: the model and
    the :class:`ModelLoad` it was made with (recorded as the evaluation's ``model_loading``)."""

    model: Any
    how: ModelLoad


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def model_loader_kwargs(
    model_from_pretrained_kwargs: Mapping[str, Any] | None, dtype: str | None
) -> dict[str, Any]:
    """The keyword arguments a model is loaded with: the SAE's (or the setting's) kwargs and the dtype.

    The ``dtype`` setting, when given, wins over a ``dtype``/``torch_dtype`` in the kwargs; without either, the
    model loads in float32. A ``device`` key is dropped: the ``device`` setting places the model.
    """
    kwargs = dict(model_from_pretrained_kwargs or {})
    kwargs.pop("device", None)
    if dtype is not None:
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = dtype
    elif "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = "float32"
    return kwargs


def equivalent_load_kwargs(
    model_from_pretrained_kwargs: Mapping[str, Any] | None, dtype: str | None
) -> dict[str, Any]:
    """The kwargs that determine the loaded model, in one form for equivalent settings: every processing flag
    explicit (``{}`` and ``{"center_writing_weights": False}`` load the same model), the dtype under ``dtype``
    (not ``torch_dtype``) and as text. Used as the model's cache key, so equivalent settings share one model."""
    kwargs = _explicit_processing(model_loader_kwargs(model_from_pretrained_kwargs, dtype))
    if "torch_dtype" in kwargs and "dtype" not in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    return kwargs


def _explicit_processing(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {**{flag: False for flag in PROCESSING_FLAGS}, **kwargs}


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    model_from_pretrained_kwargs: Mapping[str, Any] | None = None,
    *,
    backend: str = "transformer_lens",
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[str, Any] | None = None,
) -> HookedTransformer:
    """Load a TransformerLens ``HookedTransformer`` the way the plugin does: hooks first, then the built-ins.

    With ``backend="hf"`` the model is a Hugging Face ``AutoModelForCausalLM`` instead (:func:`load_hf_model`:
    a local directory or a hub id in the local cache; ``device_map``/``max_memory`` spread it over devices).

    ``spec``: a local Hugging Face model directory, a TransformerLens model name, or a name a plug-in loads
    (``pytest_saecheck_load_model``; the bundled demo's ``"demo"``). ``device``: a
    torch device string (default: CUDA when available, else CPU). ``dtype``: ``"float32"``, ``"float16"``,
    ``"bfloat16"``, ``"float64"`` or None (float32 unless the kwargs name one). ``model_from_pretrained_kwargs``:
    passed to ``HookedTransformer.from_pretrained_no_processing`` as SAE Lens does (its ``fold_ln``,
    ``center_writing_weights``, ... default to off), and honoured the same way for local directories; use the
    SAE's ``cfg.metadata.model_from_pretrained_kwargs``. Relative paths resolve against the working directory.

    Raises :class:`LoadError` (not found, not convertible), :class:`WeightsUnavailableError` (not on this
    machine and no network).
    """
    return load_model_recorded(
        spec,
        device,
        dtype,
        model_from_pretrained_kwargs,
        backend=backend,
        device_map=device_map,
        max_memory=max_memory,
    )[0]


def load_model_recorded(
    spec: str,
    device: str | None,
    dtype: str | None,
    model_from_pretrained_kwargs: Mapping[str, Any] | None = None,
    *,
    backend: str = "transformer_lens",
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[str, Any] | None = None,
) -> tuple[Any, ModelLoad]:
    """:func:`load_model`, also returning the :class:`ModelLoad` that says how the model was made."""
    resolved_device = device if device is not None else auto_device()
    offered = dict(model_from_pretrained_kwargs or {})

    def builtin() -> tuple[Any, ModelLoad]:
        if backend == "hf":
            model = load_hf_model(spec, resolved_device, dtype, device_map, max_memory)
            return model, ModelLoad(
                HF_LOADER,
                {
                    "dtype": str(model.dtype).replace("torch.", ""),
                    "device_map": device_map,
                    "max_memory": max_memory,
                },
            )
        return builtin_load_model_recorded(spec, resolved_device, dtype, model_from_pretrained_kwargs)

    loaded, from_hook = hooks_then_builtin(
        lambda hook: hook.pytest_saecheck_load_model(
            spec=spec, device=resolved_device, dtype=dtype, model_from_pretrained_kwargs=offered
        ),
        builtin,
    )
    if not from_hook:
        return loaded
    if isinstance(loaded, LoadedModel):
        return loaded.model, loaded.how
    return loaded, ModelLoad(HOOK_LOADER, offered)


def builtin_load_model(
    spec: str, device: str, dtype: str | None, model_from_pretrained_kwargs: Mapping[str, Any] | None = None
) -> Any:
    """The built-in loaders only (no hooks); see :func:`load_model`."""
    return builtin_load_model_recorded(spec, device, dtype, model_from_pretrained_kwargs)[0]


def builtin_load_model_recorded(
    spec: str, device: str, dtype: str | None, model_from_pretrained_kwargs: Mapping[str, Any] | None = None
) -> tuple[Any, ModelLoad]:
    path = local_path(spec)
    kwargs = model_loader_kwargs(model_from_pretrained_kwargs, dtype)
    if path is not None:
        return load_hf_directory(path, device, dtype, kwargs), ModelLoad(
            HF_DIRECTORY_LOADER, _explicit_processing(kwargs)
        )
    if looks_like_path(spec):
        raise LoadError(
            f"model directory {spec!r} does not exist (looked for {absolute_path(spec)}); give the path of a Hugging "
            "Face model directory (with config.json), a TransformerLens model name, or 'demo'"
        )
    return load_transformer_lens_model(spec, device, kwargs), ModelLoad(
        TL_LOADER, _explicit_processing(kwargs)
    )


def load_hf_model(
    spec: str,
    device: str,
    dtype: str | None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[str, Any] | None = None,
) -> Any:
    """A Hugging Face ``AutoModelForCausalLM`` from a local directory or a hub id already in the local cache, in
    eval mode, with its tokenizer as ``model.tokenizer`` (None when it has none).

    ``dtype``: ``"float32"``, ``"bfloat16"``, ... or None for the dtype policy's default (:func:`default_dtype`:
    the model's configured dtype on CUDA, float32 elsewhere). ``device_map`` (``"auto"``, ``"balanced"``, or a
    mapping of module paths to devices) and ``max_memory`` spread the model over devices through accelerate;
    without them the whole model goes to ``device``.

    Raises :class:`LoadError` (not a causal language model, no such directory or cached id) and
    :class:`WeightsUnavailableError` (not on this machine and no network).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = local_path(spec)
    source = str(path) if path is not None else spec
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:
        if is_unavailable_error(error) or path is None:
            raise WeightsUnavailableError(
                f"model {spec!r} is not a local directory and not in the Hugging Face cache on this machine "
                f"({offline_state()}): download it once with network access or give its directory"
            ) from None
        raise LoadError(f"could not read the Hugging Face config of {spec!r}: {error}") from None
    chosen = getattr(torch, dtype.removeprefix("torch.")) if dtype else default_dtype(config, device)
    placement: dict[str, Any] = {"device_map": _plain(device_map) if device_map is not None else device}
    if max_memory is not None:
        placement["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in max_memory.items()}
    try:
        with quiet_deprecations():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=chosen, **placement)
    except Exception as error:
        if is_unavailable_error(error):
            raise WeightsUnavailableError(
                f"the weights of {spec!r} are not on this machine ({offline_state()})"
            ) from None
        raise LoadError(f"could not load {spec!r} as a Hugging Face causal language model: {error}") from None
    if isinstance(device_map, Mapping) and getattr(model, "hf_device_map", None) is None:
        # transformers dispatches a map that spans one device as a plain move; dispatch it through accelerate
        # anyway (its hooks move each activation to its module's device), as a map over several devices is.
        from accelerate import dispatch_model  # type: ignore[import-untyped]

        model = dispatch_model(model, device_map=dict(device_map), force_hooks=True)
        model.hf_device_map = dict(device_map)
    model.eval()
    model.tokenizer = _hf_tokenizer(source)
    return model


def default_dtype(config: Any, device: str) -> Any:
    """The dtype policy's default: on CUDA the model's configured dtype (``config.dtype``, e.g. bfloat16), on any
    other device float32 (CPUs are slow, and some inexact, in half precision)."""
    import torch

    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if str(device).startswith("cuda") and configured is not None:
        return (
            getattr(torch, str(configured).removeprefix("torch."))
            if isinstance(configured, str)
            else configured
        )
    return torch.float32


def _hf_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception:
        return None
    return tokenizer if _tokenizer_has_vocabulary(tokenizer) else None


def load_transformer_lens_model(name: str, device: str, kwargs: Mapping[str, Any]) -> Any:
    """``HookedTransformer.from_pretrained_no_processing(name, device=device, **kwargs)``, with clear errors."""
    from pytest_saecheck.versions import transformer_lens_refusal

    refusal = transformer_lens_refusal()
    if refusal is not None:
        raise LoadError(refusal)
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

        close = difflib.get_close_matches(name, OFFICIAL_MODEL_NAMES, n=3, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise LoadError(
            f"model {name!r} is neither a local directory (looked for {absolute_path(name)}) nor a model "
            f"TransformerLens knows.{hint} Give a TransformerLens name (see "
            "transformer_lens.supported_models.OFFICIAL_MODEL_NAMES), the path of a local Hugging Face model "
            "directory, or 'demo'"
        ) from None
    try:
        with quiet_deprecations():
            return HookedTransformer.from_pretrained_no_processing(name, device=device, **kwargs)
    except Exception as error:
        if is_unavailable_error(error):
            raise WeightsUnavailableError(
                f"model {name!r} is not available on this machine ({offline_state()}). Download it once with "
                f'network access: python -c "from transformer_lens import HookedTransformer; '
                f"HookedTransformer.from_pretrained('{name}')\" and run with the same HF_HOME, or save it with "
                f"save_pretrained() and set model= to that directory"
            ) from None
        raise LoadError(
            f"TransformerLens could not load the model {name!r} (kwargs {sorted(kwargs)}): "
            f"{type(error).__name__}: {error}"
        ) from None


# Keyword arguments HookedTransformer.from_pretrained hands to the model's constructor, and those it hands to the
# config only; the rest go to both the config and the state dict, as there.
_CONSTRUCTOR_KWARGS = ("default_padding_side",)
_CONFIG_KWARGS = (
    "n_ctx",
    "first_n_layers",
    "default_prepend_bos",
    "checkpoint_index",
    "checkpoint_value",
    "n_devices",
)


def load_hf_directory(
    path: Path, device: str, dtype: str | None, model_from_pretrained_kwargs: Mapping[str, Any] | None = None
) -> Any:
    """Load a local Hugging Face causal LM directory into a TransformerLens ``HookedTransformer``.

    ``HookedTransformer.from_pretrained`` insists on an official model name, but the functions beneath it accept
    a local path; this follows the same steps (config from the directory, weights converted from the HF model)
    without touching the network, with ``from_pretrained_no_processing``'s defaults: no weight processing unless
    ``model_from_pretrained_kwargs`` turns some on (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
    ``fold_value_biases``, ``refactor_factored_attn_matrices``); other kwargs (``n_ctx``, ``first_n_layers``,
    ``default_prepend_bos``, ...) go where ``from_pretrained`` puts them. The architecture must be one
    TransformerLens can convert (``config.json`` ``architectures[0]``, e.g. GPT2LMHeadModel).

    Raises :class:`LoadError` naming the directory: no ``config.json``, an unsupported architecture, or a field
    TransformerLens needs that ``config.json`` lacks.
    """
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LoadError(
            f"model path {str(path)!r} is not a Hugging Face model directory (no config.json in "
            f"{path.resolve()}); save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM

    kwargs = model_loader_kwargs(model_from_pretrained_kwargs, dtype)
    processing = {flag: bool(kwargs.pop(flag, False)) for flag in PROCESSING_FLAGS}
    constructor = {key: kwargs.pop(key) for key in _CONSTRUCTOR_KWARGS if key in kwargs}
    torch_dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", "float32")
    kwargs.pop("dtype", None)
    config_only = {key: kwargs.pop(key) for key in _CONFIG_KWARGS if key in kwargs}
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype.removeprefix("torch."))
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except Exception as error:
        raise LoadError(f"could not load the Hugging Face model in {str(path)!r}: {error}") from None
    tokenizer = _directory_tokenizer(path)
    architecture = (getattr(hf_model.config, "architectures", None) or ["?"])[0]
    try:
        with _config_transformer_lens_reads(path, hf_model.config) as config_dir:
            cfg = tl_loading.get_pretrained_model_config(
                str(config_dir),
                hf_cfg=hf_model.config.to_dict(),
                fold_ln=processing["fold_ln"],
                device=device,
                dtype=torch_dtype,
                **config_only,
                **kwargs,
            )
        state_dict = tl_loading.get_pretrained_state_dict(
            str(path), cfg, hf_model, dtype=torch_dtype, **kwargs
        )
    except (AttributeError, KeyError) as error:
        field = getattr(error, "name", None) or (error.args[0] if error.args else "?")
        raise LoadError(
            f"the model's config.json in {str(path)!r} (architecture {architecture}) has no field {field!r}, which "
            f"TransformerLens reads to convert it; add it to config.json ({type(error).__name__}: {error})"
        ) from None
    except NotImplementedError as error:
        raise LoadError(
            f"TransformerLens cannot convert the model in {str(path)!r}: architecture {architecture} is not "
            f"supported ({error}). Use an architecture TransformerLens supports, or register a "
            "pytest_saecheck_load_model hook that returns a HookedTransformer"
        ) from None
    except Exception as error:
        raise LoadError(
            f"TransformerLens could not convert the model in {str(path)!r} (architecture {architecture}): "
            f"{type(error).__name__}: {error}"
        ) from None
    cfg.model_name = path.name
    # HookedTransformer loads cfg.tokenizer_name itself when given no tokenizer: an empty one (transformers 5)
    cfg.tokenizer_name = str(path) if tokenizer is not None else None
    with quiet_deprecations():
        model = HookedTransformer(cfg, tokenizer, move_to_device=False, **constructor)
    model.load_and_process_state_dict(state_dict, **processing)
    del hf_model, state_dict
    model.move_model_modules_to_device()
    model.eval()
    return model


@contextlib.contextmanager
def _config_transformer_lens_reads(path: Path, hf_config: Any) -> Iterator[Path]:
    """``path``, or a temporary copy of its config.json with the legacy fields TransformerLens reads filled in.

    TransformerLens reads the config of a local directory itself (``AutoConfig.from_pretrained``); a GPT-2
    saved by transformers 5 has ``n_positions`` but no ``n_ctx``, which it needs. Only config.json is copied.
    """
    legacy = _LEGACY_CONFIG_FIELDS.get(getattr(hf_config, "model_type", ""), {})
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    missing = {
        field: saved[source] for field, source in legacy.items() if field not in saved and source in saved
    }
    if not missing:
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="saecheck-config-") as tmp:
        copy = Path(tmp) / path.name
        copy.mkdir()
        (copy / "config.json").write_text(json.dumps({**saved, **missing}), encoding="utf-8")
        yield copy


_TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt"}
)


def _directory_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path``, or None (with a warning) when there is none or it is empty.

    transformers 5 returns an empty tokenizer, rather than raising, for a directory without tokenizer files.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        saved = sorted(p.name for p in path.iterdir() if p.name in _TOKENIZER_FILES)
        if saved:  # the directory holds a tokenizer that does not load: say so, do not drop it silently
            raise LoadError(
                f"the tokenizer saved in {str(path)!r} ({', '.join(saved)}) could not be loaded: "
                f"{type(error).__name__}: {error}; save it again with tokenizer.save_pretrained(dir)"
            ) from None
        tokenizer = None
    if tokenizer is not None and not _tokenizer_has_vocabulary(tokenizer):
        tokenizer = None
    if tokenizer is None:
        warnings.warn(
            f"no tokenizer in {path.resolve()} (no tokenizer files, or an empty vocabulary): text token sources "
            "cannot be used with this model (save one there with tokenizer.save_pretrained, or give "
            "pretokenised .npy/.pt tokens)",
            stacklevel=3,
        )
    return tokenizer


def _tokenizer_has_vocabulary(tokenizer: Any) -> bool:
    """False for a tokenizer with no ordinary tokens (transformers 5's stand-in when no files were found)."""
    try:
        if getattr(tokenizer, "vocab_size", None) == 0:
            return False
        return len(tokenizer) - len(set(getattr(tokenizer, "all_special_ids", ()) or ())) > 0
    except Exception:
        return True  # a tokenizer we cannot inspect is used as given


def usable_tokenizer(model: Any) -> Any:
    """The model's tokenizer, or None when it has none or an empty one."""
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer if tokenizer is not None and _tokenizer_has_vocabulary(tokenizer) else None
