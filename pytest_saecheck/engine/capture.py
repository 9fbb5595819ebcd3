"""Capture activations and stop the model as soon as the last one has fired (a partial forward pass)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pytest_saecheck.engine.cut import ModelCut, Site, hooks_did_not_fire


class _AllCaptured(Exception):
    """Raised by the capture hook once every wanted activation is in: ends the forward pass early."""


def capture_then_stop(cut: ModelCut, tokens: torch.Tensor, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    """The activations at ``sites`` (by hook name) for ``tokens`` ``[batch, pos]``, running the model only up to the last of
    them to fire: the blocks after it are never run (the mean-ablation pre-pass reads a hook in block ``L`` at
    the cost of ``L + 1`` blocks, not of the whole model).

    Raises :class:`HookNotFoundError` when a hook does not fire.
    """
    wanted = {site.hook_name for site in sites}
    captured: dict[str, torch.Tensor] = {}

    def capture_at(name: str) -> Callable[[torch.Tensor], None]:
        def capture(activation: torch.Tensor) -> None:
            captured[name] = activation
            if wanted <= captured.keys():
                raise _AllCaptured

        return capture

    unique = {site.hook_name: site for site in sites}
    try:
        cut.forward_with_hooks(tokens, [(site, capture_at(name)) for name, site in sorted(unique.items())])
    except _AllCaptured:
        pass
    missing = sorted(wanted - captured.keys())
    if missing:
        raise hooks_did_not_fire(missing)
    return captured
