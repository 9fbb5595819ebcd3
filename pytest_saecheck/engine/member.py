"""One dictionary of an evaluation: where it reads and writes, how it reconstructs, which variants it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pytest_saecheck import normalisation as norm
from pytest_saecheck.dictionaries import Dictionary, DictionaryInfo, describe
from pytest_saecheck.engine.accumulate import Accumulator
from pytest_saecheck.engine.cut import ModelCut, Site
from pytest_saecheck.errors import ConfigError, NonFiniteError, ShapeMismatchError
from pytest_saecheck.hookpoints import HookRecord, ResolvedPoints, resolve_points


class Variant(enum.Enum):
    """A spliced model: the SAE's reconstruction, zero ablation, or mean ablation at the written hook."""

    SAE = "sae"
    ZERO = "zero"
    MEAN = "mean"


@dataclass(frozen=True)
class AblationPlan:
    """Decided once per dictionary before the pass.

    ``templated``: the zero/mean-ablated continuations do not depend on the tokens (a residual write hook with
    at most position 0, always the same token, excluded), so each is computed once for one sequence;
    otherwise ``per_batch`` lists every variant run with each batch.
    """

    templated: bool
    per_batch: tuple[Variant, ...]


@dataclass
class Template:
    """A token-independent ablated continuation (``AblationPlan.templated``), shared by every sequence.

    ``final``: its final residual, ``[1, seq_len, d_model]``, or ``[1, 1, d_model]`` when it is the same at every
    position (the model's dtype, on the unembedding's device).
    ``log_probs``: its ``[seq_len, d_vocab_out]`` float32 log-probabilities (one row expanded over the positions
    in the second case) when held for the
    whole pass, or None when the pass's template budget is spent and they are recomputed from ``final`` for each
    batch (the same operations on the same input: the same numbers).
    """

    final: torch.Tensor
    log_probs: torch.Tensor | None


def token_independent(site: Site, tokens: torch.Tensor, kept: torch.Tensor) -> bool:
    """True when ablating ``site`` at the kept positions gives the same continuation for every sequence."""
    if not site.is_residual:
        return False
    excluded = ~kept
    if excluded[:, 1:].any():
        return False
    if excluded[:, 0].any():
        return bool(excluded[:, 0].all()) and bool((tokens[:, 0] == tokens[0, 0]).all())
    return True


class Member:
    """One dictionary in an evaluation, with its own sums."""

    def __init__(self, name: str, sae: Dictionary, cut: ModelCut, given: norm.Normalisation | None) -> None:
        self.name = name
        self.sae = sae
        self.info: DictionaryInfo = describe(sae)
        # one resolver from the dictionary's own record to the backend's points (pytest_saecheck.hookpoints)
        self.points: ResolvedPoints = resolve_points(
            HookRecord.of(sae), cut.model, transcoder=self.info.is_transcoder
        )
        self.info = dataclasses.replace(self.info, points=self.points.to_dict())
        self.read: Site = cut.site(self.points.read.point, self.info.hook_head_index)
        self.write: Site = self.read
        if self.info.is_transcoder:
            self.write = cut.site(self.points.write.point, None)
        self._check_order()
        self.given = given or norm.attached_normalisation(sae)  # evaluate()'s option, else the checkpoint's
        self.normalisation = self.given or norm.NONE
        self.sae_device = torch.device(getattr(sae, "device", None) or cut.device)
        self._check_weights()
        self.plan = AblationPlan(False, (Variant.SAE,))
        self.mean: torch.Tensor | None = None
        self.templates: dict[Variant, Template] = {}
        self.acc: Accumulator | None = None
        self.joint_acc: Accumulator | None = None

    # --- where it reads and writes --------------------------------------------------------------------

    def _check_order(self) -> None:
        read, write = self.read, self.write
        if read is write:
            return
        reads_late = (
            read.entry > write.entry
            or (write.is_residual and not read.is_residual and read.layer >= write.entry)
            or (not write.is_residual and not read.is_residual and read.layer > write.layer)
        )
        if reads_late:
            raise ConfigError(
                f"the transcoder reads {read.hook_name!r} after it writes {write.hook_name!r}; "
                "hook_name must come before hook_name_out in the forward pass"
            )

    def check_firing_order(self, order: Sequence[str]) -> None:
        """Same-block transcoders: the read hook must fire before the write hook."""
        read, write = self.read.hook_name, self.write.hook_name
        if read != write and read in order and write in order and order.index(read) > order.index(write):
            raise ConfigError(
                f"the transcoder reads {read!r} after it writes {write!r} in the forward pass; "
                "hook_name must come before hook_name_out"
            )

    def capture_sites(self, cut: ModelCut) -> list[Site]:
        """The sites one original run must capture for this dictionary (read, write, and where the
        continuation starts)."""
        sites = [self.read, self.write]
        if not self.write.is_residual:
            sites.append(cut.residual_site(self.write.entry))
        return sites

    def views(
        self, captured: Mapping[str, torch.Tensor], cut: ModelCut
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(base, x_in, x_out, x_out_full)`` from one run's captured activations.

        ``base`` is the residual stream where the continuation starts; ``x_in``/``x_out`` the read and written
        activations as the dictionary sees them; ``x_out_full`` the whole written activation (all heads).
        """
        x_out_full = captured[self.write.hook_name]
        base = (
            x_out_full if self.write.is_residual else captured[cut.residual_site(self.write.entry).hook_name]
        )
        x_in = self.read.select(captured[self.read.hook_name])
        return base, x_in, self.write.select(x_out_full), x_out_full

    def check_widths(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        for site, width, expected, label in (
            (self.read, x_in.shape[-1], self.info.d_in, "d_in"),
            (self.write, x_out.shape[-1], self.info.d_out, "d_out"),
        ):
            if width != expected:
                head = f" (head {site.head_index})" if site.head_index is not None else ""
                raise ShapeMismatchError(
                    f"the SAE expects {label}={expected} but hook {site.hook_name!r}{head} has width {width}; "
                    "the SAE was trained on a different model or hook"
                )

    @property
    def dtype_name(self) -> str:
        """The dtype the dictionary computes in (its first parameter's), e.g. ``"float32"``."""
        first = next((param for _, param in self.sae.named_parameters()), None)
        return dtype_name(first.dtype) if first is not None else ""

    # --- reconstruction ---------------------------------------------------------------------------------

    def _check_weights(self) -> None:
        for name, param in self.sae.named_parameters():
            # One sum (no [d_in, d_sae] boolean temporary) decides for a finite tensor; a NaN or inf makes it
            # non-finite, and so may an overflow, which the elementwise check then tells apart.
            if (
                not torch.isfinite(param.detach().sum(dtype=torch.float32))
                and not torch.isfinite(param).all()
            ):
                raise NonFiniteError(
                    f"SAE parameter {name!r} contains NaN or inf; the SAE file is corrupt or training diverged. "
                    "Re-export the SAE from a finite checkpoint."
                )

    def reconstruct(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, reconstruction)``: the dictionary's own code, inside its activation normalisation."""
        x = x_in.to(self.sae_device)
        scaler = self.normalisation.scaler() if self.normalisation.active else None
        if scaler is not None:
            x = scaler.scale(x)
        latents, recon = self.info.reconstruct(self.sae, x)
        if scaler is not None:
            recon = scaler.unscale(recon)
        if latents.is_sparse:
            latents = latents.to_dense()
        if not torch.isfinite(recon).all():
            raise NonFiniteError(
                "the SAE's reconstruction contains NaN or inf on finite input; check its weights, dtype "
                f"({self.sae.dtype}) and activation normalisation ({self.info.normalize_activations})"
            )
        return latents, recon

    def variant_values(
        self, x_out: torch.Tensor, kept: torch.Tensor, variants: Sequence[Variant], recon: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The written activation with each variant at the kept positions (the original elsewhere)."""
        keep = kept.to(x_out.device)[..., None]
        out = []
        for variant in variants:
            if variant is Variant.SAE:
                assert recon is not None
                value = recon.to(device=x_out.device, dtype=x_out.dtype)
            elif variant is Variant.ZERO:
                value = torch.zeros((), device=x_out.device, dtype=x_out.dtype)
            else:
                assert self.mean is not None
                value = self.mean.to(device=x_out.device, dtype=x_out.dtype)
            out.append(torch.where(keep, value, x_out))
        return out


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (as results record dtypes)."""
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def hook_z_reshaping_off(saes: Sequence[Any]) -> Iterator[None]:
    """SAE Lens SAEs on hook_z may reshape [.., heads, d_head] themselves; the engine feeds them flat input."""
    switched = [sae for sae in saes if getattr(sae, "hook_z_reshaping_mode", False)]
    try:
        for sae in switched:
            sae.turn_off_forward_pass_hook_z_reshaping()
        yield
    finally:
        for sae in switched:
            sae.turn_on_forward_pass_hook_z_reshaping()
