"""One resolver from a dictionary's own record of where it was trained to one point on the chosen backend.

A dictionary records its point in one or more of: ``hook_name`` / ``hook_name_out`` (TransformerLens 3 hook
names, TransformerLens 4 bridge canonical names, SAE Lens' ``mlp.hook_in``, or a module path as sparsify
(``layers.6``) and dictionary_learning (``gpt_neox.layers.6``) name it) and ``hf_hook_name`` /
``hf_hook_name_out`` (a Hugging Face module point, ``model.layers.12`` or ``<path>.input`` / ``<path>.output``).
:func:`resolve_points` turns that record into ONE read point and ONE write point (the same for an SAE):

- on a ``HookedTransformer``: the TransformerLens hook name that is that tensor;
- on a Hugging Face module tree: a :class:`~pytest_saecheck.hookpoints.sites.ModulePoint` checked against
  ``model.named_modules()``.

Where ``hook_name`` and ``hf_hook_name`` name different tensors (SAE Lens 6.30.1–6.54.12 labels Gemma Scope 2
transcoders ``blocks.L.hook_mlp_in``, the residual before the norm, while ``hf_hook_name`` says
``model.layers.L.pre_feedforward_layernorm.output``, gain applied), ``hf_hook_name`` — where the dictionary
was trained — wins, and :class:`ResolvedPoint` records the point used and why. Where a backend has no point
at that tensor, :class:`~pytest_saecheck.errors.NoFaithfulPointError` names the backend that has one; a name
the resolver does not know is refused with the faithful candidates, never a nearby name of the same width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pytest_saecheck.errors import ConfigError, HookNotFoundError, NoFaithfulPointError
from pytest_saecheck.hookpoints.layouts import (
    LAYOUTS,
    TL3_HOOKS,
    TL_NAMES,
    Layout,
    Site,
    canonical,
    layout_for,
    parse_tl_name,
)
from pytest_saecheck.hookpoints.sites import ModulePoint

Role = Literal["read", "write"]
OVERRIDE_KEY = "hook_name_override"
"""The metadata flag the loader sets when a test's ``hook_name`` setting replaces the dictionary's own record on
purpose (``hook_name_override=True``); the resolver then uses ``hook_name`` and ignores ``hf_hook_name``."""

HF_BACKEND_HINT = (
    'evaluate it on the Hugging Face backend (backend="hf", with the model loaded by transformers), '
    "which reads and writes module points"
)
EXPLICIT_HINT = (
    "give the point explicitly: set the dictionary's cfg.metadata.hf_hook_name (and hf_hook_name_out for a "
    "transcoder) to a path from model.named_modules(), with '.input' or '.output' ('model.layers.6' is that "
    "layer's output), or set the hook_name setting with hook_name_override=True"
)


@dataclass(frozen=True)
class HookRecord:
    """What a dictionary's config says about where it reads and writes (``cfg.metadata``, else ``cfg``)."""

    hook_name: str | None
    hook_name_out: str | None = None
    hf_hook_name: str | None = None
    hf_hook_name_out: str | None = None
    override: bool = False

    @classmethod
    def of(cls, sae: Any) -> HookRecord:
        from pytest_saecheck.dictionaries import metadata_value

        def text(key: str) -> str | None:
            value = metadata_value(sae, key)
            return str(value) if value else None

        return cls(
            text("hook_name"),
            text("hook_name_out"),
            text("hf_hook_name"),
            text("hf_hook_name_out"),
            bool(metadata_value(sae, OVERRIDE_KEY)),
        )

    def names(self, role: Role) -> tuple[str | None, str | None]:
        """``(hook_name, hf_hook_name)`` of the read or write side (a write falls back to the read side)."""
        if role == "read":
            return self.hook_name, self.hf_hook_name
        if self.hook_name_out is None and self.hf_hook_name_out is None:
            return self.hook_name, self.hf_hook_name
        return self.hook_name_out, self.hf_hook_name_out


@dataclass(frozen=True)
class ResolvedPoint:
    """The point used for one side of a dictionary, and why.

    ``point``: a TransformerLens hook name (``str``) or a :class:`ModulePoint`; ``site``: the tensor it is, when
    the resolver knows it; ``source``: which record gave it (``"hook_name"``, ``"hf_hook_name"``,
    ``"hook_name (override)"``, ...); ``reason``: one sentence for the report.
    """

    point: str | ModulePoint
    layer: int | None
    site: Site | None
    source: str
    reason: str

    @property
    def name(self) -> str:
        return str(self.point)

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.name,
            "layer": self.layer,
            "tensor": self.site.value if self.site is not None else None,
            "source": self.source,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ResolvedPoints:
    """Where a dictionary reads and writes on one backend (``"transformer_lens"`` or ``"hf"``)."""

    backend: str
    read: ResolvedPoint
    write: ResolvedPoint

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "read": self.read.to_dict(), "write": self.write.to_dict()}


# ----------------------------------------------------------------------------------------------------------
# parsing


def split_module_point(text: str, modules: set[str] | None = None) -> tuple[str, Literal["input", "output"]]:
    """``(path, io)`` of ``'model.layers.3'`` (its output), ``'<path>.output'`` or ``'<path>.input'``; a path that
    is itself a module in ``modules`` stays whole (a module may be named ``output``)."""
    if modules is not None and text in modules:
        return text, "output"
    if text.endswith(".input"):
        return text[: -len(".input")], "input"
    if text.endswith(".output"):
        return text[: -len(".output")], "output"
    return text, "output"


def _fields(record: HookRecord, role: Role) -> tuple[str, str]:
    if role == "write" and (record.hook_name_out is not None or record.hf_hook_name_out is not None):
        return "hook_name_out", "hf_hook_name_out"
    return "hook_name", "hf_hook_name"


def _same(a: tuple[int, Site], b: tuple[int, Site], role: Role, *, post_norms: bool, parallel: bool) -> bool:
    def key(layer: int, site: Site) -> tuple[int, Site]:
        site = canonical(site, post_norms=post_norms, parallel=parallel, role=role)
        return (layer - 1, Site.RESID_POST) if site is Site.RESID_PRE and layer > 0 else (layer, site)

    return key(*a) == key(*b)


def same_point(a: str, b: str) -> bool:
    """Whether two TransformerLens-style names are one tensor on every architecture (``blocks.0.hook_resid_post``
    and ``blocks.1.hook_resid_pre``, ``blocks.1.hook_out`` and ``blocks.1.hook_resid_post``)."""
    if a == b:
        return True
    pa, pb = parse_tl_name(a), parse_tl_name(b)
    if pa is None or pb is None:
        return False
    return _same(pa, pb, "write", post_norms=True, parallel=False)


def _described(name: str, found: tuple[int, Site] | None) -> str:
    return f"{name!r} ({found[1].value})" if found is not None else repr(name)


# ----------------------------------------------------------------------------------------------------------
# TransformerLens backend


class _TL:
    """A ``HookedTransformer`` as the resolver sees it: its hook names, norms and architecture."""

    def __init__(self, model: Any) -> None:
        cfg = model.cfg
        self.model = model
        self.hooks = set(model.hook_dict)
        self.n_layers = int(cfg.n_layers)
        self.post_norms = bool(getattr(cfg, "use_normalization_before_and_after", False))
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.architecture = getattr(cfg, "original_architecture", None)
        self.layout = layout_for(self.architecture, parallel=self.parallel)

    def hook(self, layer: int, site: Site, role: Role) -> str | None:
        """The hook that is ``site`` of block ``layer`` on this model, or None."""
        site = canonical(site, post_norms=self.post_norms, parallel=self.parallel, role=role)
        if site in (Site.ATTN_IN, Site.MLP_IN):
            norm = "ln1" if site is Site.ATTN_IN else "ln2"
            if (
                site is Site.MLP_IN and f"blocks.{layer}.mlp.hook_in" in self.hooks
            ):  # SAE Lens' MLP input hook
                return f"blocks.{layer}.mlp.hook_in"
            if self._gain_free(layer, norm):  # the norm has no gain: its normalised output is its output
                return f"blocks.{layer}.{norm}.hook_normalized"
            return None
        name = f"blocks.{layer}.{TL3_HOOKS[site]}" if site in TL3_HOOKS else None
        return name if name in self.hooks else None

    def _gain_free(self, layer: int, norm: str) -> bool:
        import torch

        module = getattr(self.model.blocks[layer], norm, None)
        if module is None or f"blocks.{layer}.{norm}.hook_normalized" not in self.hooks:
            return False
        # A norm without weights (LNPre / RMSPre) had its gain folded into the next weights: its output is not
        # the gained tensor a module tree records, so only a gain that is there and is one counts.
        w, b = getattr(module, "w", None), getattr(module, "b", None)
        return w is not None and bool(torch.all(w == 1)) and (b is None or not bool(torch.any(b != 0)))

    def candidates(self, layer: int | None) -> str:
        layers = [layer] if layer is not None and 0 <= layer < self.n_layers else [0]
        names: list[str] = []
        for site in Site:
            hook = self.hook(layers[0], site, "read")
            if hook is not None and all(not n.startswith(hook + " ") for n in names):
                names.append(f"{hook} ({site.value})")
        return "; ".join(names)


def _module_path_site(tl: _TL, name: str, role: Role) -> tuple[int, Site] | None:
    """A module path (sparsify ``layers.6``, dictionary_learning ``gpt_neox.layers.6``) read by the layout."""
    if tl.layout is None:
        return None
    path, io = split_module_point(name)
    for candidate in (path, f"{tl.layout.root}.{path}"):
        found = tl.layout.site_of(candidate, io)
        if found is not None:
            return found
    return None


def _tl_side(tl: _TL, record: HookRecord, role: Role) -> ResolvedPoint:
    name, hf = record.names(role)
    field, hf_field = _fields(record, role)
    parsed = None
    if name is not None:
        parsed = parse_tl_name(name) or _module_path_site(tl, name, role)
    if record.override and name is not None:
        hf = None
    if hf is not None and tl.layout is not None:
        path, io = split_module_point(hf)
        found = tl.layout.site_of(path, io)
        if found is None:
            raise HookNotFoundError(
                f"the dictionary's {hf_field} {hf!r} is not a point the {tl.layout.name} map knows; "
                f"TransformerLens points of that block: {tl.candidates(_layer_of(path))}. {EXPLICIT_HINT}"
            )
        trained = found
        if name is not None and name in tl.hooks and parsed is not None:
            if _same(parsed, trained, role, post_norms=tl.post_norms, parallel=tl.parallel):
                return ResolvedPoint(
                    name, parsed[0], parsed[1], field, f"{field} and {hf_field} {hf!r} name the same tensor"
                )
        hook = tl.hook(trained[0], trained[1], role)
        disagreement = (
            f"; its {field} {_described(name, parsed)} names a different tensor" if name is not None else ""
        )
        if hook is None:
            raise NoFaithfulPointError(
                f"the dictionary was trained at {hf!r} ({trained[1].value}, its {hf_field}){disagreement}. "
                f"A HookedTransformer has no hook at that tensor (its norms fire hook_normalized before the "
                f"gain, and no hook after it); {HF_BACKEND_HINT}"
            )
        reason = f"{hf_field} {hf!r} is where it was trained" + (
            f"; {field} {_described(name, parsed)} is another tensor" if name is not None else ""
        )
        site = canonical(trained[1], post_norms=tl.post_norms, parallel=tl.parallel, role=role)
        return ResolvedPoint(hook, trained[0], site, hf_field, reason)
    if name is None:
        raise ConfigError(f"the dictionary's config names no {field}; set it to the point it reads")
    source = f"{field} (override)" if record.override else field
    if name in tl.hooks:
        layer = parsed[0] if parsed is not None else _layer_of(name)
        reason = "set by the test with hook_name_override" if record.override else f"the dictionary's {field}"
        if hf is not None:
            reason += f" ({hf_field} {hf!r} not compared: no hook map for {tl.architecture or 'this model'})"
        return ResolvedPoint(name, layer, parsed[1] if parsed is not None else None, source, reason)
    if parsed is not None:
        hook = tl.hook(parsed[0], parsed[1], role)
        if hook is not None:
            return ResolvedPoint(hook, parsed[0], parsed[1], source, f"{field} {name!r} is this tensor")
        raise NoFaithfulPointError(
            f"the dictionary's {field} {name!r} is {parsed[1].value} of block {parsed[0]}, which this "
            f"HookedTransformer has no hook at; {HF_BACKEND_HINT}"
        )
    if tl.layout is None and not name.startswith("blocks."):
        raise HookNotFoundError(
            f"the dictionary's {field} {name!r} is not a TransformerLens hook, and pytest-saecheck has no hook "
            f"map for this model's architecture ({tl.architecture or 'not recorded in model.cfg'}) to place a "
            f"module path; it maps {', '.join(sorted(LAYOUTS))}. TransformerLens names it resolves here: "
            f"{tl.candidates(_layer_of(name))}. {EXPLICIT_HINT}"
        )
    raise HookNotFoundError(
        f"the dictionary's {field} {name!r} is not a hook of this HookedTransformer ({tl.n_layers} layers) "
        f"nor a name pytest-saecheck can place. The points of block {_layer_of(name) or 0}: "
        f"{tl.candidates(_layer_of(name))}. Check the dictionary's {field}; {EXPLICIT_HINT}"
    )


def _layer_of(name: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------
# module backend (Hugging Face)


_KINDS = (("MLP", ("mlp", "feed_forward", "ffn")), ("attention", ("attn", "attention")))


def _kind(path: str) -> str:
    last = path.rsplit(".", 1)[-1] if not path.rsplit(".", 1)[-1].isdigit() else "layer"
    for kind, words in _KINDS:
        if any(word in last for word in words):
            return kind
    return "residual"


def nearest_modules(model: Any, path: str, limit: int = 6) -> list[str]:
    """The module paths of ``model`` of the same kind as ``path`` (residual: decoder layers; MLP; attention),
    nearest to its layer first; for a path of no known kind (a misspelt ``mpl``), the closest spellings first."""
    import difflib

    kind = _kind(path)
    wanted = _layer_of(path) or 0
    last = path.rsplit(".", 1)[-1]
    names = [name for name, _ in model.named_modules() if name]
    spelled = (
        difflib.get_close_matches(path, names, n=3, cutoff=0.8)
        if kind == "residual" and not last.isdigit()
        else []
    )
    found = []
    for name in names:
        layer = _layer_of(name)
        if layer is None:
            continue
        if kind == "residual" and not name.rsplit(".", 1)[-1].isdigit():
            continue
        if kind != "residual" and (name.rsplit(".", 1)[-1].isdigit() or _kind(name) != kind):
            continue
        if kind != "residual" and name.count(".") > re.sub(r"\.\d+.*$", "", name).count(".") + 2:
            continue  # submodules of the MLP / attention (mlp.down_proj) are not the MLP
        found.append((abs(layer - wanted), name))
    return [*spelled, *(name for _, name in sorted(found) if name not in spelled)][:limit]


class _Modules:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.modules = {name for name, _ in model.named_modules()}
        config = getattr(model, "config", None)
        architectures = list(getattr(config, "architectures", None) or [])
        self.architecture = (
            type(model).__name__
            if type(model).__name__ in LAYOUTS
            else next(iter(architectures), type(model).__name__)
        )
        parallel = bool(getattr(config, "use_parallel_residual", False))
        self.layout: Layout | None = layout_for(self.architecture, parallel=parallel)

    def point(self, text: str, field: str) -> ModulePoint:
        path, io = split_module_point(text, self.modules)
        if (
            path not in self.modules
            and self.layout is not None
            and f"{self.layout.root}.{path}" in self.modules
        ):
            path = f"{self.layout.root}.{path}"  # sparsify names points relative to the base model
        if path not in self.modules:
            near = nearest_modules(self.model, path)
            raise HookNotFoundError(
                f"the dictionary's {field} {text!r} is not a module of this {type(self.model).__name__}; its "
                f"nearest {_kind(path)} modules: {', '.join(near) or 'none'}. Check the record, or {EXPLICIT_HINT}"
            )
        return ModulePoint(path, io, _layer_of(path))

    def no_map(self, field: str, name: str) -> HookNotFoundError:
        return HookNotFoundError(
            f"the dictionary's {field} {name!r} is a TransformerLens name, and pytest-saecheck has no hook map for "
            f"{self.architecture} to place it on a module tree (it maps {', '.join(sorted(LAYOUTS))}). On this "
            f"model it resolves module points: {field} or hf_hook_name as a path from model.named_modules(). "
            f"{EXPLICIT_HINT}"
        )


def _module_side(mods: _Modules, record: HookRecord, role: Role) -> ResolvedPoint:
    name, hf = record.names(role)
    field, hf_field = _fields(record, role)
    layout = mods.layout
    parsed = parse_tl_name(name) if name is not None else None
    if record.override and name is not None:
        hf = None
    if hf is not None:
        point = mods.point(hf, hf_field)
        found = layout.site_of(point.path, point.io) if layout is not None else None
        site = layout.canonical(found[1], role) if found is not None and layout is not None else None
        reason = f"{hf_field} {hf!r} is where it was trained"
        if name is not None and parsed is not None and found is not None and layout is not None:
            agree = _same(
                parsed,
                (found[0], found[1]),
                role,
                post_norms=layout.mlp_post_norm is not None,
                parallel=layout.parallel,
            )
            if not agree:
                reason += f"; {field} {_described(name, parsed)} is another tensor"
        return ResolvedPoint(point, point.layer, site, hf_field, reason)
    if name is None:
        raise ConfigError(f"the dictionary's config names no {field}; set it to the point it reads")
    source = f"{field} (override)" if record.override else field
    if parsed is not None:
        if layout is None:
            raise mods.no_map(field, name)
        placed = layout.point(parsed[0], parsed[1], role)
        if placed is None:
            raise NoFaithfulPointError(
                f"the dictionary's {field} {name!r} is {parsed[1].value} of layer {parsed[0]}, which has no "
                f"{'writable ' if role == 'write' else ''}module point in a {layout.name}; evaluate it on the "
                "TransformerLens backend (a HookedTransformer)"
            )
        return ResolvedPoint(placed, parsed[0], parsed[1], source, f"{field} {name!r} is this tensor")
    if name.startswith("blocks."):
        layer = _layer_of(name)
        names = ", ".join(f"blocks.{layer}.{n}" for n in TL_NAMES)
        raise HookNotFoundError(
            f"the dictionary's {field} {name!r} is not a TransformerLens name pytest-saecheck can place on a "
            f"module tree (it places {names}); {EXPLICIT_HINT}"
        )
    point = mods.point(name, field)
    found = layout.site_of(point.path, point.io) if layout is not None else None
    return ResolvedPoint(
        point,
        point.layer,
        layout.canonical(found[1], role) if found is not None and layout is not None else None,
        source,
        f"{field} {name!r} is a module path",
    )


# ----------------------------------------------------------------------------------------------------------


def is_transformer_lens(model: Any) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "cfg") and hasattr(model, "blocks")


def resolve_points(record: HookRecord, model: Any, *, transcoder: bool = True) -> ResolvedPoints:
    """The read and write points of a dictionary with ``record`` on ``model``.

    ``model``: a TransformerLens ``HookedTransformer`` (points are hook names) or a ``torch.nn.Module`` tree
    such as a transformers ``PreTrainedModel`` (points are :class:`ModulePoint`). ``transcoder=False``: the write
    side is the read record (an SAE), resolved as a write.

    Raises :class:`~pytest_saecheck.errors.NoFaithfulPointError` where the backend has no point at the recorded
    tensor (naming the backend that has), :class:`~pytest_saecheck.errors.HookNotFoundError` for a name it
    cannot place (listing the faithful candidates or the model's nearest modules of that kind),
    :class:`~pytest_saecheck.errors.ConfigError` when the record names no point.
    """
    if not transcoder:
        record = HookRecord(record.hook_name, None, record.hf_hook_name, None, record.override)
    if is_transformer_lens(model):
        tl = _TL(model)
        read = _tl_side(tl, record, "read")
        write = _tl_side(tl, record, "write")
        return ResolvedPoints("transformer_lens", read, write)
    mods = _Modules(model)
    read = _module_side(mods, record, "read")
    write = _module_side(mods, record, "write")  # an SAE's write side is its read record, checked as a write
    # An SAE reads and writes one point: the write's (the same tensor; where a branch input differs from the
    # residual, e.g. bridge ln1.hook_in, replacing it there changes that branch only, as its record says).
    return ResolvedPoints("hf", read if transcoder else write, write)


# ----------------------------------------------------------------------------------------------------------
# which backend, before any model is loaded


@dataclass(frozen=True)
class BackendChoice:
    """The backend a dictionary's record asks for, before any model is loaded, and why (one sentence)."""

    backend: str
    reason: str


def _tl_has_point(site: Site, role: Role, layout: Layout) -> bool:
    """Whether a ``HookedTransformer`` of ``layout``'s architecture hooks ``site`` (a norm's gained output and a
    raw sublayer output before a post norm have no TransformerLens 3 hook)."""
    return layout.canonical(site, role) in TL3_HOOKS


def choose_backend(record: HookRecord, *, transcoder: bool, architecture: str | None = None) -> BackendChoice:
    """``"hf"`` when the record names a module path, or a tensor a ``HookedTransformer`` has no faithful point at;
    else ``"transformer_lens"``. Reads only the record (and ``architecture``, ``config.architectures[0]`` of the
    model when known: without it every architecture whose map places a module point is considered, and one that
    has no TransformerLens hook there is enough).

    The ``hf_hook_name`` side decides where the record has one (it is where the dictionary was trained); a
    ``hook_name`` with ``hook_name_override`` set decides alone. A TransformerLens name is left to the
    TransformerLens backend, whose resolver refuses it (naming the Hugging Face backend) where it has no point.
    """
    layouts = [layout] if (layout := layout_for(architecture)) is not None else list(LAYOUTS.values())
    roles: tuple[Role, ...] = ("read", "write") if transcoder else ("read",)
    for role in roles:
        name, hf = record.names(role)
        field, hf_field = _fields(record, role)
        if record.override and name is not None:
            hf = None
        if hf is None:
            if name is not None and not name.startswith(("blocks.", "hook_")):
                return BackendChoice("hf", f"its {field} {name!r} is a module path")
            continue
        path, io = split_module_point(hf)
        placed = [(lay, found) for lay in layouts if (found := lay.site_of(path, io)) is not None]
        if not placed:
            return BackendChoice(
                "hf", f"its {hf_field} {hf!r} is a module point no TransformerLens hook map places"
            )
        for lay, (_, site) in placed:
            if not _tl_has_point(site, role, lay):
                return BackendChoice(
                    "hf",
                    f"its {hf_field} {hf!r} (where it was trained) is {site.value}, which a HookedTransformer "
                    "has no hook at",
                )
    return BackendChoice("transformer_lens", "its record names points a HookedTransformer hooks")
