"""Model surgery: everything the engine asks of a model, behind one protocol.

A :class:`ModelCut` resolves the points a dictionary reads and writes (:class:`Site`), runs the original model
once while capturing activations (:class:`CapturedRun`), continues that run from a point with replaced
activations, runs with replacement hooks (joint splicing), and unembeds. The engine, downstream tasks and the
model-family fit use nothing else of the model. :class:`HookedTransformerCut` is TransformerLens'
``HookedTransformer`` (it moves each tensor to the device of the block that uses it, ``n_devices > 1``);
:class:`pytest_saecheck.engine.hf.HFCut` is a Hugging Face ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pytest_saecheck.errors import ConfigError, HookNotFoundError, ModelStateError
from pytest_saecheck.hookpoints import HookSite, required_flags, resolve_hook

SiteHook = Callable[[torch.Tensor], torch.Tensor | None]
"""A replacement hook: the activation at a site in, the activation to use instead (or None: unchanged) out."""


class Site(Protocol):
    """A point where a dictionary reads or writes (shapes ``[batch, pos, ...]``).

    ``hook_name``: how the point is named in results and messages. ``layer``: the block it lies in.
    ``is_residual``: the point is the residual stream between blocks, where a run can be continued from the
    point itself; ``entry``: the block at whose start a continuation starts (``n_layers``: the end).
    """

    @property
    def hook_name(self) -> str: ...

    @property
    def layer(self) -> int: ...

    @property
    def head_index(self) -> int | None: ...

    @property
    def is_residual(self) -> bool: ...

    @property
    def entry(self) -> int: ...

    def select(self, activation: torch.Tensor) -> torch.Tensor:
        """The activation as the dictionary sees it (``[batch, pos, d]``)."""
        ...

    def write_back(self, activation: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """``activation`` with its dictionary-facing part replaced by ``replacement`` (inverse of ``select``)."""
        ...


@dataclass
class CapturedRun:
    """One original run of a batch: ``final`` is the residual stream before the final norm ``[batch, pos,
    d_model]``, ``captured`` the activations at the requested sites by ``hook_name``, ``order`` the order in
    which they fired; ``context`` is what the backend needs to continue this run (its own, opaque)."""

    final: torch.Tensor | None
    captured: dict[str, torch.Tensor]
    order: list[str]
    context: Any = field(default=None, repr=False)

    def take_final(self) -> torch.Tensor:
        """The final residual, which the run then no longer holds (its memory is freed with the caller's)."""
        final, self.final = self.final, None
        assert final is not None, "the final residual of this run was already taken"
        return final


def hooks_did_not_fire(missing: Sequence[str]) -> HookNotFoundError:
    """The error for TransformerLens hooks a captured forward pass never reached."""
    return HookNotFoundError(
        f"hook {', '.join(map(repr, missing))} did not fire in a forward pass of the model; the model "
        "computes it only under a setting that is off, or it is not on the forward path"
    )


class ModelCut(Protocol):
    """What the engine needs of a model (shapes: ``[batch, pos, ...]``; residuals ``[batch, pos, d_model]``)."""

    backend: str
    n_layers: int
    device: torch.device
    model: Any  # the model itself, read only by the hook-point resolver (pytest_saecheck.hookpoints)

    @property
    def d_vocab(self) -> int:
        """Token ids lie in ``[0, d_vocab)``."""
        ...

    @property
    def d_vocab_out(self) -> int:
        """The width of the logits."""
        ...

    @property
    def n_ctx(self) -> int | None:
        """The longest sequence the model takes, when it has a limit."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's forward pass."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None."""
        ...

    def tokenize(self, text: str, prepend_bos: bool | None) -> list[int]:
        """``text``'s token ids: with the model's BOS first (``True``), without (``False``), or as the model
        usually tokenises (``None``)."""
        ...

    def check(self) -> list[str]:
        """Refuse a model the engine cannot measure (:class:`ModelStateError`); the hooks already on it."""
        ...

    def site(self, name: Any, head_index: int | None) -> Site:
        """The point named ``name`` (:class:`HookNotFoundError` when the model has none such)."""
        ...

    def residual_site(self, entry: int) -> Site:
        """The residual stream at the start of block ``entry`` (``n_layers``: the end)."""
        ...

    def norm_output_site(self, site: Site) -> Site:
        """The output of the norm whose output ``site`` names, gain (and bias) applied, as a read point: on a module
        tree the norm's own output (``site`` itself), on a ``HookedTransformer`` its ``hook_normalized`` with the
        norm's weight applied on read (:class:`NormOutputSite`). Raises :class:`ConfigError` where the norm has
        no weight to apply."""
        ...

    def device_at(self, site: Site) -> torch.device:
        """The device of the block in which ``site`` fires: where its activations live."""
        ...

    @property
    def output_device(self) -> torch.device:
        """The device of the unembedding: where logits, and every per-token score, live."""
        ...

    def prepared(self, sites: Sequence[Site]) -> contextlib.AbstractContextManager[None]:
        """A context in which every site in ``sites`` fires (TransformerLens: the config flags of its hooks)."""
        ...

    def capture(self, tokens: torch.Tensor, sites: Sequence[Site]) -> CapturedRun:
        """One original run of ``tokens`` ``[batch, pos]``, capturing the activations at ``sites``."""
        ...

    def continue_from(
        self, run: CapturedRun, site: Site, base: torch.Tensor, replacements: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Final residuals of continuations of ``run`` that replace the activation at ``site`` by each of
        ``replacements``.

        ``base`` is the residual stream at ``site.entry`` (``[batch, pos, d_model]``; its batch and positions may
        be fewer than ``run``'s when every row is the same); for a point inside a block each replacement is the
        whole activation at that point.
        """
        ...

    def resumes(self, site: Site) -> bool:
        """Whether :meth:`continue_from` starts at ``site``'s layer (False: it runs the whole forward again)."""
        ...

    def forward_with_hooks(
        self, tokens: torch.Tensor, hooks: Sequence[tuple[Site, SiteHook]]
    ) -> torch.Tensor:
        """Final residual of a run with ``hooks`` (site, fn) applied in order."""
        ...

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, d_vocab_out]`` logits from final residuals."""
        ...


@dataclass(frozen=True)
class NormOutputSite:
    """A norm's output read at its ``hook_normalized`` (``normalized``) with the norm's ``weight`` and ``bias``
    applied on read (``[d_model]`` each): the point a Hugging Face ``pre_feedforward_layernorm.output`` names, on a
    ``HookedTransformer``. Read only: a replacement written there would be scaled by the gain again."""

    normalized: Site
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def hook_name(self) -> str:
        return self.normalized.hook_name

    @property
    def layer(self) -> int:
        return self.normalized.layer

    @property
    def head_index(self) -> int | None:
        return None

    @property
    def is_residual(self) -> bool:
        return False

    @property
    def entry(self) -> int:
        return self.normalized.entry

    def select(self, activation: torch.Tensor) -> torch.Tensor:
        out = activation * self.weight.to(activation.device)
        return out if self.bias is None else out + self.bias.to(activation.device)

    def write_back(self, activation: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"the norm output read at {self.hook_name!r} is a read point, not a write point")


def model_device(model: Any) -> torch.device:
    """Where the model computes (:func:`module_device`; the CPU for a model without parameters)."""
    return module_device(model, torch.device("cpu"))


def module_device(module: Any, default: torch.device) -> torch.device:
    """Where ``module`` computes: the execution device of its accelerate hook when it has one (a module offloaded
    to the CPU or disk by a ``device_map`` keeps its weights on the ``meta`` device and computes there), else the
    device of its first parameter, else ``default`` (no parameters, or all on ``meta``)."""
    execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    try:
        device: torch.device = next(module.parameters()).device
    except (StopIteration, AttributeError):
        return default
    return default if device.type == "meta" else device


def has_plain_unembed(model: Any) -> bool:
    """True when the model's unembedding is TransformerLens' plain affine map ``x @ W_U + b_U``.

    False (use the model's own forward) when anything could make the result differ: another unembedding
    class, hooks on it or its hook points, or a logit soft-cap.
    """
    from transformer_lens.components import Unembed

    unembed = getattr(model, "unembed", None)
    if type(unembed) is not Unembed:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in unembed.modules()):
        return False
    return not (getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0


def is_hooked_transformer(model: Any) -> bool:
    """True for a TransformerLens ``HookedTransformer`` (or anything with its hook dictionary and blocks)."""
    return hasattr(model, "cfg") and hasattr(model, "hook_dict") and hasattr(model, "blocks")


class HookedTransformerCut:
    """:class:`ModelCut` for TransformerLens' ``HookedTransformer`` (``start_at_layer``/``stop_at_layer`` cuts)."""

    backend = "transformer_lens"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.n_layers: int = int(model.cfg.n_layers)
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device(model.cfg.device or "cpu")
        self.plain_unembed = has_plain_unembed(model)
        # With n_devices > 1 TransformerLens spreads the blocks over devices (and moves the residual stream
        # between them); read where each block's parameters are instead of recomputing its placement rule.
        self.block_devices = [module_device(block, self.device) for block in model.blocks]
        last = self.block_devices[-1] if self.block_devices else self.device
        self._output_device = module_device(getattr(model, "unembed", None), last)

    # --- what the model is ----------------------------------------------------------------------------

    @property
    def d_vocab(self) -> int:
        return int(self.model.cfg.d_vocab)

    @property
    def d_vocab_out(self) -> int:
        return int(self.model.cfg.d_vocab_out)

    @property
    def n_ctx(self) -> int | None:
        return int(self.model.cfg.n_ctx)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.model.cfg.dtype
        return dtype

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def tokenize(self, text: str, prepend_bos: bool | None) -> list[int]:
        ids: list[int] = self.model.to_tokens(text, prepend_bos=prepend_bos)[0].tolist()
        return ids

    def check(self) -> list[str]:
        return check_hooked_transformer(self.model)

    # --- where ----------------------------------------------------------------------------------------

    def site(self, name: Any, head_index: int | None) -> HookSite:
        n_heads = getattr(self.model.cfg, "n_heads", None)
        return resolve_hook(str(name), head_index, self.n_layers, list(self.model.hook_dict), n_heads)

    def residual_site(self, entry: int) -> HookSite:
        name = (
            f"blocks.{entry}.hook_resid_pre"
            if entry < self.n_layers
            else f"blocks.{entry - 1}.hook_resid_post"
        )
        return self.site(name, None)

    def norm_output_site(self, site: Site) -> Site:
        """``blocks.L.<norm>.hook_normalized`` read with the norm's weight (and bias) applied: the norm's output,
        which TransformerLens 3 does not hook (its norms fire hook_normalized before the gain)."""
        name = site.hook_name
        if not name.endswith(".hook_normalized"):
            raise ConfigError(f"{name!r} is not a norm's hook_normalized: it has no norm output to read")
        norm = self.model.get_submodule(name.removesuffix(".hook_normalized"))
        weight = getattr(norm, "w", None)
        if weight is None:
            raise ConfigError(
                f"the dictionary reads the output of the norm at {name!r} (normalised × weight), but this model's "
                "norm has no weight: it was folded into the MLP or attention weights that read it when the model was loaded. "
                "Load the model "
                "without weight processing (HookedTransformer.from_pretrained_no_processing, or "
                "model_from_pretrained_kwargs={'fold_ln': False})"
            )
        bias = getattr(norm, "b", None)
        return NormOutputSite(site, weight.detach(), None if bias is None else bias.detach())

    def device_at(self, site: Site) -> torch.device:
        return self.block_devices[min(max(site.layer, 0), len(self.block_devices) - 1)]

    @property
    def output_device(self) -> torch.device:
        return self._output_device

    @contextlib.contextmanager
    def prepared(self, sites: Sequence[Site]) -> Iterator[None]:
        """Switch on the config flags that make the sites fire (``use_hook_mlp_in``, ...), then restore them."""
        cfg = self.model.cfg
        flags = {flag for site in sites for flag in required_flags(site.hook_name)}
        previous = {flag: getattr(cfg, flag, False) for flag in flags}
        try:
            for flag in flags:
                setattr(cfg, flag, True)
            yield
        finally:
            for flag, value in previous.items():
                setattr(cfg, flag, value)

    # --- runs -----------------------------------------------------------------------------------------

    def capture(self, tokens: torch.Tensor, sites: Sequence[Site]) -> CapturedRun:
        captured: dict[str, torch.Tensor] = {}
        order: list[str] = []

        def capture(activation: torch.Tensor, hook: Any) -> None:
            captured[hook.name] = activation
            order.append(hook.name)

        wanted = sorted({site.hook_name for site in sites})
        with self.model.hooks(fwd_hooks=[(name, capture) for name in wanted]):
            final = self.model(tokens, stop_at_layer=self.n_layers)
        missing = [name for name in wanted if name not in captured]
        if missing:
            raise hooks_did_not_fire(missing)
        return CapturedRun(final, captured, order)

    def continue_from(
        self, run: CapturedRun, site: Site, base: torch.Tensor, replacements: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if site.is_residual:
            stacked = torch.cat([r.to(base.device) for r in replacements], dim=0)
            return list(self._to_final(stacked, site.entry).chunk(len(replacements), dim=0))
        stacked_replacement = torch.cat(list(replacements), dim=0)

        def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            return stacked_replacement.to(activation.device)

        layer = site.layer
        batched = base.repeat(len(replacements), *([1] * (base.ndim - 1)))
        with self.model.hooks(fwd_hooks=[(site.hook_name, replace)]):
            block_out = self._blocks(batched, layer, layer + 1)
        return list(self._to_final(block_out, layer + 1).chunk(len(replacements), dim=0))

    def resumes(self, site: Site) -> bool:
        return True

    def forward_with_hooks(
        self, tokens: torch.Tensor, hooks: Sequence[tuple[Site, SiteHook]]
    ) -> torch.Tensor:
        def adapted(fn: SiteHook) -> Callable[[torch.Tensor, Any], torch.Tensor | None]:
            return lambda activation, hook: fn(activation)

        with self.model.hooks(fwd_hooks=[(site.hook_name, adapted(fn)) for site, fn in hooks]):
            final: torch.Tensor = self.model(tokens, stop_at_layer=self.n_layers)
            return final

    def _to_final(self, resid: torch.Tensor, start: int) -> torch.Tensor:
        if start >= self.n_layers:
            return resid
        return self._blocks(resid, start, self.n_layers)

    def _blocks(self, resid: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start`` to ``stop - 1`` on the residual ``[batch, pos, d_model]``. A shortformer model adds its
        positional embedding to every attention layer's queries and keys, not to the residual stream: a run that
        starts from the residual must be given it (``shortformer_pos_embed``), or its attention is position-blind.
        """
        if self.model.cfg.positional_embedding_type != "shortformer":
            out: torch.Tensor = self.model(resid, start_at_layer=start, stop_at_layer=stop)
            return out
        positions = self.model.W_pos[: resid.shape[1]].to(device=resid.device, dtype=resid.dtype)
        out = self.model(
            resid,
            start_at_layer=start,
            stop_at_layer=stop,
            shortformer_pos_embed=positions.unsqueeze(0).expand(resid.shape[0], -1, -1),
        )
        return out

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        if not self.plain_unembed:
            out: torch.Tensor = self.model(final_resid, start_at_layer=self.n_layers)
            return out
        # The model's own ln_final, then one addmm: TransformerLens 3's Unembed copies the 150 MB W_U.T on every
        # call first; the product is the same at the same speed without the copy.
        unembed = self.model.unembed
        final_resid = final_resid.to(unembed.W_U.device)
        normalized = (
            final_resid if self.model.cfg.normalization_type is None else self.model.ln_final(final_resid)
        )
        logits = torch.addmm(unembed.b_U, normalized.reshape(-1, normalized.shape[-1]), unembed.W_U)
        return logits.reshape(*normalized.shape[:-1], logits.shape[-1])


def check_hooked_transformer(model: Any) -> list[str]:
    """Refuse a TransformerLens model the engine cannot measure; return the hooks already on it (``"name
    (kind)"``).

    Raises :class:`ModelStateError` for a ``HookedSAETransformer`` with SAEs attached.
    """
    kind = type(model).__name__
    attached = getattr(model, "acts_to_saes", None)
    if attached:
        raise ModelStateError(
            f"the {kind} has SAEs attached at {', '.join(sorted(attached))}: the engine splices the SAE itself, "
            "so attached SAEs would change the 'original' model. Call model.reset_saes() first"
        )
    found = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            permanent = any(getattr(h, "is_permanent", False) for h in getattr(module, "fwd_hooks", []))
            found.append(f"{name or '(model)'} ({'permanent' if permanent else 'forward'} hook)")
    return found
