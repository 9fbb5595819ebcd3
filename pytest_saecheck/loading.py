"""Loaders for models, SAEs and evaluation tokens, behind the ``pytest_saecheck_load_*`` hooks.

Spec resolution (the contract in DESIGN.md):

* model: ``"demo"``; an existing local directory holding a Hugging Face model (``config.json``); otherwise a
  TransformerLens model name (``"gpt2"``, ``"EleutherAI/pythia-70m"``).
* SAE: ``"demo/<name>"``; an existing local SAE Lens directory (``cfg.json`` + weights); otherwise an SAE Lens
  ``release/id`` pair, split at the first ``/``.
* tokens: ``"demo"``; ``"hf:<dataset>[?split=...&name=...&column=...]"`` (streamed); an existing local
  ``.txt``, ``.jsonl``, ``.parquet``, ``.npy`` or ``.pt`` file or a ``datasets.save_to_disk`` directory.

Custom loaders registered through the hooks are asked first; built-in loaders run when every hook returns None.
Torch and the model libraries are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from pytest_saecheck import hookspecs
from pytest_saecheck.defaults import DEFAULT_CONTEXT_SIZE, DEFAULT_N_TOKENS
from pytest_saecheck.demo import (
    NAME as DEMO_MODEL_NAME,  # model_name and dataset_path in the demo SAEs' configs
)
from pytest_saecheck.errors import (
    ConfigError,
    LoadError,
    SAECheckError,
    ShapeMismatchError,
    UnsupportedDictionaryError,
    WeightsUnavailableError,
)

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

DEMO = "demo"
TEXT_COLUMNS = ("text", "content", "document", "story")
TOKEN_COLUMNS = ("input_ids", "tokens", "token_ids")


# --------------------------------------------------------------------------------------------------------
# spec helpers


def _local_path(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path if path.exists() else None


def _absolute(spec: str) -> str:
    """The absolute path a spec names (for "not found" messages)."""
    return os.path.abspath(os.path.expanduser(spec))


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` is written as a path (``./``, ``../``, ``/``, ``~``, a trailing separator)."""
    # SAE ids and HF names hold "/" too, so only an explicit relative, absolute or home path counts
    return spec.startswith((".", "/", "~", "\\")) or spec.endswith(("/", "\\"))


def demo_sae_name(spec: str) -> str | None:
    """``"good"`` for ``"demo/good"``; None for anything else (or for an existing local path)."""
    if spec.startswith(DEMO + "/") and _local_path(spec) is None:
        return spec[len(DEMO) + 1 :]
    return None


def split_release(spec: str) -> tuple[str, str]:
    """Split an SAE Lens ``release/id`` spec at the first ``/`` (release names hold no ``/``)."""
    release, sep, sae_id = spec.partition("/")
    if not sep or not release or not sae_id:
        raise ConfigError(
            f"SAE spec {spec!r} is neither an existing local directory nor an SAE Lens 'release/id' pair; "
            'write sae="<release>/<sae id>" (e.g. "gpt2-small-res-jb/blocks.8.hook_resid_pre"), '
            'sae="demo/<name>", or the path of a directory holding cfg.json'
        )
    return release, sae_id


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*deprecated")
        yield


# --------------------------------------------------------------------------------------------------------
# offline / network failures


_NETWORK_CLASS_NAMES = frozenset(
    {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "NetworkError",
        "gaierror",
        "ConnectionError",
        "MaxRetryError",
    }
)
_NETWORK_PHRASES = (
    "couldn't connect",
    "could not connect",
    "offline mode",
    "hf_hub_offline",
    "hf_datasets_offline",
    "local cache",
    "cached files",
    "internet connection",
)


def is_unavailable_error(error: BaseException) -> bool:
    """True when ``error`` (or anything in its chain) means "not cached here and no network to fetch it"."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _NETWORK_CLASS_NAMES for cls in type(current).__mro__):
            return True
        message = str(current).lower()
        if any(phrase in message for phrase in _NETWORK_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False


def offline_state() -> str:
    """One line on the offline switches and the cache in use, for messages."""
    flags = [
        f"{name}={os.environ[name]}"
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if name in os.environ
    ]
    try:
        from huggingface_hub import constants

        cache = str(constants.HF_HUB_CACHE)
        if getattr(constants, "HF_HUB_OFFLINE", False) and not flags:
            flags.append("HF_HUB_OFFLINE=1")
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of transformers
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    state = ", ".join(flags) if flags else "online mode, but the download failed"
    return f"{state}; Hugging Face cache: {cache} (move it with HF_HOME)"


# --------------------------------------------------------------------------------------------------------
# models

# TransformerLens' weight processing switches; ``from_pretrained`` turns all but the last on, SAE Lens trains and
# evaluates with every one off (``from_pretrained_no_processing``) unless the SAE's kwargs say otherwise.
PROCESSING_FLAGS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)
TL_LOADER = "HookedTransformer.from_pretrained_no_processing"
HF_DIRECTORY_LOADER = "pytest_saecheck.loading.load_hf_directory"
DEMO_LOADER = "pytest_saecheck.demo.load_model"
HOOK_LOADER = "pytest_saecheck_load_model hook"

# Config fields TransformerLens reads under names current transformers no longer writes: {model_type: {the field
# TransformerLens reads: the field transformers writes}}. transformers 5 saves GPT-2 without ``n_ctx``.
_LEGACY_CONFIG_FIELDS: Mapping[str, Mapping[str, str]] = {"gpt2": {"n_ctx": "n_positions"}}


@dataclasses.dataclass(frozen=True)
class ModelLoad:
    """How a model was loaded: the loader that made it and the keyword arguments it was given.

    ``kwargs`` hold the weight processing switches explicitly (all of :data:`PROCESSING_FLAGS`, ``False`` unless
    the kwargs turned one on) and the dtype; ``device`` is recorded separately. For the demo model and models
    from a ``pytest_saecheck_load_model`` hook, ``kwargs`` are what the loader was offered.
    """

    loader: str
    kwargs: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (dtypes and other objects as strings)."""
        return {"loader": self.loader, "kwargs": {str(k): _plain(v) for k, v in self.kwargs.items()}}


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


def _explicit_processing(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {**{flag: False for flag in PROCESSING_FLAGS}, **kwargs}


def load_model(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    model_from_pretrained_kwargs: Mapping[str, Any] | None = None,
) -> HookedTransformer:
    """Load a TransformerLens ``HookedTransformer`` the way the plugin does: hooks first, then the built-ins.

    ``spec``: ``"demo"``, a local Hugging Face model directory, or a TransformerLens model name. ``device``: a
    torch device string (default: CUDA when available, else CPU). ``dtype``: ``"float32"``, ``"float16"``,
    ``"bfloat16"``, ``"float64"`` or None (float32 unless the kwargs name one). ``model_from_pretrained_kwargs``:
    passed to ``HookedTransformer.from_pretrained_no_processing`` as SAE Lens does (its ``fold_ln``,
    ``center_writing_weights``, ... default to off), and honoured the same way for local directories; use the
    SAE's ``cfg.metadata.model_from_pretrained_kwargs``. Relative paths resolve against the working directory.

    Raises :class:`LoadError` (not found, not convertible), :class:`WeightsUnavailableError` (not on this
    machine and no network).
    """
    return load_model_recorded(spec, device, dtype, model_from_pretrained_kwargs)[0]


def load_model_recorded(
    spec: str,
    device: str | None,
    dtype: str | None,
    model_from_pretrained_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any, ModelLoad]:
    """:func:`load_model`, also returning the :class:`ModelLoad` that says how the model was made."""
    if device is None:
        from pytest_saecheck.fixtures import auto_device

        device = auto_device()
    hook = hookspecs.active_hook()
    if hook is not None:
        offered = dict(model_from_pretrained_kwargs or {})
        model = hook.pytest_saecheck_load_model(
            spec=spec, device=device, dtype=dtype, model_from_pretrained_kwargs=offered
        )
        if model is not None:
            return model, ModelLoad(HOOK_LOADER, offered)
    return builtin_load_model_recorded(spec, device, dtype, model_from_pretrained_kwargs)


def builtin_load_model(
    spec: str, device: str, dtype: str | None, model_from_pretrained_kwargs: Mapping[str, Any] | None = None
) -> Any:
    """The built-in loaders only (no hooks); see :func:`load_model`."""
    return builtin_load_model_recorded(spec, device, dtype, model_from_pretrained_kwargs)[0]


def builtin_load_model_recorded(
    spec: str, device: str, dtype: str | None, model_from_pretrained_kwargs: Mapping[str, Any] | None = None
) -> tuple[Any, ModelLoad]:
    path = _local_path(spec)
    if path is None and spec == DEMO:
        from pytest_saecheck import demo

        return demo.load_model(device=device, dtype=dtype), ModelLoad(
            DEMO_LOADER, {"dtype": dtype or "float32"}
        )
    kwargs = model_loader_kwargs(model_from_pretrained_kwargs, dtype)
    if path is not None:
        return load_hf_directory(path, device, dtype, kwargs), ModelLoad(
            HF_DIRECTORY_LOADER, _explicit_processing(kwargs)
        )
    if looks_like_path(spec):
        raise LoadError(
            f"model directory {spec!r} does not exist (looked for {_absolute(spec)}); give the path of a Hugging "
            "Face model directory (with config.json), a TransformerLens model name, or 'demo'"
        )
    return load_transformer_lens_model(spec, device, kwargs), ModelLoad(
        TL_LOADER, _explicit_processing(kwargs)
    )


def load_transformer_lens_model(name: str, device: str, kwargs: Mapping[str, Any]) -> Any:
    """``HookedTransformer.from_pretrained_no_processing(name, device=device, **kwargs)``, with clear errors."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

        close = difflib.get_close_matches(name, OFFICIAL_MODEL_NAMES, n=3, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise LoadError(
            f"model {name!r} is neither a local directory (looked for {_absolute(name)}) nor a model "
            f"TransformerLens knows.{hint} Give a TransformerLens name (see "
            "transformer_lens.supported_models.OFFICIAL_MODEL_NAMES), the path of a local Hugging Face model "
            "directory, or 'demo'"
        ) from None
    try:
        with _quiet_deprecations():
            return HookedTransformer.from_pretrained_no_processing(name, device=device, **kwargs)
    except Exception as error:
        if is_unavailable_error(error):
            raise WeightsUnavailableError(
                f"model {name!r} is not available on this machine ({offline_state()}). Download it once with "
                f'network access: python -c "from transformer_lens import HookedTransformer; '
                f"HookedTransformer.from_pretrained('{name}')\" and run with the same HF_HOME, or save it with "
                f"save_pretrained() and set model= to that directory"
            ) from None
        raise


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
    with _quiet_deprecations():
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


def _directory_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path``, or None (with a warning) when there is none or it is empty.

    transformers 5 returns an empty tokenizer, rather than raising, for a directory without tokenizer files.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
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


# --------------------------------------------------------------------------------------------------------
# SAEs


def load_sae(
    spec: str, device: str | None = None, dtype: str | None = None, hook_name: str | None = None
) -> SAE:
    """Load an SAE the way the plugin does: hooks first, then the built-in loaders.

    ``spec``: ``"demo/<name>"``, a local directory (SAE Lens ``cfg.json`` + weights, or an EleutherAI sparsify
    ``cfg.json`` + ``sae.safetensors``), or an SAE Lens ``release/id``. ``device``: default CUDA when available,
    else CPU. ``dtype``: as for :func:`load_model` (None: the SAE config's dtype; float32 for sparsify).
    ``hook_name``: the TransformerLens hook the SAE reads, overriding its config (needed for sparsify directories
    whose layer folder TransformerLens names differently). Relative paths resolve against the working directory.

    Raises :class:`LoadError` (not found, unreadable, a format that cannot be converted faithfully),
    :class:`ConfigError` (a malformed spec), :class:`WeightsUnavailableError` (not on this machine, no network).
    """
    if device is None:
        from pytest_saecheck.fixtures import auto_device

        device = auto_device()
    hook = hookspecs.active_hook()
    sae = None
    if hook is not None:
        sae = hook.pytest_saecheck_load_sae(spec=spec, device=device, dtype=dtype)
    if sae is None:
        sae = builtin_load_sae(spec, device, dtype, hook_name)
    elif hook_name is not None:
        _set_hook_name(sae, hook_name)
    return sae


def _set_hook_name(sae: Any, hook_name: str) -> None:
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    if metadata is None:
        raise ConfigError(
            f"the hook_name setting ({hook_name!r}) cannot be applied: the SAE ({type(sae).__name__}) has no "
            "cfg.metadata; set its hook in the loader that makes it"
        )
    metadata.hook_name = hook_name


def builtin_load_sae(spec: str, device: str, dtype: str | None, hook_name: str | None = None) -> Any:
    """The built-in SAE loaders only (no hooks); see :func:`load_sae`."""
    demo_name = demo_sae_name(spec)
    if demo_name is not None:
        from pytest_saecheck import demo

        if demo_name not in demo.SAE_NAMES:
            raise LoadError(f"no demo SAE named {demo_name!r}; the demo SAEs are {', '.join(demo.SAE_NAMES)}")
        sae = demo.load_sae(demo_name, device=device, dtype=dtype)
    elif (path := _local_path(spec)) is not None:
        sae = load_sae_directory(path, device, dtype, hook_name)
    elif looks_like_path(spec):
        raise LoadError(
            f"SAE directory {spec!r} does not exist (looked for {_absolute(spec)}); give the path of a directory "
            "saved with SAE.save_model(), an SAE Lens 'release/id' pair, or 'demo/<name>'"
        )
    else:
        release, sae_id = split_release(spec)
        sae = load_sae_release(release, sae_id, device, dtype)
    if hook_name is not None:
        _set_hook_name(sae, hook_name)
    return sae


SPARSIFY_WEIGHTS = "sae.safetensors"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
# sparsify layer folders SAE Lens' sparsify converter maps to a TransformerLens hook (it also matches
# "layers.3.mlp", which it would wrongly read as the residual stream, so only whole names count here)
_SPARSIFY_LAYER = re.compile(r"layers[._](\d+)|embed_tokens")


def sae_directory_format(path: Path) -> str:
    """``"sae_lens"``, ``"sparsify"`` (EleutherAI), ``"dictionary_learning"`` or ``"unknown"``, from the files."""
    cfg = _read_json(path / "cfg.json") if (path / "cfg.json").is_file() else None
    if isinstance(cfg, Mapping) and ("num_latents" in cfg or "expansion_factor" in cfg):
        if (path / SPARSIFY_WEIGHTS).is_file() or not any(path.glob("sae_weights.*")):
            return "sparsify"
    if cfg is not None:
        return "sae_lens"
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if (path / DICTIONARY_LEARNING_WEIGHTS).is_file() or (
        isinstance(config, Mapping) and "trainer" in config
    ):
        return "dictionary_learning"
    return "unknown"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LoadError(f"{str(path)!r} is not readable JSON: {error}") from None


def load_sae_directory(path: Path, device: str, dtype: str | None, hook_name: str | None = None) -> Any:
    """Load a local SAE directory: SAE Lens format, or EleutherAI sparsify converted with SAE Lens' converter.

    A dictionary_learning checkpoint (``ae.pt`` + ``config.json`` with ``trainer``) is refused: SAE Lens converts
    those only from the Hugging Face Hub.
    """
    kind = sae_directory_format(path) if path.is_dir() else "unknown"
    if kind == "sparsify":
        return load_sparsify_directory(path, device, dtype, hook_name)
    if kind == "dictionary_learning":
        raise LoadError(
            f"{str(path)!r} is a dictionary_learning checkpoint ({DICTIONARY_LEARNING_WEIGHTS} + config.json "
            "with 'trainer'); SAE Lens converts these only from the Hugging Face Hub (its 'dictionary_learning_1' "
            'loader), not from a local directory. Load it from its Hub release (sae="<release>/<id>" with the '
            "files in the HF cache), or convert it to an SAE Lens directory (an SAE Lens SAE with its weights, "
            "saved with sae.save_model(dir)), or register a pytest_saecheck_load_sae hook"
        )
    if kind != "sae_lens":
        raise LoadError(
            f"SAE path {str(path)!r} is not an SAE Lens directory (no cfg.json in {path.resolve()}); save one with "
            "sae.save_model(dir)"
        )
    from sae_lens import SAE

    try:
        return SAE.load_from_disk(path, device=device, dtype=dtype, converter=_sae_lens_disk_converter)
    except SAECheckError:
        raise
    except Exception as error:
        raise LoadError(f"could not load the SAE in {str(path)!r}: {type(error).__name__}: {error}") from None


def _sae_lens_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAE Lens' own disk loader, with SAE Lens 6 configs whose nested metadata lacks a version kept as 6.x.

    SAE Lens decides between its 6.x config layout and the older flat one by ``sae_lens_version``; a config
    with a nested ``metadata`` and no version (what SAE Lens' own converters return) would be read as old, and
    the nested ``hook_name``, ``model_name``, ... dropped. SAE Lens' ``SAEMetadata`` records the running
    version when a config names none; this records it before the layout is decided.
    """
    from sae_lens import __version__ as sae_lens_version
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    cfg_dict, state_dict = sae_lens_disk_loader(path, device, cfg_overrides)
    metadata = cfg_dict.get("metadata")
    if (
        isinstance(metadata, dict)
        and not cfg_dict.get("sae_lens_version")
        and not metadata.get("sae_lens_version")
    ):
        cfg_dict["metadata"] = {**metadata, "sae_lens_version": sae_lens_version}
    return cfg_dict, state_dict


def load_sparsify_directory(path: Path, device: str, dtype: str | None, hook_name: str | None = None) -> Any:
    """An EleutherAI sparsify ``SparseCoder`` directory as an SAE Lens ``TopKSAE``, via SAE Lens' converter.

    SAE Lens' ``sparsify_disk_loader`` maps the layer folder (``layers.N`` to ``blocks.N.hook_resid_post``,
    ``embed_tokens`` to ``hook_embed``); ``hook_name`` overrides that mapping, and is required when the folder
    is named otherwise. Two of its readings disagree with sparsify's own ``SparseCoder`` (1.x) and are corrected
    here: the stored ``W_dec`` is already ``[num_latents, d_in]`` (it transposes it), and sparsify subtracts
    ``b_dec`` before encoding whatever ``normalize_decoder`` says. Transcoders, skip connections and activations
    other than TopK are refused: the converter would drop them. Without a ``config.json`` (sparsify's run
    config) in the parent folder the model and dataset are unknown rather than guessed.
    """
    cfg = _read_json(path / "cfg.json")
    what = f"{str(path)!r} is an EleutherAI sparsify directory (cfg.json with num_latents/expansion_factor)"
    refusals = []
    if cfg.get("transcode"):
        refusals.append(
            "it is a transcoder (transcode=true), which SAE Lens' sparsify converter reads as an SAE"
        )
    if cfg.get("skip_connection"):
        refusals.append("it has a skip connection (W_skip), which SAE Lens' sparsify converter drops")
    if cfg.get("activation", "topk") != "topk":
        refusals.append(f"its activation is {cfg.get('activation')!r}; SAE Lens converts only topk")
    if not (path / SPARSIFY_WEIGHTS).is_file():
        refusals.append(f"it has no {SPARSIFY_WEIGHTS}")
    if refusals:
        raise LoadError(
            f"{what}, but it cannot be evaluated faithfully: {'; '.join(refusals)}. Load it with sparsify's "
            "SparseCoder.load_from_disk and register a pytest_saecheck_load_sae hook that returns an object with "
            "encode/decode/cfg"
        )
    if hook_name is None and not _SPARSIFY_LAYER.fullmatch(path.name):
        raise LoadError(
            f"{what} for the layer {path.name!r}, which is not a TransformerLens hook and which SAE Lens' sparsify "
            "converter cannot place (it maps only layers.N and embed_tokens). Set the hook_name setting to the "
            'TransformerLens hook it reads, e.g. @pytest.mark.saecheck(hook_name="blocks.3.hook_resid_post") or '
            "--saecheck-hook-name=blocks.3.hook_resid_post"
        )
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    run_config = path.parent / "config.json"
    run = _read_json(run_config) if run_config.is_file() else {}
    overrides: dict[str, Any] = {"dtype": dtype or "float32", "apply_b_dec_to_input": True}
    if "model" not in run:
        overrides["model_name"] = None
    if "dataset" not in run:
        overrides["dataset_path"] = None
    if "ctx_len" not in run:
        overrides["context_size"] = None
    with safe_keys(path / SPARSIFY_WEIGHTS) as stored:
        stored_w_dec = "W_dec" in stored

    def converter(
        folder: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        with _sparsify_layer_view(Path(folder)) as view:
            cfg_dict, state_dict = sparsify_disk_loader(view, device, {**(cfg_overrides or {}), **overrides})
        if stored_w_dec:  # sparsify stores W_dec as [num_latents, d_in], SAE Lens' layout; undo its transpose
            state_dict["W_dec"] = state_dict["W_dec"].T.contiguous()
        if hook_name is not None:
            cfg_dict["hook_name"] = hook_name
        return cfg_dict, state_dict

    try:
        return SAE.load_from_disk(path, device=device, dtype=dtype or "float32", converter=converter)
    except SAECheckError:
        raise
    except Exception as error:
        raise LoadError(
            f"{what}, and SAE Lens' sparsify converter failed on it: {type(error).__name__}: {error}"
        ) from None


@contextlib.contextmanager
def _sparsify_layer_view(path: Path) -> Iterator[Path]:
    """``path``, or (for a layer folder SAE Lens' converter cannot name) a temporary ``layers.0`` folder linking
    to its files, so that the converter reads it; the hook then comes from the ``hook_name`` setting."""
    if _SPARSIFY_LAYER.fullmatch(path.name):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="saecheck-sparsify-") as tmp:
        run = Path(tmp) / path.parent.name
        view = run / "layers.0"
        view.mkdir(parents=True)
        for name in ("cfg.json", SPARSIFY_WEIGHTS):
            (view / name).symlink_to((path / name).resolve())
        if (path.parent / "config.json").is_file():
            (run / "config.json").symlink_to((path.parent / "config.json").resolve())
        yield view


@contextlib.contextmanager
def safe_keys(path: Path) -> Iterator[set[str]]:
    """The tensor names in a safetensors file (read from its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield set(handle.keys())
    except Exception as error:
        raise LoadError(f"{str(path)!r} is not a readable safetensors file: {error}") from None


SUMMED_DECODER_CONVERTERS = frozenset({"mntss_clt_layer_transcoder"})
"""SAE Lens release converters that load a cross-layer transcoder layer with its decoders summed."""


def load_sae_release(release: str, sae_id: str, device: str, dtype: str | None) -> Any:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release in directory:
        known_ids = list(directory[release].saes_map)
        if sae_id not in known_ids:
            close = difflib.get_close_matches(sae_id, known_ids, n=3, cutoff=0.5)
            hint = (
                f"close ids: {', '.join(close)}" if close else f"{len(known_ids)} ids, e.g. {known_ids[:3]}"
            )
            raise LoadError(f"SAE Lens release {release!r} has no SAE id {sae_id!r} ({hint})")
        repo_id, folder = directory[release].repo_id, directory[release].saes_map[sae_id]
        if getattr(directory[release], "conversion_func", None) in SUMMED_DECODER_CONVERTERS:
            raise UnsupportedDictionaryError(
                f"SAE Lens release {release!r} holds cross-layer transcoders, which SAE Lens loads one layer at a "
                "time with the decoders of every later layer summed into one (its own warning: 'only for finding "
                "feature activations, not for reconstruction'); spliced at one hook, that sum would be scored as "
                "a reconstruction it is not. pytest-saecheck does not evaluate cross-layer transcoders yet"
            )
    elif "/" in release:
        repo_id, folder = release, sae_id
    else:
        close = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.5)
        hint = f" Close releases: {', '.join(close)}." if close else ""
        raise LoadError(
            f"{release!r} is not an SAE Lens release (nor a local directory).{hint} "
            "See sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory() for the list"
        )
    try:
        with _quiet_deprecations():
            return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except Exception as error:
        if is_unavailable_error(error):
            raise WeightsUnavailableError(
                f"SAE {release}/{sae_id} (Hugging Face repo {repo_id}, folder {folder}) is not available on "
                f"this machine ({offline_state()}). Download it once with network access: "
                f"python -c \"from sae_lens import SAE; SAE.from_pretrained('{release}', '{sae_id}')\" "
                f"(or: hf download {repo_id} --include '{folder}/*') and run with the same HF_HOME, or save it "
                "with sae.save_model(dir) and set sae= to that directory"
            ) from None
        raise


# --------------------------------------------------------------------------------------------------------
# SAE config lookups


def sae_metadata(sae: Any, key: str) -> Any:
    """``sae.cfg.metadata[key]`` (SAE Lens 6), falling back to ``sae.cfg.<key>``; None when absent."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    value = None
    if metadata is not None:
        try:
            value = metadata[key] if not isinstance(metadata, Mapping) else metadata.get(key)
        except (KeyError, TypeError):
            value = getattr(metadata, key, None)
    if value is None and cfg is not None:
        value = getattr(cfg, key, None)
    return value


def default_model_spec(sae_spec: str, sae: Any) -> str:
    """The model an SAE was trained on, for tests that name only an SAE."""
    if demo_sae_name(sae_spec) is not None:
        return DEMO
    name = sae_metadata(sae, "model_name")
    if name == DEMO_MODEL_NAME:  # a demo SAE loaded from its directory rather than as demo/<name>
        return DEMO
    if not name:
        raise ConfigError(
            f"no model is configured and the SAE {sae_spec!r} does not name its model; "
            'set @pytest.mark.saecheck(model="...") or --saecheck-model'
        )
    return str(name)


def default_token_source(sae_spec: str | None, sae: Any) -> str:
    """The SAE's own training dataset (the demo corpus for demo SAEs)."""
    if sae_spec is not None and demo_sae_name(sae_spec) is not None:
        return DEMO
    dataset = sae_metadata(sae, "dataset_path")
    if dataset == DEMO_MODEL_NAME:
        return DEMO
    if not dataset:
        raise ConfigError(
            f"no tokens are configured and the SAE {sae_spec!r} does not name its training dataset; "
            'set @pytest.mark.saecheck(tokens="...") (a local file, "hf:<dataset>" or "demo") or --saecheck-tokens'
        )
    dataset = str(dataset)
    return dataset if _local_path(dataset) is not None or dataset.startswith("hf:") else "hf:" + dataset


def default_context_size(context_size: int | None, sae: Any) -> int:
    if context_size is not None:
        return context_size
    from_sae = sae_metadata(sae, "context_size")
    return int(from_sae) if from_sae else DEFAULT_CONTEXT_SIZE


def prepend_bos(sae: Any) -> bool:
    value = sae_metadata(sae, "prepend_bos")
    return True if value is None else bool(value)


# --------------------------------------------------------------------------------------------------------
# tokens


def load_tokens(
    spec: str,
    model: HookedTransformer,
    sae: SAE | None = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    context_size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Load evaluation tokens the way the plugin does: hooks first, then the built-in sources.

    ``spec``: ``"demo"``, ``"hf:<dataset>[?split=...&name=...&column=...]"``, or a local ``.txt``/``.jsonl``/
    ``.parquet``/``.npy``/``.pt`` file or ``datasets.save_to_disk`` directory (relative to the working
    directory). ``model`` tokenises text (its tokenizer) and gives BOS; ``sae`` (optional) says whether rows
    start with BOS (``prepend_bos``) and the default ``context_size`` (its training context, else
    :data:`~pytest_saecheck.defaults.DEFAULT_CONTEXT_SIZE`).
    ``n_tokens``: about how many tokens, in whole rows. ``seed``: for sources that sample (the demo corpus).

    Returns a LongTensor ``[ceil(n_tokens / context_size), context_size]`` on the CPU (fewer rows, with a
    warning, when the source runs out). Raises :class:`LoadError` (missing, unreadable or malformed source,
    text without a tokenizer), :class:`ShapeMismatchError`, :class:`WeightsUnavailableError`.
    """
    context_size = default_context_size(context_size, sae)
    hook = hookspecs.active_hook()
    tokens = None
    if hook is not None:
        tokens = hook.pytest_saecheck_load_tokens(
            spec=spec, model=model, sae=sae, n_tokens=n_tokens, context_size=context_size, seed=seed
        )
    if tokens is None:
        tokens = builtin_load_tokens(spec, model, sae, n_tokens, context_size, seed)
    return as_token_tensor(tokens, spec)


def as_token_tensor(tokens: Any, spec: str) -> Any:
    import torch

    if not isinstance(tokens, torch.Tensor):
        try:
            tokens = torch.as_tensor(tokens)
        except Exception as error:
            raise LoadError(
                f"token source {spec!r} gave {type(tokens).__name__}, not token ids: {error}"
            ) from None
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise LoadError(f"token source {spec!r} gave {tokens.dtype} values; token ids must be integers")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ShapeMismatchError(
            f"token source {spec!r} gave shape {tuple(tokens.shape)}; expected [n_sequences, context_size] "
            "with at least one sequence of two or more tokens"
        )
    return tokens.to(torch.long)


def n_sequences_for(n_tokens: int, context_size: int) -> int:
    return max(1, math.ceil(n_tokens / context_size))


def builtin_load_tokens(spec: str, model: Any, sae: Any, n_tokens: int, context_size: int, seed: int) -> Any:
    n_sequences = n_sequences_for(n_tokens, context_size)
    path = _local_path(spec)
    if path is None and spec == DEMO:
        from pytest_saecheck import demo

        return demo.load_tokens(n_sequences=n_sequences, seq_len=context_size, seed=seed, device="cpu")
    if path is None and spec.startswith("hf:"):
        documents = hf_documents(spec)
    elif path is not None:
        documents = local_documents(path)
    else:
        raise LoadError(
            f"token source {spec!r} is not an existing file or directory (looked for {_absolute(spec)}); give a "
            ".txt, .jsonl, .parquet, .npy "
            "or .pt file, a datasets.save_to_disk directory, 'hf:<dataset>' or 'demo'"
        )
    return pack_documents(documents, spec, model, n_sequences, context_size, prepend_bos(sae))


def _bos_token_id(model: Any) -> int | None:
    tokenizer = getattr(model, "tokenizer", None)
    return getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None


def pack_documents(
    documents: Iterator[Any], spec: str, model: Any, n_sequences: int, context_size: int, bos: bool
) -> Any:
    """Tokenise and pack documents into ``[n_sequences, context_size]`` rows the way SAE Lens does.

    Every row starts with BOS when the SAE was trained with ``prepend_bos`` (SAE Lens' default), and documents
    are separated by BOS inside a row (SAE Lens' default ``sequence_separator_token="bos"``).
    """
    import torch
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos_id = _bos_token_id(model)

    def token_stream() -> Iterator[Any]:
        for document in documents:
            if isinstance(document, str):
                if usable_tokenizer(model) is None:
                    raise LoadError(
                        f"token source {spec!r} holds text but the model has no tokenizer (none, or an empty "
                        "one: its directory holds no tokenizer files); give pretokenised ids (.npy/.pt) or load "
                        "a model with its tokenizer (tokenizer.save_pretrained into the model directory)"
                    )
                if not document.strip():
                    continue
                ids = model.to_tokens(document, prepend_bos=False, truncate=False, move_to_device=False)[0]
            else:
                ids = torch.as_tensor(document).reshape(-1)
            if ids.numel():
                yield ids.to(torch.long).cpu()

    rows = []
    for row in concat_and_batch_sequences(
        token_stream(),
        context_size=context_size,
        begin_batch_token_id=bos_id if bos else None,
        begin_sequence_token_id=None,
        sequence_separator_token_id=bos_id,
    ):
        rows.append(row)
        if len(rows) == n_sequences:
            break
    if not rows:
        raise LoadError(
            f"token source {spec!r} holds fewer than {context_size} tokens: not one sequence of "
            f"context_size={context_size} can be built; give more text or a smaller context_size"
        )
    if len(rows) < n_sequences:
        warnings.warn(
            f"token source {spec!r} ran out after {len(rows)} sequences of {context_size} tokens "
            f"({len(rows) * context_size} tokens; n_tokens asked for {n_sequences * context_size})",
            stacklevel=2,
        )
    return torch.stack(rows)


def _parse_hf_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, query = spec[len("hf:") :].partition("?")
    options = dict(parse_qsl(query, keep_blank_values=False))
    unknown = set(options) - {"split", "name", "column", "data_dir"}
    if not name or unknown:
        raise ConfigError(
            f"token source {spec!r} is malformed; write hf:<dataset>[?split=train&name=<config>&column=text]"
            + (f" (unknown keys: {', '.join(sorted(unknown))})" if unknown else "")
        )
    return name, options


def hf_documents(spec: str) -> Iterator[Any]:
    """Stream rows of a Hugging Face dataset (``datasets.load_dataset(..., streaming=True)``)."""
    name, options = _parse_hf_spec(spec)
    split = options.get("split", "train")
    try:
        import datasets
    except ImportError:
        raise LoadError(f"token source {spec!r} needs the 'datasets' package: pip install datasets") from None
    kwargs: dict[str, Any] = {"split": split, "streaming": True}
    if "name" in options:
        kwargs["name"] = options["name"]
    if "data_dir" in options:
        kwargs["data_dir"] = options["data_dir"]
    try:
        dataset = datasets.load_dataset(name, **kwargs)
    except Exception as error:
        if is_unavailable_error(error) or _offline() or isinstance(error, FileNotFoundError):
            raise _dataset_unavailable(name, split, error) from None
        raise
    return _stream_rows(dataset, spec, name, split, options.get("column"))


def _stream_rows(dataset: Any, spec: str, name: str, split: str, column: str | None) -> Iterator[Any]:
    """Rows of a streaming dataset; a network failure while streaming becomes the same clear error."""
    try:
        yield from _iter_rows(_numbered(dataset, "row"), spec, column)
    except LoadError:
        raise
    except Exception as error:
        if is_unavailable_error(error):
            raise _dataset_unavailable(name, split, error) from None
        raise


def _dataset_unavailable(name: str, split: str, error: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"dataset {name!r} (split {split!r}) is not available on this machine ({offline_state()}). "
        f"Download it once with network access: python -c \"import datasets; datasets.load_dataset('{name}', "
        f"split='{split}').save_to_disk('{name.replace('/', '_')}')\" and set tokens= to that directory, "
        f"or run with network access and the same HF_HOME. Original error: {type(error).__name__}: {error}"
    )


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def local_documents(path: Path) -> Iterator[Any]:
    """Documents (strings or token-id sequences) from a local file or ``save_to_disk`` directory."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return _saved_dataset_rows(path)
    if suffix in (".txt", ".md"):
        text = path.read_text(encoding="utf-8")
        return iter([paragraph for paragraph in text.split("\n\n") if paragraph.strip()])
    if suffix == ".jsonl":
        return _iter_rows(_jsonl_rows(path), str(path), None)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return _iter_rows(_numbered(table.to_pylist(), "row"), str(path), None)
    if suffix == ".npy":
        import numpy as np

        return _array_documents(np.load(path, allow_pickle=False), path)
    if suffix in (".pt", ".pth"):
        import torch

        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise LoadError(f"could not read token ids from {str(path)!r}: {error}") from None
        if isinstance(loaded, Mapping):
            key = next((k for k in TOKEN_COLUMNS if k in loaded), None)
            if key is None:
                raise LoadError(
                    f"{str(path)!r} holds a dict without a token tensor; store it under one of {TOKEN_COLUMNS}"
                )
            loaded = loaded[key]
        return _array_documents(loaded, path)
    raise LoadError(
        f"token file {str(path)!r} has an unknown type {suffix or '(no suffix)'!r}; "
        "use .txt, .jsonl, .parquet, .npy or .pt, or a datasets.save_to_disk directory"
    )


def _array_documents(array: Any, path: Path) -> Iterator[Any]:
    import torch

    tensor = torch.as_tensor(array)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise LoadError(f"{str(path)!r} holds {tensor.dtype} values; token ids must be integers")
    if tensor.ndim == 1:
        return iter([tensor])
    if tensor.ndim == 2:
        return iter(list(tensor))
    raise ShapeMismatchError(
        f"{str(path)!r} holds an array of shape {tuple(tensor.shape)}; token ids must be 1-D (one stream) "
        "or 2-D (one sequence per row)"
    )


def _numbered(rows: Iterable[Any], unit: str) -> Iterator[tuple[str, Any]]:
    for number, row in enumerate(rows, start=1):
        yield f"{unit} {number}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise LoadError(f"{str(path)!r} line {number} is not JSON: {error.msg}") from None


def _saved_dataset_rows(path: Path) -> Iterator[Any]:
    try:
        import datasets

        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise LoadError(
            f"token directory {str(path)!r} is not a dataset saved with datasets' save_to_disk: {error}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return _iter_rows(_numbered(loaded, "row"), str(path), None)


def _iter_rows(rows: Iterator[tuple[str, Any]], spec: str, column: str | None) -> Iterator[Any]:
    """Pick the text (or token-id) field of each ``(location, row)``: ``column`` if given, else the first known
    column. A value that is neither text nor a list of integer ids is a :class:`LoadError` naming the source,
    the row (``"line 3"``) and the problem."""
    for location, row in rows:
        if isinstance(row, str):
            yield row
            continue
        if not isinstance(row, Mapping):
            raise LoadError(
                f"token source {spec!r}, {location}: a row of type {type(row).__name__}; expected an object"
            )
        if column is None:
            column = next((c for c in (*TOKEN_COLUMNS, *TEXT_COLUMNS) if c in row), None)
            if column is None:
                column = next((key for key, value in row.items() if isinstance(value, str)), None)
            if column is None:
                raise LoadError(
                    f"token source {spec!r} has no text or token column (looked for {TEXT_COLUMNS + TOKEN_COLUMNS}); "
                    f"its columns are {sorted(row)}; for hf: sources name one with ?column=<name>"
                )
        if column not in row:
            raise LoadError(
                f"token source {spec!r}, {location}: no column {column!r}; its columns are {sorted(row)}"
            )
        yield _document(row[column], spec, location, column)


def _document(value: Any, spec: str, location: str, column: str) -> Any:
    """``value`` as a document: text (a string) or token ids (a list of integers), checked."""
    where = f"token source {spec!r}, {location}: {column!r}"
    shown = "null" if value is None else f"a {type(value).__name__} ({_short(value)})"
    if column in TEXT_COLUMNS:
        if isinstance(value, str):
            return value
        raise LoadError(
            f"{where} is {shown}, not text; give a string (token ids belong in a column named "
            f"{'/'.join(TOKEN_COLUMNS)}), or drop the row"
        )
    if column not in TOKEN_COLUMNS and isinstance(value, str):
        return value
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        expected = "a list of integer token ids" if column in TOKEN_COLUMNS else "text or a list of token ids"
        raise LoadError(f"{where} is {shown}; expected {expected}")
    if isinstance(value, (list, tuple)):
        bad = next((item for item in value if isinstance(item, bool) or not isinstance(item, int)), _NO_ITEM)
        if bad is not _NO_ITEM:
            raise LoadError(
                f"{where} holds {_short(bad)}, not an integer token id; token ids must be integers"
            )
    return value


_NO_ITEM = object()


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
