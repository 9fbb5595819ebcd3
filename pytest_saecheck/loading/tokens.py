"""Evaluation tokens: Hugging Face datasets (streamed) and local files, packed into rows, after the plug-ins'
hooks."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from pytest_saecheck.defaults import DEFAULT_N_TOKENS
from pytest_saecheck.errors import (
    ConfigError,
    LoadError,
    SAECheckError,
    ShapeMismatchError,
    WeightsUnavailableError,
)
from pytest_saecheck.loading import chat
from pytest_saecheck.loading.models import usable_tokenizer
from pytest_saecheck.loading.offline import is_unavailable_error, offline_state
from pytest_saecheck.loading.resolve import hooks_then_builtin
from pytest_saecheck.loading.specs import (
    absolute_path,
    default_context_size,
    local_path,
    looks_like_path,
    prepend_bos,
    sae_metadata,
)

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

TEXT_COLUMNS = ("text", "content", "document", "story")
TOKEN_COLUMNS = ("input_ids", "tokens", "token_ids")


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

    ``spec``: ``"hf:<dataset>[?split=...&name=...&column=...]"``, a name a plug-in loads
    (``pytest_saecheck_load_tokens``; the bundled demo's ``"demo"``), or a local ``.txt``/``.jsonl``/
    ``.parquet``/``.npy``/``.pt`` file or ``datasets.save_to_disk`` directory (relative to the working
    directory); ``"chat:<source>"`` renders every row with the model's chat template, and a conversation column
    (``conversation``/``conversations``/``messages``) is rendered without the prefix too
    (:mod:`pytest_saecheck.loading.chat`). ``model`` tokenises text (its tokenizer) and gives BOS; ``sae`` (optional) says whether rows
    start with BOS (``prepend_bos``) and the default ``context_size`` (its training context, else
    :data:`~pytest_saecheck.defaults.DEFAULT_CONTEXT_SIZE`).
    ``n_tokens``: about how many tokens, in whole rows. ``seed``: for sources that sample (a plug-in's generator).

    Returns a LongTensor ``[ceil(n_tokens / context_size), context_size]`` on the CPU (fewer rows, with a
    warning, when the source runs out). Raises :class:`LoadError` (missing, unreadable or malformed source,
    text without a tokenizer), :class:`ShapeMismatchError`, :class:`WeightsUnavailableError`.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ConfigError(f"n_tokens must be a positive integer (tokens to evaluate), got {n_tokens!r}")
    source = (
        "context_size"
        if context_size is not None
        else ("the SAE's training context_size" if sae_metadata(sae, "context_size") else None)
    )
    context_size = _within_model_context(default_context_size(context_size, sae), source, model)
    tokens, _ = hooks_then_builtin(
        lambda hook: hook.pytest_saecheck_load_tokens(
            spec=spec, model=model, sae=sae, n_tokens=n_tokens, context_size=context_size, seed=seed
        ),
        lambda: builtin_load_tokens(spec, model, sae, n_tokens, context_size, seed),
    )
    return as_token_tensor(tokens, spec)


def _within_model_context(resolved: int, source: str | None, model: Any) -> int:
    """The row length: ``resolved``, capped at the model's ``n_ctx`` when it is the default (``source`` None).

    Raises :class:`ConfigError` when ``context_size`` (or the SAE's training context) exceeds ``n_ctx``.
    """
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if not isinstance(n_ctx, int) or resolved <= n_ctx:
        return resolved
    if source is None:
        return n_ctx
    raise ConfigError(
        f"{source} {resolved} exceeds the model's context length n_ctx={n_ctx}; set context_size to at most "
        f"{n_ctx} (the saecheck setting context_size)"
    )


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
    source, is_chat = chat.split_chat(spec)
    path = local_path(source)
    if path is None and source.startswith("hf:"):
        documents = hf_documents(source)
    elif path is not None:
        check_capacity(spec, path, n_tokens, context_size)
        documents = local_documents(path, n_sequences * context_size)
    else:
        raise LoadError(
            f"token source {spec!r} is not an existing file or directory (looked for {absolute_path(source)}); give a "
            ".txt, .jsonl, .parquet, .npy "
            "or .pt file, a datasets.save_to_disk directory, 'hf:<dataset>' or 'demo'"
        )
    if is_chat:
        documents = chat.as_conversations(documents, spec)
    return pack_documents(documents, spec, model, n_sequences, context_size, prepend_bos(sae))


def _bos_token_id(model: Any) -> int | None:
    tokenizer = getattr(model, "tokenizer", None)
    return getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None


def pack_documents(
    documents: Iterator[Any], spec: str, model: Any, n_sequences: int, context_size: int, bos: bool
) -> Any:
    """Tokenise and pack documents into ``[n_sequences, context_size]`` rows the way SAE Lens does.

    Every row starts with BOS when the SAE was trained with ``prepend_bos`` (SAE Lens' default), and documents
    are separated by BOS inside a row (SAE Lens' default ``sequence_separator_token="bos"``); neither is doubled
    when a document already starts with it (a chat template's own BOS). Conversations are rendered with the
    chat template (:func:`pytest_saecheck.loading.chat.render`).
    """
    import torch
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos_id = _bos_token_id(model)

    def token_stream() -> Iterator[Any]:
        for document in documents:
            if isinstance(document, chat.Conversation):
                ids = chat.render(document, usable_tokenizer(model), spec)
            elif isinstance(document, str):
                if usable_tokenizer(model) is None:
                    raise LoadError(
                        f"token source {spec!r} holds text but the model has no tokenizer (none, or an empty "
                        "one: its directory holds no tokenizer files); give pretokenised ids (.npy/.pt) or load "
                        "a model with its tokenizer (tokenizer.save_pretrained into the model directory)"
                    )
                if not document.strip():
                    continue
                if hasattr(model, "to_tokens"):  # a HookedTransformer
                    ids = model.to_tokens(document, prepend_bos=False, truncate=False, move_to_device=False)[
                        0
                    ]
                else:  # a Hugging Face model with its tokenizer
                    ids = torch.tensor(model.tokenizer(document, add_special_tokens=False)["input_ids"])
            else:
                ids = torch.as_tensor(document).reshape(-1)
            if ids.numel():
                yield ids.to(torch.long).cpu()

    from pytest_saecheck.loading.progress import loading_bar

    # Rows go straight into one preallocated tensor: 8 bytes per token, no list of every row or token.
    out = torch.empty((n_sequences, context_size), dtype=torch.long)
    filled = 0
    rows = concat_and_batch_sequences(
        token_stream(),
        context_size=context_size,
        begin_batch_token_id=bos_id if bos else None,
        begin_sequence_token_id=None,
        sequence_separator_token_id=bos_id,
    )
    with loading_bar(n_sequences * context_size, f"loading {spec}") as bar:
        for row in rows:
            out[filled] = row
            filled += 1
            bar.update(context_size)
            if filled == n_sequences:
                break
    if not filled:
        raise LoadError(
            f"token source {spec!r} holds fewer than {context_size} tokens: not one sequence of "
            f"context_size={context_size} can be built; give more text or a smaller context_size"
        )
    if filled < n_sequences:
        warnings.warn(
            f"token source {spec!r} ran out after {filled} sequences of {context_size} tokens "
            f"({filled * context_size} tokens; n_tokens asked for {n_sequences * context_size})",
            stacklevel=2,
        )
        return out[:filled].clone()
    return out


def token_capacity(path: Path) -> int | None:
    """An upper bound on the tokens a local source can give (``None`` when unknown), read without its contents.

    Text and JSON: every token spans at least one byte of its file (byte-level BPE, byte fallback and word
    tokenisers alike), plus a separator per line; Parquet: the same of its uncompressed size in its footer;
    ``.npy``: the array's size from its header, plus a separator per row. Used to refuse ``n_tokens`` beyond
    the source before any token is read (a mistyped ``200_000_000`` for ``200_000``).
    """
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return None
        if suffix in (".txt", ".md", ".jsonl"):
            return 2 * path.stat().st_size + 1
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            return size + 2 * meta.num_rows
        if suffix == ".npy":
            import numpy as np

            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return int(array.size) + 2 * (int(array.shape[0]) if array.ndim == 2 else 1)
    except (OSError, ValueError):
        return None  # unreadable: the loader itself names the problem
    return None


def check_capacity(spec: str, path: Path, n_tokens: int, context_size: int) -> None:
    """Raise :class:`ConfigError` when ``n_tokens`` exceeds what the local source at ``path`` can hold."""
    capacity = token_capacity(path)
    if capacity is None:
        return
    asked = n_sequences_for(n_tokens, context_size) * context_size
    if asked > capacity:
        raise ConfigError(
            f"n_tokens={n_tokens:,} asks for {asked:,} tokens but token source {spec!r} holds at most "
            f"{capacity:,} (from its size on disk); lower n_tokens (the saecheck setting n_tokens) or give a "
            "bigger source"
        )


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
    except Exception as error:  # every failure becomes one of the package's load errors, naming the spec
        # only "not cached here and no network" is unavailable (a skip by default); a misspelt split, config
        # or a missing local folder is the user's error, offline or not
        remote = not looks_like_path(name) and not Path(name).exists()
        if is_unavailable_error(error) or (remote and isinstance(error, FileNotFoundError)):
            raise _dataset_unavailable(name, split, error) from None
        raise LoadError(
            f"token source {spec!r} could not be loaded: {type(error).__name__}: {error}. Check the dataset "
            "name and the split=, name= (config) and data_dir= of the spec"
        ) from None
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


#: Rows the suggested offline copy of a hub dataset streams (documents of a few hundred tokens: enough for the
#: default n_tokens many times over).
SAVED_ROWS = 20_000


def _dataset_unavailable(name: str, split: str, error: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"dataset {name!r} (split {split!r}) is not available on this machine ({offline_state()}). "
        f'Save only the rows a test needs, once, with network access: python -c "import datasets; '
        f"rows = datasets.load_dataset('{name}', split='{split}', streaming=True).take({SAVED_ROWS}); "
        f"datasets.Dataset.from_list(list(rows)).save_to_disk('{name.replace('/', '_')}')\" (streams "
        f"{SAVED_ROWS:,} rows instead of downloading the whole split; take more if the run says the tokens ran "
        "short) and set tokens= to that directory; or give tokens= a local token file (.npy, .pt, .jsonl). "
        f"Original error: {type(error).__name__}: {error}"
    )


def local_documents(path: Path, max_tokens: int | None = None) -> Iterator[Any]:
    """Documents (strings or token-id sequences) from a local file or ``save_to_disk`` directory, read as they
    are consumed; ``max_tokens``: a one-stream ``.npy`` is read no further than this.

    Raises :class:`LoadError` naming the file for every read error (not text, not an array, an array of Python
    objects, which is never unpickled), while opening it or while reading its rows.
    """
    try:
        documents = _local_documents(path, max_tokens)
    except SAECheckError:
        raise
    except (OSError, ValueError, TypeError, RuntimeError, EOFError) as error:
        raise _unreadable(path, error) from None
    return _reading(documents, path)


def _unreadable(path: Path, error: BaseException) -> LoadError:
    suffix = path.suffix.lower()
    if suffix == ".npy" and ("pickle" in str(error) or "allow_pickle" in str(error)):
        why = (
            "it is not a .npy file of integer token ids (an array of Python objects or another file type); "
            "such files are never unpickled: save the ids with np.save(path, ids.astype(np.int64))"
        )
    elif isinstance(error, UnicodeDecodeError):
        why = f"it is not UTF-8 text ({error.reason} at byte {error.start})"
    else:
        why = f"{type(error).__name__}: {error}"
    return LoadError(f"could not read tokens from {str(path)!r}: {why}")


def _reading(documents: Iterator[Any], path: Path) -> Iterator[Any]:
    try:
        yield from documents
    except SAECheckError:
        raise
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise _unreadable(path, error) from None


def _local_documents(path: Path, max_tokens: int | None) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if path.is_dir():
        return _saved_dataset_rows(path)
    if suffix in (".txt", ".md"):
        text = path.read_text(encoding="utf-8")
        return iter([paragraph for paragraph in text.split("\n\n") if paragraph.strip()])
    if suffix == ".jsonl":
        return _iter_rows(_jsonl_rows(path), str(path), None)
    if suffix == ".parquet":
        return _iter_rows(_numbered(_parquet_rows(path), "row"), str(path), None)
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise LoadError(
                f"could not read token ids from {str(path)!r}: {error}; save integer ids with "
                "numpy.save(path, ids) (no object arrays)"
            ) from None
        if array.ndim == 1 and max_tokens is not None:
            array = array[:max_tokens]
        return _array_documents(array, path)
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
    """Documents of a token-id array (a tensor, or a memory-mapped numpy array read row by row)."""
    import numpy as np
    import torch

    if isinstance(array, np.ndarray):
        if not np.issubdtype(array.dtype, np.integer):
            raise LoadError(f"{str(path)!r} holds {array.dtype} values; token ids must be integers")
    else:
        array = torch.as_tensor(array)
        if array.dtype.is_floating_point or array.dtype == torch.bool:
            raise LoadError(f"{str(path)!r} holds {array.dtype} values; token ids must be integers")
    if array.ndim not in (1, 2):
        raise ShapeMismatchError(
            f"{str(path)!r} holds an array of shape {tuple(array.shape)}; token ids must be 1-D (one stream) "
            "or 2-D (one sequence per row)"
        )
    return _array_rows(array)


def _array_rows(array: Any) -> Iterator[Any]:
    """One document for a 1-D array, one per row of a 2-D one; rows are copied only as they are read."""
    import numpy as np
    import torch

    for row in [array] if array.ndim == 1 else array:
        yield torch.from_numpy(np.array(row, dtype=np.int64)) if isinstance(row, np.ndarray) else row


def _parquet_rows(path: Path, batch_rows: int = 1024) -> Iterator[Any]:
    """The rows of a Parquet file as dicts, read row group by row group, ``batch_rows`` rows at a time (never
    the whole table, whose decoded form can be many times the rows asked for)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise LoadError(f"could not read Parquet file {str(path)!r}: {error}") from None
    for group in range(handle.num_row_groups):
        for batch in handle.iter_batches(batch_size=batch_rows, row_groups=[group]):
            yield from batch.to_pylist()


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
            column = next((c for c in (*TOKEN_COLUMNS, *chat.CHAT_COLUMNS, *TEXT_COLUMNS) if c in row), None)
            if column is None:
                column = next((key for key, value in row.items() if isinstance(value, str)), None)
            if column is None:
                raise LoadError(
                    f"token source {spec!r} has no text, token or conversation column (looked for "
                    f"{TEXT_COLUMNS + TOKEN_COLUMNS + chat.CHAT_COLUMNS}); "
                    f"its columns are {sorted(row)}; for hf: sources name one with ?column=<name>"
                )
        if column not in row:
            raise LoadError(
                f"token source {spec!r}, {location}: no column {column!r}; its columns are {sorted(row)}"
            )
        yield _document(row[column], spec, location, column)


def _document(value: Any, spec: str, location: str, column: str) -> Any:
    """``value`` as a document: text (a string), token ids (a list of integers) or a conversation, checked."""
    if column in chat.CHAT_COLUMNS:
        return chat.conversation(value, spec, location)
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


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
