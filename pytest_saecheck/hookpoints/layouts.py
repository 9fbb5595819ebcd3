"""The tensors of a decoder layer, and where each one is in TransformerLens and in a Hugging Face module tree.

A :class:`Site` names one tensor of decoder layer ``L`` independently of any library (the residual stream
entering the layer, the MLP's input with the norm's gain applied, ...). Two tables give its point on each
backend:

- :data:`TL_NAMES`: TransformerLens hook names (``HookedTransformer`` 3, the TransformerLens 4
  ``TransformerBridge`` canonical names and their compatibility aliases, SAE Lens' ``mlp.hook_in``) and the site
  each one is, read from TransformerLens 3.9 ``components/transformer_block.py`` / ``rms_norm.py`` and
  ``model_bridge/generalized_components/block.py`` (``hook_aliases``, ``ln1_post``/``ln2_post`` overrides).
- :class:`Layout`: per Hugging Face architecture, the module of each part of a decoder layer (read from
  transformers 5 ``modeling_*.py``); :meth:`Layout.point` gives a site's module point, :meth:`Layout.site_of`
  the reverse.

The equivalences these tables claim are checked numerically in ``tests/test_hookpoints.py`` on tiny models.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pytest_saecheck.hookpoints.sites import ModulePoint


class Site(enum.Enum):
    """One tensor of a decoder layer, ``[batch, pos, width]``; the value is its meaning, for messages."""

    RESID_PRE = "the residual stream entering the layer"
    RESID_MID = "the residual stream between attention and MLP"
    RESID_POST = "the residual stream leaving the layer"
    ATTN_RESID_IN = "the residual stream entering the pre-attention norm"
    ATTN_NORMED = "the pre-attention norm's output before its gain (x / rms(x))"
    ATTN_IN = "the attention's input (the pre-attention norm's output, gain applied)"
    ATTN_Z = "the attention heads' outputs, concatenated (the output projection's input)"
    ATTN_RAW_OUT = "the attention module's output, before any post-attention norm"
    ATTN_OUT = "what attention adds to the residual stream"
    MLP_RESID_IN = "the residual stream entering the pre-MLP norm"
    MLP_NORMED = "the pre-MLP norm's output before its gain (x / rms(x))"
    MLP_IN = "the MLP's input (the pre-MLP norm's output, gain applied)"
    MLP_RAW_OUT = "the MLP module's output, before any post-MLP norm"
    MLP_OUT = "what the MLP adds to the residual stream"


# TransformerLens names within ``blocks.L.``: HookedTransformer 3 hooks, the TransformerLens 4 bridge's canonical
# names (every bridge component has hook_in / hook_out) and compatibility aliases, and SAE Lens'
# HookedSAETransformer ``mlp.hook_in``. Names absent here (hook_q, mlp.hook_pre, ...) are TransformerLens-only
# points: used as they are on a HookedTransformer that has them, refused on a module backend.
TL_NAMES: dict[str, Site] = {
    "hook_resid_pre": Site.RESID_PRE,
    "hook_resid_mid": Site.RESID_MID,
    "hook_resid_post": Site.RESID_POST,
    "hook_attn_out": Site.ATTN_OUT,
    "hook_mlp_in": Site.MLP_RESID_IN,
    "hook_mlp_out": Site.MLP_OUT,
    "ln1.hook_normalized": Site.ATTN_NORMED,
    "ln2.hook_normalized": Site.MLP_NORMED,
    "attn.hook_z": Site.ATTN_Z,
    # TransformerLens 4 bridge canonical names
    "hook_in": Site.RESID_PRE,
    "hook_out": Site.RESID_POST,
    "ln1.hook_in": Site.ATTN_RESID_IN,
    "ln1.hook_out": Site.ATTN_IN,
    "attn.hook_in": Site.ATTN_IN,
    "attn.o.hook_in": Site.ATTN_Z,
    "attn.hook_out": Site.ATTN_RAW_OUT,
    "ln1_post.hook_in": Site.ATTN_RAW_OUT,
    "ln1_post.hook_out": Site.ATTN_OUT,
    "ln2.hook_in": Site.MLP_RESID_IN,
    "ln2.hook_out": Site.MLP_IN,
    "mlp.hook_in": Site.MLP_IN,
    "mlp.hook_out": Site.MLP_RAW_OUT,
    "ln2_post.hook_in": Site.MLP_RAW_OUT,
    "ln2_post.hook_out": Site.MLP_OUT,
}

# The HookedTransformer 3 hook of each site, where it has one. ATTN_IN / MLP_IN (a norm's output with its
# gain) have none: RMSNorm / LayerNorm fire hook_normalized before the gain and no hook after it
# (TransformerLens 3.9 components/rms_norm.py, layer_norm.py).
TL3_HOOKS: dict[Site, str] = {
    Site.RESID_PRE: "hook_resid_pre",
    Site.RESID_MID: "hook_resid_mid",
    Site.RESID_POST: "hook_resid_post",
    Site.ATTN_NORMED: "ln1.hook_normalized",
    Site.ATTN_Z: "attn.hook_z",
    Site.ATTN_OUT: "hook_attn_out",
    Site.MLP_RESID_IN: "hook_mlp_in",
    Site.MLP_NORMED: "ln2.hook_normalized",
    Site.MLP_OUT: "hook_mlp_out",
}

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def parse_tl_name(name: str) -> tuple[int, Site] | None:
    """``(layer, site)`` of a TransformerLens / bridge name in :data:`TL_NAMES`, else None."""
    match = _BLOCK_NAME.match(name)
    if match is None or match.group(2) not in TL_NAMES:
        return None
    return int(match.group(1)), TL_NAMES[match.group(2)]


def canonical(site: Site, *, post_norms: bool, parallel: bool, role: str = "read") -> Site:
    """The site as it is on a model with (or without) post-sublayer norms and a parallel residual, for a read or
    a write: without post norms a sublayer's raw output is what it adds; for a read, the MLP's residual input
    is the residual between attention and MLP (the layer's input with a parallel residual), and attention's
    residual input the layer's input. A write there changes that branch only, so it stays its own site."""
    if not post_norms and site is Site.ATTN_RAW_OUT:
        return Site.ATTN_OUT
    if not post_norms and site is Site.MLP_RAW_OUT:
        return Site.MLP_OUT
    if role == "read" and site is Site.MLP_RESID_IN:
        return Site.RESID_PRE if parallel else Site.RESID_MID
    if role == "read" and site is Site.ATTN_RESID_IN:
        return Site.RESID_PRE
    return site


@dataclass(frozen=True)
class Layout:
    """The modules of one Hugging Face decoder architecture, relative to a decoder layer ``{layers}.L``.

    ``root``: the base model's path (sparsify and dictionary_learning name points relative to it, e.g.
    ``layers.6``); ``attn_post_norm`` / ``mlp_post_norm``: the norms applied to a sublayer's output before the
    residual add (Gemma 2/3), None where there are none; ``parallel``: attention and MLP both read the layer's
    input (GPT-NeoX with ``use_parallel_residual``).
    """

    name: str
    layers: str
    ln1: str
    attn: str
    o_proj: str
    ln2: str
    mlp: str
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    parallel: bool = False

    @property
    def root(self) -> str:
        return self.layers.rsplit(".", 1)[0]

    def canonical(self, site: Site, role: str = "read") -> Site:
        return canonical(site, post_norms=self.mlp_post_norm is not None, parallel=self.parallel, role=role)

    def _points(self, layer: int) -> Iterator[tuple[Site, ModulePoint]]:
        """``(site, point)`` for every point of layer ``layer`` this map knows, the preferred point of
        each site first. A pre-norm's input is the residual stream for a read; a write there changes that
        branch only (TransformerLens' hook_mlp_in write), so it is its own site."""

        def at(part: str | None, io: str) -> ModulePoint:
            path = f"{self.layers}.{layer}" + (f".{part}" if part else "")
            return ModulePoint(path, "input" if io == "input" else "output", layer)

        yield Site.RESID_POST, at(None, "output")
        yield Site.RESID_PRE, at(None, "input")
        yield Site.MLP_RESID_IN, at(self.ln2, "input")
        yield Site.ATTN_IN, at(self.ln1, "output")
        yield Site.ATTN_Z, at(self.o_proj, "input")
        yield Site.ATTN_RAW_OUT, at(self.attn, "output")
        if self.attn_post_norm is not None:
            yield Site.ATTN_OUT, at(self.attn_post_norm, "output")
            yield Site.ATTN_RAW_OUT, at(self.attn_post_norm, "input")
        yield Site.MLP_IN, at(self.ln2, "output")
        yield Site.MLP_IN, at(self.mlp, "input")
        yield Site.MLP_RAW_OUT, at(self.mlp, "output")
        if self.mlp_post_norm is not None:
            yield Site.MLP_OUT, at(self.mlp_post_norm, "output")
            yield Site.MLP_RAW_OUT, at(self.mlp_post_norm, "input")
        yield Site.ATTN_RESID_IN, at(self.ln1, "input")

    def point(self, layer: int, site: Site, role: str = "read") -> ModulePoint | None:
        """The module point of ``site`` in layer ``layer`` for a read or a write, or None where this architecture
        has none (a write needs a point whose replacement is what the model goes on with)."""
        wanted = self.canonical(site, role)
        for found, point in self._points(layer):
            if self.canonical(found, role) is wanted:
                return point
        return None

    def site_of(self, path: str, io: str) -> tuple[int, Site] | None:
        """``(layer, site)`` of the module point ``path`` / ``io``, or None if this map has no site
        there (the site as recorded, not :meth:`canonical`)."""
        match = re.match(rf"^{re.escape(self.layers)}\.(\d+)(?:\.|$)", path)
        if match is None:
            return None
        layer = int(match.group(1))
        for site, point in self._points(layer):
            if point.path == path and point.io == io:
                return layer, site
        return None


_LLAMA_LIKE = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "GemmaForCausalLM",
    "OlmoForCausalLM",
    "Phi3ForCausalLM",
)


def _llama(name: str) -> Layout:
    return Layout(
        name,
        "model.layers",
        "input_layernorm",
        "self_attn",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp",
    )


def _gemma(name: str, layers: str = "model.layers") -> Layout:
    return Layout(
        name,
        layers,
        "input_layernorm",
        "self_attn",
        "self_attn.o_proj",
        "pre_feedforward_layernorm",
        "mlp",
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    )


LAYOUTS: dict[str, Layout] = {
    "GPT2LMHeadModel": Layout(
        "GPT2LMHeadModel", "transformer.h", "ln_1", "attn", "attn.c_proj", "ln_2", "mlp"
    ),
    **{name: _llama(name) for name in _LLAMA_LIKE},
    "Gemma2ForCausalLM": _gemma("Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": _gemma("Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": _gemma("Gemma3ForConditionalGeneration", "model.language_model.layers"),
    "GPTNeoXForCausalLM": Layout(
        "GPTNeoXForCausalLM",
        "gpt_neox.layers",
        "input_layernorm",
        "attention",
        "attention.dense",
        "post_attention_layernorm",
        "mlp",
    ),
}
"""The Hugging Face architectures (``config.architectures[0]``, TransformerLens ``cfg.original_architecture``)
the resolver has a map for."""


def layout_for(architecture: str | None, *, parallel: bool = False) -> Layout | None:
    """The :class:`Layout` of ``architecture`` (``parallel``: GPT-NeoX's ``use_parallel_residual``), or None."""
    layout = LAYOUTS.get(architecture or "")
    if layout is None:
        return None
    if parallel != layout.parallel:
        return Layout(**{**layout.__dict__, "parallel": parallel})
    return layout
