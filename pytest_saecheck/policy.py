"""Which token positions an evaluation counts. One policy applies to the splice, the ablations and the averages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TokenPolicy:
    """Positions excluded from the average are also left untouched by the splice and by the ablations.

    - ``exclude_bos``: exclude position 0 (the BOS token, or the first token of a sequence without one);
    - ``exclude_token_ids``: exclude every position holding one of these token ids (special tokens);
    - ``pad_token_id``: exclude padding wherever it occurs.
    """

    exclude_bos: bool = True
    exclude_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_token_ids", tuple(int(t) for t in self.exclude_token_ids))

    def excluded_ids(self) -> tuple[int, ...]:
        ids = set(self.exclude_token_ids)
        if self.pad_token_id is not None:
            ids.add(int(self.pad_token_id))
        return tuple(sorted(ids))

    def kept_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean ``[batch, pos]`` mask of the positions that are evaluated."""
        import torch

        kept = torch.ones_like(tokens, dtype=torch.bool)
        if self.exclude_bos:
            kept[:, 0] = False
        ids = self.excluded_ids()
        if ids:
            kept &= ~torch.isin(tokens, torch.tensor(ids, device=tokens.device, dtype=tokens.dtype))
        return kept

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude_token_ids"] = list(self.exclude_token_ids)
        return data
