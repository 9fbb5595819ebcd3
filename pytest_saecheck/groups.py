"""Built-in token groupings for ``evaluate(..., token_groups=...)`` and the ``token_groups`` setting.

A :class:`Grouping` is a callable of the tokens ``[n_sequences, seq_len]`` returning integer labels of the same
shape (``-1`` = no group), with the names of its groups. Built in:

- :func:`token_class`: each token's class from the tokenizer's strings: ``special`` (the tokenizer's special
  tokens), ``whitespace``, ``digits``, ``punctuation`` (every character a Unicode punctuation or symbol),
  ``word start`` (a word token that starts with a space, a ``Ġ``/``▁`` space marker, or any word token of a
  tokenizer that has no space markers, such as a word-level one) and ``word continuation`` (the rest, e.g. a
  WordPiece ``##`` piece);
- :func:`position_buckets`: the position in the sequence, in doubling buckets ``0``, ``1``, ``2-3``, ``4-7``,
  ... (or the edges you give);
- a plug-in's named groupings (``pytest_saecheck_groupings``, :func:`named_groupings`): the bundled demo's
  ``demo_constructs`` (:mod:`pytest_saecheck.demo.groups`).

:func:`resolve` turns a setting value (``"token_class"``, ``"position"``, a plug-in's name or a python path
``"module:attribute"``) into a grouping. Importing this module imports no torch.
"""

from __future__ import annotations

import importlib
import itertools
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_saecheck import extensions
from pytest_saecheck.errors import ConfigError

BUILTIN_GROUPINGS: tuple[str, ...] = ("token_class", "position")
"""The setting values naming a built-in grouping (anything else must be a plug-in's name or ``module:attribute``)."""

TOKEN_CLASSES: tuple[str, ...] = (
    "special",
    "whitespace",
    "digits",
    "punctuation",
    "word start",
    "word continuation",
)
_SPACE_MARKERS = ("Ġ", "▁")


@dataclass(frozen=True)
class Grouping:
    """Named groups and the function labelling tokens with them.

    ``label(tokens)`` maps token ids ``[n_sequences, seq_len]`` to int64 labels of the same shape: ``k`` for
    ``names[k]``, ``-1`` for no group. Calling the grouping calls ``label``.
    """

    kind: str
    names: tuple[str, ...]
    label: Callable[[Any], Any]

    def __call__(self, tokens: Any) -> Any:
        return self.label(tokens)


def _lookup(table: Sequence[int]) -> Callable[[Any], Any]:
    """Labels by token id from a per-id table (ids outside it get -1)."""

    def label(tokens: Any) -> Any:
        import torch

        lookup = torch.tensor([*table, -1], dtype=torch.long)
        ids = tokens.to("cpu").long()
        ids = torch.where((ids >= 0) & (ids < len(table)), ids, torch.full_like(ids, len(table)))
        return lookup[ids]

    return label


def classify_token(text: str, raw: str, special: bool, markers: bool) -> str:
    """The class (one of :data:`TOKEN_CLASSES`) of one token, from its decoded ``text`` and ``raw`` vocabulary
    string; ``markers``: whether the tokenizer marks word starts (a leading space, ``Ġ`` or ``▁``)."""
    if special:
        return "special"
    body = text.strip()
    if not body:
        return "whitespace"
    if body.isdigit():
        return "digits"
    if all(unicodedata.category(char)[0] in "PS" for char in body):
        return "punctuation"
    if raw.startswith("##"):
        return "word continuation"
    starts = text[:1].isspace() or raw.startswith(_SPACE_MARKERS)
    return "word start" if starts or not markers else "word continuation"


def token_class(tokenizer: Any) -> Grouping:
    """Group tokens by their class (:data:`TOKEN_CLASSES`), read from a Hugging Face ``tokenizer``'s strings.

    Raises :class:`ConfigError` when ``tokenizer`` is None (a model without a tokenizer).
    """
    if tokenizer is None:
        raise ConfigError(
            "token_groups='token_class' reads the tokenizer's strings, but the model has no tokenizer; "
            "attach one (model.set_tokenizer) or choose token_groups='position'"
        )
    size = len(tokenizer)
    raws = tokenizer.convert_ids_to_tokens(list(range(size)))
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    raw_strings = [raw if isinstance(raw, str) else "" for raw in raws]
    markers = any(raw.startswith(_SPACE_MARKERS) or raw.startswith(" ") for raw in raw_strings)
    table = []
    for index, raw in enumerate(raw_strings):
        text = tokenizer.decode([index], clean_up_tokenization_spaces=False)
        table.append(TOKEN_CLASSES.index(classify_token(text, raw, index in special_ids, markers)))
    return Grouping("token_class", TOKEN_CLASSES, _lookup(table))


def position_buckets(seq_len: int, edges: Sequence[int] | None = None) -> Grouping:
    """Group positions into buckets ``[edges[k], edges[k+1])``; default doubling edges 0, 1, 2, 4, 8, ...

    Raises :class:`ConfigError` for edges that do not start at 0 or do not increase.
    """
    if edges is None:
        edges = [0, 1]
        while edges[-1] < seq_len:
            edges.append(edges[-1] * 2)
    edges = [int(edge) for edge in edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ConfigError(f"position bucket edges must start at 0 and increase, got {list(edges)}")
    if edges[-1] < seq_len:
        edges.append(seq_len)
    bounds = [(a, min(b, seq_len)) for a, b in itertools.pairwise(edges) if a < seq_len]
    names = tuple(str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in bounds)
    table = [next(k for k, (a, b) in enumerate(bounds) if a <= t < b) for t in range(seq_len)]

    def label(tokens: Any) -> Any:
        import torch

        if tokens.shape[1] != seq_len:
            raise ConfigError(
                f"the position grouping was built for {seq_len} positions, the tokens have {tokens.shape[1]}"
            )
        return torch.tensor(table, dtype=torch.long).expand(tokens.shape[0], -1).clone()

    return Grouping("position", names, label)


def named_groupings() -> dict[str, Callable[[Any, Any], Grouping]]:
    """The groupings plug-ins register by name (``pytest_saecheck_groupings``): ``{name: (model, tokens) ->
    Grouping}``. Raises :class:`ConfigError` when a plug-in takes a built-in name or two take one name."""
    named = extensions.named(extensions.relay().pytest_saecheck_groupings(), "token grouping")
    taken = sorted(set(named) & set(BUILTIN_GROUPINGS))
    if taken:
        raise ConfigError(
            f"a plug-in registers the token grouping name(s) {', '.join(taken)}, which are built in"
        )
    return named


def check_spec(value: str) -> str:
    """A ``token_groups`` setting value: a built-in or plug-in name or ``module:attribute``, else
    :class:`ConfigError`."""
    names = (*BUILTIN_GROUPINGS, *named_groupings())
    if value in names:
        return value
    module, _, attribute = value.partition(":")
    if not module or not attribute or not all(part.isidentifier() for part in module.split(".")):
        raise ConfigError(
            f"token_groups must be one of {', '.join(names)} or a python path 'module:attribute' "
            f"naming a Grouping (or a function (tokens, model) returning one), got {value!r}"
        )
    return value


def without_empty_groups(grouping: Grouping, tokens: Any, kept: Any) -> Grouping:
    """``grouping`` without the groups that hold no kept position of ``tokens`` (``kept``: boolean
    ``[n_sequences, seq_len]``, the token policy's): the ``special`` class when the policy excludes every special
    token, position ``0`` when it excludes BOS. The remaining groups keep their order and are renumbered."""
    import torch

    labels = grouping(tokens)
    present = sorted({int(k) for k in torch.unique(labels[kept.to(labels.device)]).tolist() if k >= 0})
    if len(present) == len(grouping.names):
        return grouping
    remap = torch.full((len(grouping.names) + 1,), -1, dtype=torch.long)  # the last slot maps -1 to -1
    for new, old in enumerate(present):
        remap[old] = new

    def label(batch: Any) -> Any:
        original = grouping(batch).long()
        return remap[torch.where(original >= 0, original, torch.full_like(original, len(grouping.names)))]

    return Grouping(grouping.kind, tuple(grouping.names[k] for k in present), label)


def resolve(spec: str, model: Any, tokens: Any, kept: Any = None) -> Grouping:
    """The grouping a ``token_groups`` setting names, for ``model`` and the evaluation ``tokens``.

    ``module:attribute`` names a :class:`Grouping`, or a function ``(tokens, model)`` returning one. Raises
    :class:`ConfigError` when the module or attribute is missing or gives something else. With ``kept`` (the
    token policy's boolean mask of ``tokens``), a built-in or plug-in grouping leaves out the groups no kept
    position falls in (:func:`without_empty_groups`), so every group it names has tokens to measure.
    """
    spec = check_spec(spec)
    builtin: Grouping | None = None
    if spec == "token_class":
        builtin = token_class(getattr(model, "tokenizer", None))
    elif spec == "position":
        builtin = position_buckets(int(tokens.shape[1]))
    elif spec in (named := named_groupings()):
        builtin = named[spec](model, tokens)
    if builtin is not None:
        return builtin if kept is None else without_empty_groups(builtin, tokens, kept)
    module_name, _, attribute = spec.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"token_groups={spec!r} cannot be imported: {error}") from None
    grouping: Any = target
    if not isinstance(target, Grouping) and callable(target):
        try:
            grouping = target(tokens, model)
        except Exception as error:  # a user's function: say which one failed and how it is called
            raise ConfigError(
                f"token_groups={spec!r} was called as {attribute}(tokens, model) and raised "
                f"{type(error).__name__}: {error}; it must take the token ids [n_sequences, seq_len] and the model "
                "and return a pytest_saecheck.groups.Grouping"
            ) from None
    if not isinstance(grouping, Grouping):
        raise ConfigError(
            f"token_groups={spec!r} must name a pytest_saecheck.groups.Grouping or a function (tokens, model) "
            f"returning one, got {type(grouping).__name__}"
        )
    return grouping


__all__ = [
    "BUILTIN_GROUPINGS",
    "TOKEN_CLASSES",
    "Grouping",
    "check_spec",
    "classify_token",
    "named_groupings",
    "position_buckets",
    "resolve",
    "token_class",
    "without_empty_groups",
]
