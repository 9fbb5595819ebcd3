"""Which token positions an evaluation counts. One policy applies to the splice, the ablations and the averages.

The rule (the README's "Token policy" section states it in the same words):

- a position is **kept** unless it is position 0 with ``exclude_bos``, or it holds an excluded token id
  (the model's BOS/EOS/PAD with ``exclude_special_tokens``, any id in ``exclude_token_ids``, and padding);
- only kept positions are spliced, ablated, and averaged into reconstruction metrics and KL;
- a next-token prediction (cross-entropy at position t, predicting the token at t + 1) counts only if
  position t is kept **and** the target token is not an excluded id: padding is never a target, and neither
  is a special token when the policy excludes them.

SAE Lens' ``run_evals`` (``exclude_special_tokens=True``) also leaves special-token positions out of the
splice and the averages, but it scores a prediction whenever the *input* position is not special, so it counts
the prediction of a document-separating BOS and of padding; it also zero-ablates every position. Those are the
two places where the numbers may differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pytest_saecheck.errors import ConfigError

if TYPE_CHECKING:
    import torch

SPECIAL_TOKEN_ATTRIBUTES: tuple[str, ...] = ("bos_token_id", "eos_token_id", "pad_token_id")
"""The tokenizer attributes whose ids ``exclude_special_tokens`` excludes (BOS, EOS, PAD)."""


@dataclass(frozen=True)
class TokenPolicy:
    """Which positions are spliced, ablated and averaged, and which predictions count.

    - ``exclude_bos``: exclude position 0 (the BOS token, or the first token of a sequence without one);
    - ``exclude_special_tokens``: exclude the model tokenizer's BOS, EOS and PAD ids wherever they occur
      (resolved into ``special_token_ids`` by :meth:`resolved_for` before an evaluation);
    - ``exclude_token_ids``: exclude every position holding one of these token ids;
    - ``pad_token_id``: exclude padding wherever it occurs (also as a prediction target).

    See the module docstring for the full rule.
    """

    exclude_bos: bool = True
    exclude_special_tokens: bool = True
    exclude_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    special_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_token_ids", tuple(sorted({int(t) for t in self.exclude_token_ids})))
        object.__setattr__(self, "special_token_ids", tuple(sorted({int(t) for t in self.special_token_ids})))

    def resolved_for(self, model: Any) -> TokenPolicy:
        """This policy with ``special_token_ids`` (and ``pad_token_id``) read from ``model.tokenizer``.

        A model without a tokenizer has no special tokens to exclude; ids already given are kept.

        Raises:
            ConfigError: an ``exclude_token_ids`` entry lies outside the model's vocabulary ``[0, d_vocab)``, so
                it could never exclude anything (a typo, or ids of another tokenizer).
        """
        d_vocab = getattr(model, "d_vocab", getattr(getattr(model, "cfg", None), "d_vocab", None))
        if isinstance(d_vocab, int):
            outside = [i for i in self.exclude_token_ids if not 0 <= i < d_vocab]
            if outside:
                raise ConfigError(
                    f"exclude_token_ids {outside} lie outside the model's vocabulary [0, {d_vocab}): they can never "
                    "occur, so they would exclude nothing; give ids of this model's tokenizer "
                    "(model.tokenizer.convert_tokens_to_ids(...))"
                )
        tokenizer = getattr(model, "tokenizer", None)
        if not self.exclude_special_tokens or tokenizer is None:
            return self
        ids = {getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_ATTRIBUTES}
        found = tuple(int(i) for i in ids if isinstance(i, int))
        pad = self.pad_token_id
        if pad is None and isinstance(getattr(tokenizer, "pad_token_id", None), int):
            pad = int(tokenizer.pad_token_id)
        return replace(self, special_token_ids=tuple({*self.special_token_ids, *found}), pad_token_id=pad)

    def excluded_ids(self) -> tuple[int, ...]:
        """Every token id that is left out wherever it occurs (as a position and as a prediction target)."""
        ids = set(self.exclude_token_ids)
        if self.exclude_special_tokens:
            ids.update(self.special_token_ids)
        if self.pad_token_id is not None:
            ids.add(int(self.pad_token_id))
        return tuple(sorted(ids))

    def _is_excluded_id(self, tokens: torch.Tensor) -> torch.Tensor:
        import torch

        ids = self.excluded_ids()
        if not ids:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, torch.tensor(ids, device=tokens.device, dtype=tokens.dtype))

    def kept_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean ``[batch, pos]``: the positions that are spliced, ablated and averaged."""
        kept = ~self._is_excluded_id(tokens)
        if self.exclude_bos:
            kept[:, 0] = False
        return kept

    def prediction_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean ``[batch, pos - 1]``: the next-token predictions that count (kept position, kept target)."""
        return self.kept_mask(tokens)[:, :-1] & ~self._is_excluded_id(tokens[:, 1:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "exclude_bos": self.exclude_bos,
            "exclude_special_tokens": self.exclude_special_tokens,
            "exclude_token_ids": list(self.exclude_token_ids),
            "pad_token_id": self.pad_token_id,
            "special_token_ids": list(self.special_token_ids),
            "excluded_ids": list(self.excluded_ids()),
        }
