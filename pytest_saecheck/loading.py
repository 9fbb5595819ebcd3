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
import difflib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from pytest_saecheck import hookspecs
from pytest_saecheck.errors import ConfigError, LoadError, ShapeMismatchError, WeightsUnavailableError

DEMO = "demo"
DEMO_MODEL_NAME = "saecheck-demo"  # model_name and dataset_path in the demo SAEs' configs
DEFAULT_CONTEXT_SIZE = 128
TEXT_COLUMNS = ("text", "content", "document", "story")
TOKEN_COLUMNS = ("input_ids", "tokens", "token_ids")


# --------------------------------------------------------------------------------------------------------
# spec helpers


def _local_path(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path if path.exists() else None


def _looks_like_path(spec: str) -> bool:
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


def load_model(spec: str, device: str, dtype: str | None) -> Any:
    """Load a model: hooks first, then the built-in loaders."""
    hook = hookspecs.active_hook()
    if hook is not None:
        model = hook.pytest_saecheck_load_model(spec=spec, device=device, dtype=dtype)
        if model is not None:
            return model
    return builtin_load_model(spec, device, dtype)


def builtin_load_model(spec: str, device: str, dtype: str | None) -> Any:
    path = _local_path(spec)
    if path is None and spec == DEMO:
        from pytest_saecheck import demo

        return demo.load_model(device=device, dtype=dtype)
    if path is not None:
        return load_hf_directory(path, device, dtype)
    if _looks_like_path(spec):
        raise LoadError(
            f"model directory {spec!r} does not exist; give the path of a Hugging Face model directory "
            "(with config.json), a TransformerLens model name, or 'demo'"
        )
    return load_transformer_lens_model(spec, device, dtype)


def load_transformer_lens_model(name: str, device: str, dtype: str | None) -> Any:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

        close = difflib.get_close_matches(name, OFFICIAL_MODEL_NAMES, n=3, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise LoadError(
            f"model {name!r} is neither a local directory nor a model TransformerLens knows.{hint} "
            "Give a TransformerLens name (see transformer_lens.supported_models.OFFICIAL_MODEL_NAMES), "
            "the path of a local Hugging Face model directory, or 'demo'"
        ) from None
    try:
        with _quiet_deprecations():
            return HookedTransformer.from_pretrained(name, device=device, dtype=dtype or "float32")
    except Exception as error:
        if is_unavailable_error(error):
            raise WeightsUnavailableError(
                f"model {name!r} is not available on this machine ({offline_state()}). Download it once with "
                f'network access: python -c "from transformer_lens import HookedTransformer; '
                f"HookedTransformer.from_pretrained('{name}')\" and run with the same HF_HOME, or save it with "
                f"save_pretrained() and set model= to that directory"
            ) from None
        raise


def load_hf_directory(path: Path, device: str, dtype: str | None) -> Any:
    """Load a local Hugging Face causal LM directory into a TransformerLens ``HookedTransformer``.

    ``HookedTransformer.from_pretrained`` insists on an official model name, but the functions beneath it accept
    a local path; this follows the same steps (config from the directory, weights converted from the HF model,
    layer norm folded, writing weights and unembedding centred) without touching the network. The architecture
    must be one TransformerLens can convert (``config.json`` ``architectures[0]``, e.g. GPT2LMHeadModel).
    """
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LoadError(
            f"model path {str(path)!r} is not a Hugging Face model directory (no config.json); "
            "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype or "float32")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except Exception as error:
        raise LoadError(f"could not load the Hugging Face model in {str(path)!r}: {error}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        tokenizer = None
    if tokenizer is None:
        warnings.warn(
            f"no tokenizer in {path}: text token sources cannot be used with this model "
            "(save one there with tokenizer.save_pretrained, or give pretokenised .npy/.pt tokens)",
            stacklevel=2,
        )
    try:
        cfg = tl_loading.get_pretrained_model_config(
            str(path), hf_cfg=hf_model.config.to_dict(), fold_ln=True, device=device, dtype=torch_dtype
        )
        state_dict = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=torch_dtype)
    except Exception as error:
        architecture = (getattr(hf_model.config, "architectures", None) or ["?"])[0]
        raise LoadError(
            f"TransformerLens cannot convert the model in {str(path)!r} (architecture {architecture}): {error}. "
            "Only architectures TransformerLens supports can be loaded; or register a "
            "pytest_saecheck_load_model hook that returns a HookedTransformer"
        ) from None
    with _quiet_deprecations():
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    del hf_model, state_dict
    model.move_model_modules_to_device()
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------------
# SAEs


def load_sae(spec: str, device: str, dtype: str | None) -> Any:
    """Load an SAE: hooks first, then the built-in loaders."""
    hook = hookspecs.active_hook()
    if hook is not None:
        sae = hook.pytest_saecheck_load_sae(spec=spec, device=device, dtype=dtype)
        if sae is not None:
            return sae
    return builtin_load_sae(spec, device, dtype)


def builtin_load_sae(spec: str, device: str, dtype: str | None) -> Any:
    demo_name = demo_sae_name(spec)
    if demo_name is not None:
        from pytest_saecheck import demo

        if demo_name not in demo.SAE_NAMES:
            raise LoadError(f"no demo SAE named {demo_name!r}; the demo SAEs are {', '.join(demo.SAE_NAMES)}")
        return demo.load_sae(demo_name, device=device, dtype=dtype)
    path = _local_path(spec)
    if path is not None:
        return load_sae_directory(path, device, dtype)
    if _looks_like_path(spec):
        raise LoadError(
            f"SAE directory {spec!r} does not exist; give the path of a directory saved with "
            "SAE.save_model(), an SAE Lens 'release/id' pair, or 'demo/<name>'"
        )
    release, sae_id = split_release(spec)
    return load_sae_release(release, sae_id, device, dtype)


def load_sae_directory(path: Path, device: str, dtype: str | None) -> Any:
    if not path.is_dir() or not (path / "cfg.json").is_file():
        raise LoadError(
            f"SAE path {str(path)!r} is not an SAE Lens directory (no cfg.json); save one with sae.save_model(dir)"
        )
    from sae_lens import SAE

    try:
        return SAE.load_from_disk(path, device=device, dtype=dtype)
    except Exception as error:
        raise LoadError(f"could not load the SAE in {str(path)!r}: {type(error).__name__}: {error}") from None


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


def load_tokens(spec: str, model: Any, sae: Any, n_tokens: int, context_size: int, seed: int) -> Any:
    """Load evaluation tokens ``[n_sequences, context_size]``: hooks first, then the built-in sources."""
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
            f"token source {spec!r} is not an existing file or directory; give a .txt, .jsonl, .parquet, .npy "
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
                if getattr(model, "tokenizer", None) is None:
                    raise LoadError(
                        f"token source {spec!r} holds text but the model has no tokenizer; "
                        "give pretokenised ids (.npy/.pt) or load a model with its tokenizer"
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
        yield from _iter_rows(iter(dataset), spec, column)
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
        return _iter_rows(iter(table.to_pylist()), str(path), None)
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


def _jsonl_rows(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
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
    return _iter_rows(iter(loaded), str(path), None)


def _iter_rows(rows: Iterator[Any], spec: str, column: str | None) -> Iterator[Any]:
    """Pick the text (or token-id) field of each row: ``column`` if given, else the first known column."""
    for row in rows:
        if isinstance(row, str):
            yield row
            continue
        if not isinstance(row, Mapping):
            raise LoadError(
                f"token source {spec!r} has a row of type {type(row).__name__}; expected an object"
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
            raise LoadError(f"token source {spec!r} has no column {column!r}; its columns are {sorted(row)}")
        yield row[column]
