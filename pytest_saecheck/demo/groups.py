"""The demo's token grouping ``demo_constructs``: the construct of the demo language each token belongs to.

``agreement``, ``brackets``, ``copying`` (the names construct), ``arithmetic``: the same ground truth the demo
generator labels (:mod:`pytest_saecheck.demo.language`), recovered from the tokens alone. Registered as the
``token_groups`` value ``"demo_constructs"`` by the demo's plug-in (:mod:`pytest_saecheck.demo.plugin`).
Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_saecheck.demo.language import NUMBERS, OPENERS, SPECIAL_TOKENS, VOCAB
from pytest_saecheck.groups import Grouping

GROUPING_NAME = "demo_constructs"
"""The ``token_groups`` setting value of :func:`demo_constructs`."""
DEMO_CONSTRUCTS: tuple[str, ...] = ("agreement", "brackets", "copying", "arithmetic")
"""The group names, in label order."""


def demo_construct_labels(ids: Sequence[int]) -> list[int]:
    """The construct (index into :data:`DEMO_CONSTRUCTS`, ``-1`` for special tokens) of each demo token id.

    Every demo sentence starts a construct with a distinctive token (``the`` agreement, an opening bracket,
    ``when`` names, a digit arithmetic) and ends with ``.``; special tokens (``<bos>``, ``<eos>``) belong to
    none. This recovers the generator's ``construct`` latent from the tokens alone.
    """
    starts = {"the": 0, **dict.fromkeys(OPENERS, 1), "when": 2, **dict.fromkeys(NUMBERS, 3)}
    labels, current = [], -1
    for token_id in ids:
        word = VOCAB[token_id] if 0 <= token_id < len(VOCAB) else None
        if word is None or word in SPECIAL_TOKENS:
            labels.append(-1)
            current = -1
            continue
        if current == -1:
            current = starts.get(word, -1)
        labels.append(current)
        if word == ".":
            current = -1
    return labels


def demo_constructs() -> Grouping:
    """Group demo tokens ``[n_sequences, seq_len]`` by the construct they belong to (:data:`DEMO_CONSTRUCTS`)."""

    def label(tokens: Any) -> Any:
        import torch

        rows = [demo_construct_labels(row) for row in tokens.to("cpu").tolist()]
        return torch.tensor(rows, dtype=torch.long)

    return Grouping(GROUPING_NAME, DEMO_CONSTRUCTS, label)


__all__ = ["DEMO_CONSTRUCTS", "GROUPING_NAME", "demo_construct_labels", "demo_constructs"]
