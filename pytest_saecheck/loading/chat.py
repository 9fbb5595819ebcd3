"""Chat-formatted token sources: conversations rendered with the model's own tokenizer chat template.

SAEs on instruct models are trained on chat-formatted data: SAE Lens (``use_chat_formatting=True``, since v6.38.0)
renders each conversation (a list of ``{"role": ..., "content": ...}`` messages, read from a ``conversation``,
``conversations`` or ``messages`` column, in that order) with ``tokenizer.apply_chat_template(..., tokenize=True)``
and packs the rendered ids into context-sized rows like any other document; a plain ``text`` row is wrapped as
one user message. This module does the same for evaluation tokens:

- ``chat:<source>`` (any token source: ``chat:hf:lmsys/lmsys-chat-1m``, ``chat:./conversations.jsonl``, a
  ``save_to_disk`` directory) renders every row with the chat template; text rows become one user message;
- without the prefix, a row whose column holds a conversation (a list of role/content mappings) is rendered too;
- the default token source of an SAE whose metadata says ``use_chat_formatting: true``, or names a known chat
  dataset (:data:`CHAT_DATASETS`), is ``chat:`` + its dataset (:func:`default_is_chat`).

Template tokens (``<start_of_turn>``, ``<|im_start|>``: the tokenizer's special tokens other than BOS/EOS/PAD)
are kept by the token policy, as SAE Lens keeps them in training (its ``get_special_token_ids`` excludes only
BOS/EOS/PAD-like tokens); BOS/EOS/PAD follow the policy like everywhere else. :func:`template_summary` says how
many evaluated positions hold template tokens and how to exclude them (``exclude_token_ids``); the plugin records
it with the evaluation (``chat_template`` in the JSON).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_saecheck.errors import LoadError

CHAT_PREFIX = "chat:"
"""The token-source prefix that renders every row with the model's chat template."""

CHAT_COLUMNS: tuple[str, ...] = ("conversation", "conversations", "messages")
"""The columns read as conversations, in SAE Lens' order (``ActivationsStore`` with ``use_chat_formatting``)."""

CHAT_DATASETS: frozenset[str] = frozenset({"lmsys/lmsys-chat-1m"})
"""Datasets recorded as ``dataset_path`` by SAE Lens' pretrained loaders for SAEs trained on chat data
(Goodfire's Llama-3.x-Instruct SAEs): their default token source is rendered with the chat template."""

_PROBE = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})


@dataclass(frozen=True)
class Conversation:
    """One conversation read from a token source: its messages and where it was read (``"row 3"``)."""

    messages: tuple[Mapping[str, Any], ...]
    location: str


def split_chat(spec: str) -> tuple[str, bool]:
    """``(source, True)`` for ``"chat:<source>"``; ``(spec, False)`` otherwise."""
    if spec.startswith(CHAT_PREFIX):
        return spec[len(CHAT_PREFIX) :], True
    return spec, False


def as_conversations(documents: Iterator[Any], spec: str) -> Iterator[Conversation]:
    """The documents of a ``chat:`` source as conversations: text becomes one user message (as SAE Lens wraps
    text rows). Raises :class:`LoadError` for token ids, which no template can render."""
    for number, document in enumerate(documents, start=1):
        if isinstance(document, Conversation):
            yield document
        elif isinstance(document, str):
            yield conversation(document, spec, f"document {number}")
        else:
            raise LoadError(
                f"token source {spec!r}, document {number}: token ids cannot be rendered with a chat template; "
                "give text or conversations, or drop the 'chat:' prefix"
            )


def conversation(value: object, spec: str, location: str) -> Conversation:
    """``value`` checked as a conversation: a list of ``{"role": str, "content": str}`` mappings; a string is
    one user message (as SAE Lens wraps text rows).

    Raises :class:`LoadError` naming the source, the row and the malformed message.
    """
    if isinstance(value, str):
        return Conversation(({"role": "user", "content": value},), location)
    where = f"token source {spec!r}, {location}"
    if not isinstance(value, (list, tuple)) or not value:
        raise LoadError(
            f"{where}: a conversation must be a non-empty list of {{'role': ..., 'content': ...}} messages, "
            f"not {type(value).__name__} {_short(value)}; fix or drop the row"
        )
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise LoadError(
                f"{where}, message {index}: {_short(message)} is not a {{'role', 'content'}} mapping"
            )
        missing = [key for key in ("role", "content") if not isinstance(message.get(key), str)]
        if missing:
            raise LoadError(
                f"{where}, message {index}: {' and '.join(missing)} must be text; the message is "
                f"{_short(dict(message))}; give every message a string role and content"
            )
    return Conversation(tuple(value), location)


def require_template(tokenizer: Any, spec: str) -> None:
    """Raise :class:`LoadError` unless ``tokenizer`` has a chat template to render ``spec``'s conversations."""
    if tokenizer is None:
        raise LoadError(
            f"token source {spec!r} holds conversations but the model has no tokenizer to render them; load the "
            "model with its tokenizer, or give pretokenised ids"
        )
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise LoadError(
            f"token source {spec!r} holds conversations but the tokenizer {name!r} has no chat template "
            "(tokenizer.chat_template is empty: a base model's tokenizer); evaluate on the instruct model whose "
            "template the SAE was trained with, set tokenizer.chat_template, or give text (drop the 'chat:' prefix)"
        )


def render(item: Conversation, tokenizer: Any, spec: str) -> Any:
    """The token ids ``[n]`` (LongTensor) of one conversation rendered with ``tokenizer``'s chat template, as
    SAE Lens' ``tokenize_with_chat_template`` renders it (``apply_chat_template(tokenize=True)``, no generation
    prompt). Raises :class:`LoadError` (no template, or the template rejects the conversation, named by row)."""
    import torch

    require_template(tokenizer, spec)
    try:
        ids = tokenizer.apply_chat_template(list(item.messages), tokenize=True, return_dict=False)
    except Exception as error:
        raise LoadError(
            f"token source {spec!r}, {item.location}: the chat template rejected this conversation "
            f"({type(error).__name__}: {error}); fix or drop the row"
        ) from None
    if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding whatever return_dict says
        ids = ids["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def template_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids of the special tokens the chat template writes, other than BOS/EOS/PAD (those follow the policy's
    ``exclude_special_tokens``): found by rendering a two-message probe conversation. Empty without a template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return ()
    from pytest_saecheck.policy import SPECIAL_TOKEN_ATTRIBUTES

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    special -= {getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_ATTRIBUTES}
    rendered = render(Conversation(_PROBE, "probe"), tokenizer, "probe").tolist()
    return tuple(sorted({int(i) for i in rendered if i in special}))


def template_summary(tokens: Any, tokenizer: Any, kept: Any) -> dict[str, Any] | None:
    """What the chat template put in the evaluated tokens, for the record: ``template_token_ids``, the number of
    ``template_positions`` among the ``kept`` positions (boolean ``[batch, pos]``, the token policy's) and
    ``kept_positions``. None when the tokenizer has no template or no template token occurs."""
    import torch

    ids = template_token_ids(tokenizer)
    if not ids:
        return None
    is_template = torch.isin(tokens.cpu(), torch.tensor(ids, dtype=tokens.dtype))
    if not bool(is_template.any()):
        return None
    kept = kept.cpu()
    return {
        "template_token_ids": list(ids),
        "template_tokens": [tokenizer.convert_ids_to_tokens(i) for i in ids],
        "template_positions": int((is_template & kept).sum()),
        "kept_positions": int(kept.sum()),
        "policy": "template tokens are kept, as SAE Lens keeps them in training; exclude them with "
        "exclude_token_ids=[...]",
    }


def default_is_chat(use_chat_formatting: Any, dataset: str) -> bool:
    """True when an SAE's training data was chat-formatted: its metadata's ``use_chat_formatting`` is true, or
    its ``dataset`` (``dataset_path``) is one of :data:`CHAT_DATASETS`."""
    return bool(use_chat_formatting) or dataset.removeprefix("hf:") in CHAT_DATASETS


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__: Sequence[str] = (
    "CHAT_COLUMNS",
    "CHAT_DATASETS",
    "CHAT_PREFIX",
    "Conversation",
    "as_conversations",
    "conversation",
    "default_is_chat",
    "render",
    "require_template",
    "split_chat",
    "template_summary",
    "template_token_ids",
)
