"""The splice, written once: read, reconstruct, write back, continue (scoring is the caller's).

Used by every evaluation of one dictionary or a release (:mod:`pytest_saecheck.engine.passes`), by the joint
splice of several at once, and by downstream tasks (:mod:`pytest_saecheck.checks.tasks`); the activation
normalisation pre-pass (:func:`prepass`) is shared by them too. Every function reaches the model only through
:class:`~pytest_saecheck.engine.cut.ModelCut`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from pytest_saecheck.engine.capture import capture_then_stop
from pytest_saecheck.engine.cut import CapturedRun, ModelCut, Site, SiteHook
from pytest_saecheck.engine.member import Member, Variant

Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called with ``(x_in, x_out, latents, reconstruction)`` once a dictionary has reconstructed (``[batch, pos,
d_in]``, ``[batch, pos, d_out]``, ``[batch, pos, d_sae]``, ``[batch, pos, d_out]``), before the model continues."""


def written(
    m: Member,
    x_in: torch.Tensor | None,
    x_out_full: torch.Tensor,
    kept: torch.Tensor,
    variants: Sequence[Variant],
    observe: Observer | None = None,
) -> list[torch.Tensor]:
    """The whole written activation for each of ``variants``: the dictionary's reconstruction of ``x_in``
    (``Variant.SAE``), zeros or the mean at the positions ``kept`` (``[batch, pos]`` bool), the original
    ``x_out_full`` elsewhere. ``x_in`` may be None when no variant needs the reconstruction."""
    x_out = m.write.select(x_out_full)
    recon = None
    if Variant.SAE in variants:
        assert x_in is not None
        m.check_widths(x_in, x_out)
        latents, recon = m.reconstruct(x_in)
        if observe is not None:
            observe(x_in, x_out, latents, recon)
        del latents
    values = m.variant_values(x_out, kept, variants, recon)
    del recon
    return [m.write.write_back(x_out_full, value) for value in values]


def at_kept(activation: torch.Tensor, value: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``value`` (``[batch, pos, d]``, or broadcastable) at the ``kept`` positions (``[batch, pos]`` bool), the
    model's own ``activation`` elsewhere, in the activation's dtype and on its device."""
    value = value.to(device=activation.device, dtype=activation.dtype)
    return torch.where(kept.to(activation.device).unsqueeze(-1), value, activation)


def splice(
    cut: ModelCut,
    m: Member,
    run: CapturedRun,
    kept: torch.Tensor,
    variants: Sequence[Variant],
    observe: Observer | None = None,
) -> list[torch.Tensor]:
    """Final residuals ``[batch, pos, d_model]`` of ``run`` continued with ``m`` spliced in, one per variant."""
    base, x_in, _, x_out_full = m.views(run.captured, cut)
    values = written(m, x_in, x_out_full, kept, variants, observe)
    return cut.continue_from(run, m.write, base, values)


@dataclass
class Estimates:
    """What :func:`prepass` measured: per member name, E‖x_in‖ over the kept positions and the mean of x_out
    ``[d_out]`` (float64)."""

    input_norm: dict[str, float]
    mean: dict[str, torch.Tensor]


def prepass(
    cut: ModelCut,
    norm_of: Sequence[Member],
    mean_of: Sequence[Member],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> Estimates:
    """One run over ``batches`` (token ids ``[batch, pos]`` with their kept positions ``[batch, pos]``) up to the
    dictionaries' points: E‖x_in‖ of the members in ``norm_of`` (an activation normalisation estimate, SAE Lens'
    sqrt(d_in)/E‖x‖) and the mean of x_out of those in ``mean_of`` (mean ablation), in float64."""
    wanted = list({m.name: m for m in [*norm_of, *mean_of]}.values())
    sites = [site for m in wanted for site in m.capture_sites(cut)]
    norm_sums = {m.name: 0.0 for m in norm_of}
    mean_sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch, kept in batches:
        captured = capture_then_stop(cut, batch, sites)  # the blocks after the last point never run
        for m in wanted:
            _, x_in, x_out, _ = m.views(captured, cut)
            if m in norm_of:
                norm_sums[m.name] += float(x_in[kept.to(x_in.device)].double().norm(dim=-1).sum())
            if m in mean_of:
                total = x_out[kept.to(x_out.device)].double().sum(0)
                mean_sums[m.name] = mean_sums[m.name] + total if m.name in mean_sums else total
        count += int(kept.sum())
        del captured
    count = max(count, 1)
    return Estimates(
        {name: value / count for name, value in norm_sums.items()},
        {name: value / count for name, value in mean_sums.items()},
    )


def joint_splice(
    cut: ModelCut,
    members: Sequence[Member],
    tokens: torch.Tensor,
    kept: torch.Tensor,
    observe: dict[str, Observer],
) -> torch.Tensor:
    """Final residual of one run of ``tokens`` with every member spliced in at once; each reads the activation
    of the model with the members upstream of it already spliced in (a transcoder at its own read point)."""
    read_in: dict[str, torch.Tensor] = {}

    def write_hook(m: Member) -> SiteHook:
        def hook(activation: torch.Tensor) -> torch.Tensor:
            x_in = read_in.pop(m.name) if m.info.is_transcoder else m.read.select(activation)
            (value,) = written(m, x_in, activation, kept, [Variant.SAE], observe.get(m.name))
            return value

        return hook

    def read_hook(m: Member) -> SiteHook:
        def hook(activation: torch.Tensor) -> None:
            read_in[m.name] = m.read.select(activation)

        return hook

    # Writes first: a transcoder reading a point that another member writes reads the spliced activation.
    hooks: list[tuple[Site, SiteHook]] = [(m.write, write_hook(m)) for m in members]
    hooks += [(m.read, read_hook(m)) for m in members if m.info.is_transcoder]
    return cut.forward_with_hooks(tokens, hooks)
