"""The cost model of a release pass: one function per question, from shapes only (configs, no weights).

Units: FLOPs counted as 2 per multiply-add (a matrix product ``[n, a] @ [a, b]`` costs ``2 n a b``); bytes as
stored. The model is deliberately coarse (it counts the matrix products that dominate, not elementwise work),
and is checked against measured CPU rates by ``benchmarks/scale_study.py``; what it predicts is recorded with
the rate it assumed.

Per token, one SAE in a release pass costs (``engine.run`` says what the pass computes):

- the SAE's encoder and decoder: ``2 · 2 · d_in · d_sae`` (``d_out`` in place of one ``d_in`` for a transcoder);
- its spliced continuation and each ablated continuation that is not token-independent: the model's blocks after
  its write hook, ``2 · params_per_layer · layers_after``, and the unembedding ``2 · d_model · d_vocab``;
- shared by every SAE of the pass: the original forward pass once (``2 · params_per_layer · n_layers`` plus the
  unembedding).

Memory of a pass beside the model's weights: every SAE's weights, one batch's activations at the hooks and two
``[batch, seq_len, d_vocab]`` float32 tensors (the original's log-probs and one variant's logits), plus each SAE's
per-sequence sums (:func:`pytest_saecheck.engine.accumulate.per_sequence_bytes`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_saecheck.engine.accumulate import per_sequence_bytes


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a decoder-only transformer that the cost depends on."""

    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    dtype_bytes: int = 4

    @property
    def params_per_layer(self) -> int:
        """Attention (4 d_model²) and MLP (2 d_model d_mlp) weights of one block."""
        return 4 * self.d_model * self.d_model + 2 * self.d_model * self.d_mlp

    @property
    def weight_bytes(self) -> int:
        return (self.n_layers * self.params_per_layer + 2 * self.d_model * self.d_vocab) * self.dtype_bytes


@dataclass(frozen=True)
class SAEShape:
    """One dictionary: its widths, the layer its write hook lies in (``layer`` 0-based; the continuation runs
    ``n_layers − layer`` blocks for a hook before block ``layer``'s output, a coarse bound), its weights' bytes
    per entry and the ablated variants it runs per batch (0, 1 or 2: zero and mean ablation, when not templated)."""

    d_in: int
    d_sae: int
    layer: int
    d_out: int | None = None
    dtype_bytes: int = 4
    ablated_per_batch: int = 0

    @property
    def weight_bytes(self) -> int:
        d_out = self.d_out or self.d_in
        return (self.d_in * self.d_sae + self.d_sae * d_out + self.d_sae + d_out) * self.dtype_bytes


@dataclass(frozen=True)
class PassCost:
    """What one pass over ``n_tokens`` costs: FLOPs (shared forward, and per SAE) and peak bytes."""

    flops_shared: float
    flops_per_sae: tuple[float, ...]
    bytes_model: int
    bytes_saes: int
    bytes_batch: int
    bytes_sums: int

    @property
    def flops(self) -> float:
        return self.flops_shared + sum(self.flops_per_sae)

    @property
    def peak_bytes(self) -> int:
        return self.bytes_model + self.bytes_saes + self.bytes_batch + self.bytes_sums


def pass_cost(
    model: ModelShape, saes: Sequence[SAEShape], n_tokens: int, seq_len: int, batch_size: int
) -> PassCost:
    """The cost of one pass of ``saes`` spliced into ``model`` over ``n_tokens`` tokens in rows of ``seq_len``,
    ``batch_size`` rows a batch (formulas in the module docstring)."""
    unembed = 2 * model.d_model * model.d_vocab
    shared = n_tokens * (2 * model.params_per_layer * model.n_layers + unembed)
    per_sae = []
    for sae in saes:
        d_out = sae.d_out or sae.d_in
        after = max(model.n_layers - sae.layer, 0)
        continuations = 1 + sae.ablated_per_batch
        per_token = 2 * sae.d_sae * (sae.d_in + d_out) + continuations * (
            2 * model.params_per_layer * after + unembed
        )
        per_sae.append(float(n_tokens * per_token))
    rows = min(batch_size, max(1, -(-n_tokens // seq_len)))
    batch_tokens = rows * seq_len
    activations = batch_tokens * model.d_model * model.dtype_bytes * (2 + len(saes))
    latents = batch_tokens * max((s.d_sae for s in saes), default=0) * 4
    logits = 2 * batch_tokens * model.d_vocab * 4
    n_sequences = -(-n_tokens // seq_len)
    sums = sum(per_sequence_bytes(s.d_out or s.d_in, seq_len) for s in saes) * n_sequences
    return PassCost(
        flops_shared=float(shared),
        flops_per_sae=tuple(per_sae),
        bytes_model=model.weight_bytes,
        bytes_saes=sum(s.weight_bytes for s in saes),
        bytes_batch=activations + latents + logits,
        bytes_sums=sums,
    )


def memory_groups(
    model: ModelShape,
    saes: Sequence[SAEShape],
    n_tokens: int,
    seq_len: int,
    batch_size: int,
    budget_bytes: int,
    max_saes: int | None = None,
) -> list[list[int]]:
    """Indices of ``saes`` in passes: each pass holds as many SAEs (in order) as fit ``budget_bytes`` beside the
    model, one batch and their sums (:func:`pass_cost`'s ``peak_bytes``), and at most ``max_saes`` of them.

    Raises :class:`~pytest_saecheck.errors.ConfigError` naming the numbers when one SAE alone does not fit.
    """
    from pytest_saecheck.errors import ConfigError

    groups: list[list[int]] = []
    current: list[int] = []
    for index, sae in enumerate(saes):
        refusal = too_big(model, sae, n_tokens, seq_len, batch_size, budget_bytes)
        if refusal is not None:
            raise ConfigError(f"SAE {index} {refusal}")
        trial = [saes[i] for i in current] + [sae]
        full = max_saes is not None and len(current) >= max_saes
        if current and (
            full or pass_cost(model, trial, n_tokens, seq_len, batch_size).peak_bytes > budget_bytes
        ):
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


def too_big(
    model: ModelShape, sae: SAEShape, n_tokens: int, seq_len: int, batch_size: int, budget_bytes: int
) -> str | None:
    """Why ``sae`` cannot be evaluated within ``budget_bytes`` even alone (the numbers and the fixes), or None."""
    alone = pass_cost(model, [sae], n_tokens, seq_len, batch_size).peak_bytes
    if alone <= budget_bytes:
        return None
    return (
        f"needs {alone / 2**20:,.0f} MiB in a pass of its own (weights {sae.weight_bytes / 2**20:,.0f} MiB beside "
        f"the model's {model.weight_bytes / 2**20:,.0f} MiB, a batch and its sums), more than the memory budget of "
        f"{budget_bytes / 2**20:,.0f} MiB; raise the budget, lower batch_size, or evaluate it on a device with "
        "more memory"
    )


def format_seconds(value: float) -> str:
    """A duration for a person: ``"12.3 s"``, ``"4.5 min"``, ``"2.25 h"``, ``"1,234 h"`` (whole hours from 100)."""
    if value < 60:
        return f"{value:,.1f} s"
    if value < 3600:
        return f"{value / 60:,.1f} min"
    hours = value / 3600
    return f"{hours:,.2f} h" if hours < 100 else f"{hours:,.0f} h"


def estimated_seconds(cost: PassCost, flops_per_second: float) -> float:
    """The time of a pass at a measured rate (FLOPs of this model per second, from a previous pass)."""
    return cost.flops / flops_per_second


def shapes_of(model: Any, saes: Sequence[Any]) -> tuple[ModelShape, list[SAEShape]]:
    """The shapes of a loaded TransformerLens or Hugging Face model and SAE Lens dictionaries (their configs and
    weights' dtype; each dictionary's as :func:`sae_shape`)."""
    from pytest_saecheck.dictionaries import describe

    cfg = getattr(model, "cfg", None)
    if cfg is not None:  # TransformerLens
        dims = (cfg.n_layers, cfg.d_model, getattr(cfg, "d_mlp", None) or 4 * cfg.d_model)
        vocab = cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab
    else:  # a Hugging Face model: its config
        hf = model.config
        dims = (
            hf.num_hidden_layers,
            hf.hidden_size,
            getattr(hf, "intermediate_size", None) or 4 * hf.hidden_size,
        )
        vocab = hf.vocab_size
    weight = next(iter(model.parameters()), None)
    shape = ModelShape(
        n_layers=int(dims[0]),
        d_model=int(dims[1]),
        d_mlp=int(dims[2]),
        d_vocab=int(vocab),
        dtype_bytes=weight.element_size() if weight is not None else 4,
    )
    out = []
    for sae in saes:
        info = describe(sae)
        weight = next(iter(sae.parameters()), None)
        out.append(
            sae_shape(
                shape,
                d_in=info.d_in,
                d_sae=int(sae.cfg.d_sae),
                hook_name_out=info.hook_name_out,
                d_out=info.d_out,
                dtype_bytes=weight.element_size() if weight is not None else 4,
            )
        )
    return shape, out


def sae_shape(
    model: ModelShape,
    *,
    d_in: int,
    d_sae: int,
    hook_name_out: str,
    d_out: int | None = None,
    dtype_bytes: int = 4,
) -> SAEShape:
    """One dictionary's :class:`SAEShape` from its config's widths and the hook it writes (``hook_name_out``, the
    read hook for an SAE): its layer is read from the hook's ``blocks.L.`` (or ``layers.L``, ``h.L``) part
    (``hook_embed`` and the like count as layer 0, ``ln_final`` as the last); a write hook in the residual stream
    is assumed to get token-independent ablation templates, any other hook zero- and mean-ablated continuations
    for every batch (``engine.member``)."""
    found = re.search(r"(?:blocks|layers|h)\.(\d+)(?:\.|$)", hook_name_out)
    layer = int(found.group(1)) if found else (model.n_layers if "ln_final" in hook_name_out else 0)
    return SAEShape(
        d_in=int(d_in),
        d_sae=int(d_sae),
        layer=layer,
        d_out=None if d_out is None else int(d_out),
        dtype_bytes=dtype_bytes,
        ablated_per_batch=0 if "resid" in hook_name_out else 2,
    )


DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per entry of the dtypes a config names (``torch.`` prefix stripped); the cost model's default is 4."""


def model_shape_from_config(config: Mapping[str, Any], dtype: str | None = None) -> ModelShape | None:
    """A :class:`ModelShape` from a model's config, without its weights: a TransformerLens config (``n_layers``,
    ``d_model``, ``d_mlp``, ``d_vocab``) or a Hugging Face ``config.json`` (``num_hidden_layers``/``n_layer``,
    ``hidden_size``/``n_embd``, ``intermediate_size``/``n_inner``, ``vocab_size``); ``None`` when it names no
    layer count, width or vocabulary. ``dtype`` (the dtype setting) wins over the config's ``torch_dtype``."""

    def first(*keys: str) -> int | None:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    n_layers = first("n_layers", "num_hidden_layers", "n_layer", "num_layers")
    d_model = first("d_model", "hidden_size", "n_embd")
    d_vocab = first("d_vocab_out", "d_vocab", "vocab_size")
    if n_layers is None or d_model is None or d_vocab is None:
        return None
    d_mlp = first("d_mlp", "intermediate_size", "n_inner") or 4 * d_model
    named = str(dtype or config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return ModelShape(n_layers, d_model, d_mlp, d_vocab, DTYPE_BYTES.get(named, 4))


def describe_pass(
    cost: PassCost,
    n_saes: int,
    n_tokens: int,
    n_sequences: int,
    rate: float | None,
    progress: str | None = None,
) -> str:
    """One line saying what a pass will evaluate, with its memory and (given a measured rate) time estimate;
    ``progress`` (where the pass stands in its release) leads it."""
    time_part = (
        f", about {format_seconds(estimated_seconds(cost, rate))} at the rate measured so far"
        if rate
        else ", time estimated after the first pass"
    )
    return (
        f"saecheck: {progress + ': ' if progress else ''}{n_saes} SAE{'s' if n_saes != 1 else ''} on {n_tokens:,} tokens ({n_sequences:,} sequences), "
        f"{cost.flops / 1e12:,.3g} TFLOP, peak about {cost.peak_bytes / 2**20:,.0f} MiB"
        f" (model {cost.bytes_model / 2**20:,.0f}, SAEs {cost.bytes_saes / 2**20:,.0f}, batch "
        f"{cost.bytes_batch / 2**20:,.0f}, per-sequence sums {cost.bytes_sums / 2**20:,.0f}){time_part}"
    )
