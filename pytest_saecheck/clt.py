"""Cross-layer transcoders (CLTs): the dictionary type, its weights loaded per layer, and its reconstruction.

A CLT over ``n_layers`` MLPs has, for every layer ``l``:

* an encoder reading that layer's MLP input ``x_l [.., d_model]`` (the point its record names, e.g.
  ``blocks.l.ln2.hook_normalized``): ``z_l = act(x_l @ W_enc[l] + b_enc[l])`` with ``W_enc[l]`` ``[d_model,
  d_sae_l]``, ``act`` ReLU or JumpReLU (``z · 1[pre > threshold[l]]``);
* a decoder per *source* layer ``s`` writing to every later layer: ``W_dec[s]`` ``[d_sae_s, n_layers - s,
  d_model]``, where ``W_dec[s][:, t - s]`` writes into layer ``t``'s MLP output;
* an output bias ``b_dec[l]`` ``[d_model]`` and, optionally, a skip connection ``W_skip[l]`` ``[d_model,
  d_model]`` (``x_l @ W_skip[l]``).

Layer ``l``'s MLP output is reconstructed as ``Σ_{s ≤ l} z_s @ W_dec[s][:, l - s] + b_dec[l] (+ x_l @ W_skip[l])``
(Ameisen et al. 2025, "Circuit Tracing", §2.1; circuit-tracer's ``CrossLayerTranscoder.compute_reconstruction``).

Weights live in a :class:`WeightSource` and are read one layer at a time (safetensors slices), within a memory
budget (:class:`WeightCache`): a CLT whose weights fit the budget is read once and kept; a larger one is
streamed, one decoder slice ``[d_sae_s, d_model]`` at a time, so a 2.5M-feature CLT never holds every decoder.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from pytest_saecheck.defaults import WEIGHT_BUDGET_MIB
from pytest_saecheck.errors import ConfigError, NonFiniteError, ShapeMismatchError

if TYPE_CHECKING:
    import torch

RELU, JUMP_RELU = "relu", "jump_relu"

DEFAULT_WEIGHT_BUDGET_BYTES = WEIGHT_BUDGET_MIB * 2**20
"""Weights of a CLT kept in memory at once (after the first read) unless ``weight_budget_bytes`` says otherwise:
beyond it they are streamed per layer and per decoder slice."""


def layer_name(layer: int) -> str:
    """The name of a replacement's layer ``layer`` in results (``Evaluation.members`` and ``.layers`` keys)."""
    return f"layer {layer}"


class WeightSource(Protocol):
    """Where a CLT's tensors come from, one layer at a time (files on disk, or tensors in memory).

    Every method returns a CPU or device tensor in the stored layout described in the module docstring; ``name``
    says where a tensor comes from (a file and key) for error messages.
    """

    def encoder(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(W_enc [d_model, d_sae_l], b_enc [d_sae_l], threshold [d_sae_l] or None)``."""
        ...

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """``W_dec[source][:, target - source]``: ``[d_sae_source, d_model]`` (``target ≥ source``)."""
        ...

    def b_dec(self, layer: int) -> torch.Tensor:
        """``[d_model]``."""
        ...

    def skip(self, layer: int) -> torch.Tensor | None:
        """``W_skip[layer]`` ``[d_model, d_model]`` (input × output), or None without skip connections."""
        ...

    def name(self, what: str, layer: int) -> str:
        """Where the tensor ``what`` (``"W_enc"``, ``"W_dec"``, ...) of ``layer`` is stored."""
        ...


@dataclass
class WeightCache:
    """Tensors read from a :class:`WeightSource`, kept while their total stays within ``budget_bytes``.

    ``resident`` (decided from the CLT's total weight bytes): keep every tensor once read; otherwise read each
    tensor when needed and drop it after use. ``peak_bytes`` is the most bytes of tensors handed out by this
    cache that were alive at once (measured: each tensor is counted until it is freed), the number the memory
    tests and benchmarks read.
    """

    budget_bytes: int
    resident: bool
    kept: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    alive_bytes: int = 0
    tracked: set[int] = field(default_factory=set)
    peak_bytes: int = 0

    def get(self, key: tuple[Any, ...], read: Callable[[], Any]) -> Any:
        """The value of ``read()`` (a tensor or a tuple of tensors and None), read once if resident."""
        if key in self.kept:
            return self.kept[key]
        value = read()
        for tensor in value if isinstance(value, tuple) else (value,):
            if tensor is not None:
                self._track(tensor)
        if self.resident:
            self.kept[key] = value
        return value

    def _track(self, tensor: Any) -> None:
        if id(tensor) in self.tracked:  # an in-memory source hands out the same tensor again
            return
        size = int(tensor.numel() * tensor.element_size())
        self.tracked.add(id(tensor))
        self.alive_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.alive_bytes)
        weakref.finalize(tensor, self._release, id(tensor), size)

    def _release(self, ident: int, size: int) -> None:
        self.tracked.discard(ident)
        self.alive_bytes -= size


@dataclass(frozen=True)
class CLTRecord:
    """What the artefact records about a CLT: where each layer reads and writes, its model, its format.

    ``hook_names_in[l]`` / ``hook_names_out[l]``: TransformerLens hooks (layer ``l``'s MLP input as the release
    reads it, and its MLP output); ``hf_hook_names_in`` / ``hf_hook_names_out``: the Hugging Face module points
    when the release records them; ``model_name``: the model it was trained on; ``format``: the file layout it
    was loaded from; ``path``: the folder. ``norm_output``: the read point is the output of the MLP's input norm
    (normalised × weight + bias, Hugging Face's ``pre_feedforward_layernorm.output``), which TransformerLens
    does not hook: it is read at ``hook_names_in`` (that norm's ``hook_normalized``) with the norm's affine applied.
    """

    hook_names_in: tuple[str, ...]
    hook_names_out: tuple[str, ...]
    model_name: str | None = None
    format: str = "memory"
    path: str | None = None
    hf_hook_names_in: tuple[str, ...] | None = None
    hf_hook_names_out: tuple[str, ...] | None = None
    norm_output: bool = False


class CrossLayerTranscoder:
    """A cross-layer transcoder whose weights are read per layer from ``source`` (see the module docstring).

    ``d_model``: the MLP input and output width; ``d_sae``: features per layer (``d_sae[l]``); ``activation``:
    ``"relu"`` or ``"jump_relu"``; ``has_skip``: whether layers have ``W_skip``; ``record``: where it reads and
    writes. ``weight_budget_bytes``: see :class:`WeightCache` (default :data:`DEFAULT_WEIGHT_BUDGET_BYTES`).

    Raises :class:`ConfigError` when the record and the shapes disagree on the number of layers.
    """

    def __init__(
        self,
        source: WeightSource,
        *,
        d_model: int,
        d_sae: Sequence[int],
        activation: str,
        has_skip: bool,
        record: CLTRecord,
        dtype: torch.dtype | None = None,
        weight_budget_bytes: int | None = None,
        weight_bytes: int | None = None,
    ) -> None:
        if activation not in (RELU, JUMP_RELU):
            raise ConfigError(f"unknown CLT activation {activation!r}; expected 'relu' or 'jump_relu'")
        n_layers = len(d_sae)
        if len(record.hook_names_in) != n_layers or len(record.hook_names_out) != n_layers:
            raise ConfigError(
                f"the CLT has {n_layers} layers of features but its record names {len(record.hook_names_in)} read "
                f"and {len(record.hook_names_out)} write points; each layer needs one of each"
            )
        self.source = source
        self.n_layers = n_layers
        self.d_model = int(d_model)
        self.d_sae = tuple(int(d) for d in d_sae)
        self.activation = activation
        self.has_skip = has_skip
        self.record = record
        self.dtype = dtype
        itemsize = 4 if dtype is None else _itemsize(dtype)
        self.weight_bytes = (
            weight_bytes
            if weight_bytes is not None
            else _weight_bytes(self.d_model, self.d_sae, has_skip, itemsize)
        )
        self.set_weight_budget(weight_budget_bytes)

    def set_weight_budget(self, budget_bytes: int | None) -> None:
        """Keep the weights in memory after the first read when they total at most ``budget_bytes`` (None: the
        default, :data:`DEFAULT_WEIGHT_BUDGET_BYTES`), else stream them; forgets the tensors kept so far."""
        budget = DEFAULT_WEIGHT_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
        self.cache = WeightCache(budget, resident=self.weight_bytes <= budget)

    @property
    def cfg(self) -> Any:
        """The record in the shape the plugin reads of any dictionary (``cfg.metadata``, as SAE Lens 6): the
        model it was trained on, so a test that names only the CLT evaluates it on that model."""
        from types import SimpleNamespace

        return SimpleNamespace(metadata={"model_name": self.record.model_name})

    # --- the numbers a report and the engine read ---------------------------------------------------

    @property
    def d_sae_total(self) -> int:
        return sum(self.d_sae)

    @property
    def largest_slice_bytes(self) -> int:
        """Bytes of the largest tensor read at once when streaming (an encoder or a decoder slice)."""
        itemsize = 4 if self.dtype is None else _itemsize(self.dtype)
        return max(self.d_sae) * self.d_model * itemsize

    def check_budget(self) -> None:
        """Raise :class:`ConfigError` when even one streamed tensor is larger than the weight budget."""
        if self.largest_slice_bytes > self.cache.budget_bytes:
            raise ConfigError(
                f"the CLT's largest single tensor ({_mib(self.largest_slice_bytes)}: {max(self.d_sae)} features × "
                f"d_model {self.d_model}) exceeds the weight budget of {_mib(self.cache.budget_bytes)} "
                "(weight_budget_bytes); streaming reads one such tensor at a time, so raise the budget to at least "
                "that size"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "cross_layer_transcoder",
            "format": self.record.format,
            "path": self.record.path,
            "model_name": self.record.model_name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_sae": list(self.d_sae),
            "activation": self.activation,
            "skip": self.has_skip,
            "hook_names_in": list(self.record.hook_names_in),
            "hook_names_out": list(self.record.hook_names_out),
            "weight_bytes": self.weight_bytes,
            "weights_resident": self.cache.resident,
        }

    # --- the reconstruction ---------------------------------------------------------------------------

    def _tensor(self, key: tuple[str, int, int], read: Callable[[], Any], like: torch.Tensor) -> Any:
        """The tensor(s) of ``read()`` on ``like``'s device and in its dtype, through the weight cache."""

        def converted() -> Any:
            value = read()
            tensors = value if isinstance(value, tuple) else (value,)
            moved = tuple(None if t is None else t.to(device=like.device, dtype=like.dtype) for t in tensors)
            if not all(bool(t.isfinite().all()) for t in moved if t is not None):
                what = {"enc": "W_enc", "dec": "W_dec", "b_dec": "b_dec", "skip": "W_skip"}[key[0]]
                raise NonFiniteError(
                    f"the CLT's {self.source.name(what, key[1])} holds NaN or inf (in {like.dtype}); a replacement "
                    "with it would score NaN, so it is refused: check the file, or load it in a wider dtype"
                )
            return moved if isinstance(value, tuple) else moved[0]

        return self.cache.get((*key, str(like.device), str(like.dtype)), converted)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Features of ``layer``: ``[.., d_sae_l]`` from its MLP input ``x [.., d_model]`` (dtype of ``x``)."""
        import torch

        self._check_width(x, layer)
        w_enc, b_enc, threshold = self._tensor(("enc", layer, layer), lambda: self.source.encoder(layer), x)
        pre = x @ w_enc + b_enc
        if self.activation == RELU:
            return torch.relu(pre)
        return pre * (pre > threshold)

    def decode_layer(
        self, latents: Sequence[torch.Tensor | None], layer: int, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Layer ``layer``'s MLP output ``[.., d_model]`` from the features of layers ``0..layer``.

        ``latents[s]`` ``[.., d_sae_s]`` for ``s ≤ layer`` (None: that layer's features contribute nothing);
        ``x``: layer ``layer``'s MLP input, required when the CLT has skip connections.
        """
        written = [
            self.write(z, source, layer) for source, z in enumerate(latents[: layer + 1]) if z is not None
        ]
        like = written[0] if written else x
        if like is None:
            raise ConfigError("decode_layer needs at least one layer's features or the MLP input")
        return self.finish(sum(written, torch_zeros_like(like)), layer, x)

    def write(self, z: torch.Tensor, source: int, target: int) -> torch.Tensor:
        """What the features of layer ``source`` (``z [.., d_sae_source]``) write into layer ``target``'s MLP
        output: ``z @ W_dec[source][:, target - source]`` ``[.., d_model]`` (``target ≥ source``)."""
        if not 0 <= source <= target < self.n_layers:
            raise ConfigError(
                f"features of layer {source} write only to layers {source}..{self.n_layers - 1}, not {target}"
            )
        w_dec = self._tensor(("dec", source, target), partial(self.source.decoder, source, target), z)
        return z @ w_dec

    def finish(self, written: torch.Tensor, layer: int, x: torch.Tensor | None) -> torch.Tensor:
        """Layer ``layer``'s output from the sum of what its sources wrote ``[.., d_model]``: ``+ b_dec[layer]``,
        and ``+ x @ W_skip[layer]`` with skip connections (``x``: the layer's MLP input)."""
        out = written + self._tensor(("b_dec", layer, layer), partial(self.source.b_dec, layer), written)
        if self.has_skip:
            if x is None:
                raise ConfigError(
                    f"the CLT has skip connections: layer {layer}'s output needs its MLP input x"
                )
            out = out + x @ self._tensor(("skip", layer, layer), partial(self.source.skip, layer), x)
        return out

    def _check_width(self, x: torch.Tensor, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ConfigError(f"layer {layer} is outside the CLT's {self.n_layers} layers")
        if x.shape[-1] != self.d_model:
            raise ShapeMismatchError(
                f"the CLT reads d_model={self.d_model} at {self.record.hook_names_in[layer]!r}, but that activation "
                f"has width {x.shape[-1]}; the CLT was trained on another model or at another point"
            )

    def __repr__(self) -> str:
        return (
            f"CrossLayerTranscoder(n_layers={self.n_layers}, d_model={self.d_model}, d_sae={self.d_sae_total}, "
            f"activation={self.activation!r}, skip={self.has_skip}, format={self.record.format!r})"
        )


def torch_zeros_like(like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.zeros_like(like)


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return int(torch.empty((), dtype=dtype).element_size())


def _weight_bytes(d_model: int, d_sae: Sequence[int], has_skip: bool, itemsize: int) -> int:
    n = len(d_sae)
    encoders = sum(d * (d_model + 2) for d in d_sae)
    decoders = sum(d * (n - s) * d_model for s, d in enumerate(d_sae))
    skips = n * d_model * d_model if has_skip else 0
    return (encoders + decoders + skips + n * d_model) * itemsize


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


# --- in memory ---------------------------------------------------------------------------------------------


class TensorSource:
    """A :class:`WeightSource` over tensors in memory (tests, CLTs built in code).

    ``W_enc[l]`` ``[d_model, d_sae_l]``, ``b_enc[l]`` ``[d_sae_l]``, ``W_dec[s]`` ``[d_sae_s, n_layers - s,
    d_model]``, ``b_dec[l]`` ``[d_model]``, ``threshold[l]`` ``[d_sae_l]`` (JumpReLU only), ``W_skip[l]``
    ``[d_model, d_model]`` (optional).
    """

    def __init__(
        self,
        W_enc: Sequence[Any],
        b_enc: Sequence[Any],
        W_dec: Sequence[Any],
        b_dec: Sequence[Any],
        threshold: Sequence[Any] | None = None,
        W_skip: Sequence[Any] | None = None,
    ) -> None:
        self.tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        self.threshold = threshold
        self.W_skip = W_skip

    def encoder(self, layer: int) -> tuple[Any, Any, Any]:
        threshold = None if self.threshold is None else self.threshold[layer]
        return self.tensors["W_enc"][layer], self.tensors["b_enc"][layer], threshold

    def decoder(self, source: int, target: int) -> Any:
        return self.tensors["W_dec"][source][:, target - source]

    def b_dec(self, layer: int) -> Any:
        return self.tensors["b_dec"][layer]

    def skip(self, layer: int) -> Any:
        return None if self.W_skip is None else self.W_skip[layer]

    def name(self, what: str, layer: int) -> str:
        return f"{what}[{layer}] (in memory)"


def from_tensors(
    W_enc: Sequence[Any],
    b_enc: Sequence[Any],
    W_dec: Sequence[Any],
    b_dec: Sequence[Any],
    *,
    hook_names_in: Sequence[str],
    hook_names_out: Sequence[str],
    threshold: Sequence[Any] | None = None,
    W_skip: Sequence[Any] | None = None,
    model_name: str | None = None,
    weight_budget_bytes: int | None = None,
) -> CrossLayerTranscoder:
    """A :class:`CrossLayerTranscoder` over in-memory tensors (shapes as in :class:`TensorSource`).

    Raises :class:`ShapeMismatchError` naming the tensor whose shape disagrees with the others.
    """
    n_layers = len(W_enc)
    d_model = int(W_enc[0].shape[0])
    d_sae = [int(w.shape[1]) for w in W_enc]
    for layer in range(n_layers):
        expected = {
            f"W_enc[{layer}]": ((d_model, d_sae[layer]), W_enc[layer]),
            f"b_enc[{layer}]": ((d_sae[layer],), b_enc[layer]),
            f"W_dec[{layer}]": ((d_sae[layer], n_layers - layer, d_model), W_dec[layer]),
            f"b_dec[{layer}]": ((d_model,), b_dec[layer]),
        }
        if threshold is not None:
            expected[f"threshold[{layer}]"] = ((d_sae[layer],), threshold[layer])
        if W_skip is not None:
            expected[f"W_skip[{layer}]"] = ((d_model, d_model), W_skip[layer])
        for key, (shape, tensor) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ShapeMismatchError(
                    f"CLT tensor {key} has shape {tuple(tensor.shape)}, expected {shape}"
                )
    return CrossLayerTranscoder(
        TensorSource(W_enc, b_enc, W_dec, b_dec, threshold, W_skip),
        d_model=d_model,
        d_sae=d_sae,
        activation=JUMP_RELU if threshold is not None else RELU,
        has_skip=W_skip is not None,
        record=CLTRecord(tuple(hook_names_in), tuple(hook_names_out), model_name=model_name),
        dtype=W_enc[0].dtype,
        weight_budget_bytes=weight_budget_bytes,
    )


# --- circuit-tracer's graph scores ----------------------------------------------------------------------------

CIRCUIT_TRACER_CONFLICT = (
    "circuit-tracer 0.5.0 requires transformers>=4.56,<=4.57.3 and huggingface-hub<1.0, while TransformerLens 3.9 "
    "requires transformers>=5.9: the two cannot be installed in one environment"
)
"""Why circuit-tracer's graph scores are not computed here (from the two packages' published requirements)."""


def circuit_tracer_graph_scores(*args: Any, **kwargs: Any) -> tuple[float, float]:
    """circuit-tracer's per-prompt graph scores (replacement, completeness) are not available in this environment.

    Always raises :class:`pytest_saecheck.errors.LoadError` naming the conflict (:data:`CIRCUIT_TRACER_CONFLICT`)
    and the way to get the scores: circuit-tracer's ``attribute`` and ``graph.compute_graph_scores`` in an
    environment of its own, on the same CLT folder. The replacement's behavioural metrics
    (:func:`pytest_saecheck.engine.replacement.evaluate_replacement`) need neither.
    """
    from importlib import metadata

    from pytest_saecheck.errors import LoadError

    try:
        installed = f"TransformerLens {metadata.version('transformer-lens')} is installed here"
    except metadata.PackageNotFoundError:
        installed = "TransformerLens is not installed here"
    raise LoadError(
        f"circuit-tracer's graph scores cannot be computed alongside pytest-saecheck: {CIRCUIT_TRACER_CONFLICT} "
        f"({installed}). Compute them in a separate environment with circuit-tracer's attribute() and "
        "circuit_tracer.graph.compute_graph_scores(graph), on the same CLT folder; gate the replacement's loss "
        "here with assert_ce_recovery"
    )
