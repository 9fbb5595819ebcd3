"""Before the pass: the dictionaries named, the per-dictionary options matched to them, the tokens checked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from pytest_saecheck.engine.cut import ModelCut
from pytest_saecheck.engine.member import Member
from pytest_saecheck.errors import ConfigError, EmptyTokenSetError, SAECheckError, ShapeMismatchError
from pytest_saecheck.policy import TokenPolicy


@contextlib.contextmanager
def naming(name: str, several: bool) -> Iterator[None]:
    """In a set, an error about one SAE names it: ``SAE 'blocks.3.hook_resid_pre': <the error>`` (same class)."""
    try:
        yield
    except SAECheckError as error:
        prefix = f"SAE {name!r}: "
        if not several or str(error).startswith(prefix):
            raise
        try:
            named = type(error)(prefix + str(error))
        except TypeError:  # an error class built from other arguments: raised as it is
            raise error from None
        raise named from error


def named_dictionaries(saes: Any) -> tuple[bool, dict[str, Any]]:
    """``(single, name → SAE)``; default names are the hooks, with ``#k`` where they repeat."""
    if isinstance(saes, Mapping):
        if not saes:
            raise ConfigError("the mapping of SAEs is empty")
        for name in saes:
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"SAEs are named by non-empty strings (report rows, test ids, EvaluationSet keys); got the "
                    f"{type(name).__name__} {name!r}: name it, e.g. {{'layer-8': sae}}"
                )
        return False, dict(saes)
    if isinstance(saes, (list, tuple)) or type(saes).__name__ == "ModuleList":
        if not len(saes):
            raise ConfigError("the sequence of SAEs is empty")
        from pytest_saecheck.dictionaries import describe

        labels = []
        for sae in saes:
            info = describe(sae)
            labels.append(
                info.hook_name if not info.is_transcoder else f"{info.hook_name}->{info.hook_name_out}"
            )
        counts: dict[str, int] = {}
        names = []
        for label in labels:
            if labels.count(label) > 1:
                names.append(f"{label}#{counts.get(label, 0)}")
                counts[label] = counts.get(label, 0) + 1
            else:
                names.append(label)
        return False, dict(zip(names, saes, strict=True))
    return True, {"": saes}


def per_member(option: str, value: object, named: Mapping[str, object], single: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if single:
        return {"": value}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{option} for a set of SAEs must be a mapping name → value (names: {', '.join(named)})"
        )
    unknown = set(value) - set(named)
    if unknown:
        raise ConfigError(f"{option} names SAEs that are not in the set: {', '.join(sorted(unknown))}")
    return dict(value)


def check_joint(members: Sequence[Member]) -> None:
    seen: dict[str, str] = {}
    for m in members:
        other = seen.setdefault(m.write.hook_name, m.name)
        if other != m.name:
            raise ConfigError(
                f"SAEs {other!r} and {m.name!r} both write {m.write.hook_name!r}: two dictionaries cannot be "
                "spliced into the same hook at once; evaluate them jointly in separate sets"
            )


def check_tokens(cut: ModelCut, tokens: object, policy: TokenPolicy) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ShapeMismatchError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ShapeMismatchError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ShapeMismatchError(
            f"tokens must be 2-D [n_sequences, seq_len], got shape {tuple(tokens.shape)}; "
            "use tokens.unsqueeze(0) for a single sequence"
        )
    n_sequences, seq_len = tokens.shape
    if n_sequences < 1 or seq_len < 2:
        raise ShapeMismatchError(
            f"tokens must hold at least 1 sequence of at least 2 positions, got shape {tuple(tokens.shape)}"
        )
    n_ctx = cut.n_ctx
    if n_ctx is not None and seq_len > n_ctx:
        raise ShapeMismatchError(f"seq_len {seq_len} exceeds the model's context length n_ctx={n_ctx}")
    d_vocab = cut.d_vocab
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        raise ShapeMismatchError(f"token ids must lie in [0, {d_vocab}) for this model, got [{low}, {high}]")
    if not policy.prediction_mask(tokens).any():
        raise EmptyTokenSetError(
            f"no prediction is left to evaluate after the token policy {policy.to_dict()} "
            f"on tokens of shape {tuple(tokens.shape)}; use longer sequences or exclude fewer tokens"
        )
    return tokens.to(cut.device)


def token_policy(
    policy: TokenPolicy | None,
    exclude_bos: bool,
    exclude_special_tokens: bool,
    exclude_token_ids: Sequence[int],
    pad_token_id: int | None,
) -> TokenPolicy:
    """The token policy of :func:`~pytest_saecheck.engine.evaluate`'s arguments (``policy=`` or the four others)."""
    if isinstance(exclude_token_ids, (str, bytes)):
        raise ConfigError(
            f"exclude_token_ids must be a sequence of integer token ids, got the string {exclude_token_ids!r}; "
            "write e.g. exclude_token_ids=[5, 7] (the '5,7' form is for the command line and ini files)"
        )
    if policy is None:
        return TokenPolicy(exclude_bos, exclude_special_tokens, tuple(exclude_token_ids), pad_token_id)
    if (exclude_bos, exclude_special_tokens, tuple(exclude_token_ids), pad_token_id) != (
        True,
        True,
        (),
        None,
    ):
        raise ConfigError(
            "give either policy= or exclude_bos/exclude_special_tokens/exclude_token_ids/pad_token_id, not both"
        )
    return policy


def check_sizes(batch_size: int, template_budget_bytes: int | None) -> None:
    """:class:`ConfigError` for a batch size below 1 or a template budget that is not a byte count."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if template_budget_bytes is not None and (
        isinstance(template_budget_bytes, bool)
        or not isinstance(template_budget_bytes, int)
        or template_budget_bytes < 0
    ):
        raise ConfigError(
            f"template_budget_bytes must be a non-negative integer number of bytes (or None for the default), "
            f"got {template_budget_bytes!r}"
        )


def hooks_warning(hooks: list[str]) -> str:
    """The warning for hooks found on the model (they run in every variant)."""
    return (
        f"the model has hooks attached ({', '.join(hooks)}); they run in every variant, original included, "
        "so the numbers measure the hooked model. Remove them (model.reset_hooks(including_permanent=True)) "
        "unless that is what you intend"
    )
