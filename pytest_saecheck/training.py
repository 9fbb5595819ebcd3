"""Checks of TopK-family training objectives: the AuxK (dead-latent revival) loss.

The AuxK loss of Gao et al. (2024, appendix B.1) asks the top ``k_aux`` dead latents to reconstruct the
residual ``e = x - x̂`` of the live ones, through the decoder weights alone::

    ê = W_dec^T z_aux            (no b_dec: x̂ already contains it)
    L_aux = scale * ‖ê - stop_gradient(e)‖²      k_aux = d_in // 2 (capped at the number dead),
                                                 scale = min(num_dead / (d_in // 2), 1)

followed by an implementation-specific normalisation (SAE Lens: coefficient × mean over rows of the squared
norm; EleutherAI sparsify: total squared error / total variance of the batch).

Every check here reads the implementation through an :class:`AuxLossAdapter`; the reference values are computed
independently, from the implementation's own encoder pre-activations and decoder weights, in float64. The
checks change the object under test while they run (they set ``b_dec`` to a probe vector, mark latents dead,
and may run a training forward pass that updates buffers) and restore every parameter, buffer, gradient and
train/eval flag on any exit, exceptions included.

Adapters are found in this order: the ``adapter=`` argument, the ``pytest_saecheck_training_adapter`` hook (in a
pytest session), the built-in adapters (:mod:`pytest_saecheck.training_adapters`), and otherwise a
:class:`~pytest_saecheck.errors.TrainingCheckError` that says how to write one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from pytest_saecheck.errors import ConfigError, TrainingCheckError

__all__ = [
    "AuxLossAdapter",
    "AuxLossAdapterBase",
    "assert_aux_k_scaling",
    "assert_aux_loss_zero_without_dead",
    "assert_aux_residual_detached",
    "assert_no_aux_bias_double_count",
    "assert_training_objective",
    "gao_k_aux_and_scale",
    "resolve_training_adapter",
]

# --------------------------------------------------------------------------------------------------------------
# The adapter protocol
# --------------------------------------------------------------------------------------------------------------

_REQUIRED_MEMBERS = (
    "decoder_bias",
    "decoder_weight",
    "aux_pre_activations",
    "reconstruction",
    "aux_loss",
    "reduce_aux_error",
)


def gao_k_aux_and_scale(num_dead: int, d_in: int) -> tuple[int, float]:
    """The documented AuxK heuristic (Gao et al. 2024, appendix B.1, as SAE Lens and sparsify implement it).

    ``k_aux = d_in // 2``; the loss is scaled by ``min(num_dead / k_aux, 1)`` and ``k_aux`` is then capped at
    ``num_dead``. Returns ``(k_aux, scale)``.
    """
    k_aux = max(d_in // 2, 1)
    scale = min(num_dead / k_aux, 1.0)
    return min(k_aux, num_dead), scale


@runtime_checkable
class AuxLossAdapter(Protocol):
    """What the AuxK checks need from a training implementation.

    Required members (all tensors on the implementation's device and dtype; ``x`` is a ``[batch, d_in]`` batch,
    ``dead_mask`` a boolean ``[d_sae]`` tensor):

    - ``decoder_bias()``: the decoder-bias tensor itself (normally an ``nn.Parameter``), shape ``[d_in]``. The
      checks write probe values into it in place and restore it afterwards.
    - ``decoder_weight()``: the effective decoder rows, ``[d_sae, d_in]``, such that the correct aux
      reconstruction is ``z_aux @ decoder_weight()``. Differentiable (no ``.detach()``). If the implementation
      divides activations by the decoder norms when decoding, return the normalised rows.
    - ``aux_pre_activations(x)``: ``[batch, d_sae]``, the values the implementation picks its top dead latents
      from and whose values it decodes (e.g. SAE Lens ``hidden_pre``; sparsify's post-ReLU ``pre_acts``).
      Differentiable.
    - ``reconstruction(x)``: the implementation's main reconstruction x̂ (with ``b_dec``), ``[batch, d_in]``.
      Differentiable.
    - ``aux_loss(x, dead_mask)``: the implementation's own AuxK loss (a scalar tensor), computed exactly as its
      training step computes it, with the autograd graph.
    - ``reduce_aux_error(squared_error, x)``: the implementation's normalisation of the elementwise squared
      aux error ``[batch, d_in]`` to a scalar, *without* the dead-latent scale (e.g. ``coef *
      sq.sum(-1).mean()``).

    Optional members (defaults in :class:`AuxLossAdapterBase`; the checks use them when present):

    - ``selection``: ``"value"`` (top dead latents by pre-activation, the default) or ``"magnitude"`` (by
      ``|pre-activation|``, keeping the sign, as AbsTopK does).
    - ``shift_invariant``: ``True`` when the encoder sees ``x - b_dec``, so that shifting ``x`` and ``b_dec`` by
      the same vector leaves a correct aux loss unchanged (enables the metamorphic check).
    - ``k_aux_and_scale(num_dead, d_in)``: the implementation's documented ``(k_aux, scale)``;
      default :func:`gao_k_aux_and_scale`.
    - ``aux_groups(x)``: for implementations with one aux loss per group of latents (Matryoshka levels), a
      sequence of ``(start, stop, x_hat_group)``: latents ``start:stop`` reconstruct ``x - x_hat_group``. The
      group losses are summed. Default ``None``: one group, all latents, ``reconstruction(x)``.
    - ``gradient_tensors()``: ``{name: leaf tensor}`` whose aux-loss gradients the detach check compares.
    - ``module``: the ``torch.nn.Module`` whose state the checks snapshot and restore (default: the object
      under test, when it is a module).
    - ``name``: how failure messages name the implementation.
    """

    def decoder_bias(self) -> torch.Tensor: ...

    def decoder_weight(self) -> torch.Tensor: ...

    def aux_pre_activations(self, x: torch.Tensor) -> torch.Tensor: ...

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor: ...

    def aux_loss(self, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor: ...

    def reduce_aux_error(self, squared_error: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class AuxLossAdapterBase:
    """Defaults for the optional members of :class:`AuxLossAdapter`; subclass it and fill in the six required
    methods. ``training_sae`` is kept as ``self.training_sae`` and, if it is a module, as ``self.module``."""

    selection: str = "value"
    shift_invariant: bool = False

    def __init__(self, training_sae: Any) -> None:
        self.training_sae = training_sae
        self.module = training_sae if isinstance(training_sae, torch.nn.Module) else None

    @property
    def name(self) -> str:
        return f"{type(self.training_sae).__qualname__} (via {type(self).__qualname__})"

    def k_aux_and_scale(self, num_dead: int, d_in: int) -> tuple[int, float]:
        return gao_k_aux_and_scale(num_dead, d_in)

    def aux_groups(self, x: torch.Tensor) -> Sequence[tuple[int, int, torch.Tensor]] | None:
        return None

    def gradient_tensors(self) -> dict[str, torch.Tensor]:
        if self.module is not None:
            return {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        return {"b_dec": self.decoder_bias()}

    def reduce_aux_error(self, squared_error: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return squared_error.sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------------------------
# Adapter resolution
# --------------------------------------------------------------------------------------------------------------


def _looks_like_adapter(obj: Any) -> bool:
    return all(callable(getattr(obj, m, None)) for m in _REQUIRED_MEMBERS)


def _validate_adapter(adapter: Any, source: str, training_sae: Any) -> Any:
    missing = [m for m in _REQUIRED_MEMBERS if not callable(getattr(adapter, m, None))]
    if missing:
        raise TrainingCheckError(
            f"The training adapter {type(adapter).__qualname__!r} (from {source}) for "
            f"{type(training_sae).__qualname__!r} lacks {', '.join(missing)}. An adapter must provide "
            f"{', '.join(_REQUIRED_MEMBERS)}; see pytest_saecheck.training.AuxLossAdapter."
        )
    selection = getattr(adapter, "selection", "value")
    if selection not in ("value", "magnitude"):
        raise TrainingCheckError(
            f"The training adapter {type(adapter).__qualname__!r} has selection={selection!r}; "
            "expected 'value' or 'magnitude'."
        )
    return adapter


def _unsupported_message(training_sae: Any) -> str:
    cls = type(training_sae)
    lines = [
        f"No AuxK training adapter for {cls.__module__}.{cls.__qualname__}.",
        "Built-in adapters cover SAE Lens TopK-family training SAEs (TopK, BatchTopK, Matryoshka BatchTopK, "
        "AbsTopK) and EleutherAI sparsify's SparseCoder.",
        "For another implementation, write an adapter (see pytest_saecheck.training.AuxLossAdapter and "
        "AuxLossAdapterBase) and either pass it, adapter=MyAdapter(sae), or return it from a hook in "
        "conftest.py:",
        "    def pytest_saecheck_training_adapter(training_sae):",
        "        if isinstance(training_sae, MySAE):",
        "            return MyAdapter(training_sae)",
    ]
    if cls.__name__ in ("SparseCoder", "Sae") and importlib.util.find_spec("sparsify") is None:
        lines.append(
            "This looks like an EleutherAI sparsify SparseCoder, but sparsify is not installed: pip install eai-sparsify"
        )
    return "\n".join(lines)


def resolve_training_adapter(training_sae: Any, adapter: Any = None) -> Any:
    """Find the :class:`AuxLossAdapter` for ``training_sae``.

    Order: ``adapter`` (an adapter, or a callable ``adapter(training_sae) -> adapter``) → the
    ``pytest_saecheck_training_adapter`` hook of the running pytest session → the built-in adapters → a
    :class:`~pytest_saecheck.errors.TrainingCheckError`. An object that already satisfies the protocol is its
    own adapter.
    """
    if adapter is not None:
        if isinstance(adapter, type) or (callable(adapter) and not _looks_like_adapter(adapter)):
            adapter = adapter(training_sae)
        return _validate_adapter(adapter, "the adapter= argument", training_sae)

    from pytest_saecheck.hookspecs import active_hook

    hook = active_hook()
    if hook is not None:
        hook_caller = getattr(hook, "pytest_saecheck_training_adapter", None)
        if hook_caller is not None:
            found = hook_caller(training_sae=training_sae)
            if found is not None:
                return _validate_adapter(found, "the pytest_saecheck_training_adapter hook", training_sae)

    from pytest_saecheck.training_adapters import builtin_training_adapter

    found = builtin_training_adapter(training_sae)
    if found is not None:
        return _validate_adapter(found, "the built-in adapters", training_sae)

    if _looks_like_adapter(training_sae):
        return _validate_adapter(training_sae, "the object itself", training_sae)

    raise TrainingCheckError(_unsupported_message(training_sae))


def _adapter_name(adapter: Any) -> str:
    name = getattr(adapter, "name", None)
    return str(name) if name else type(adapter).__qualname__


# --------------------------------------------------------------------------------------------------------------
# State snapshot / restore
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _SavedTensor:
    owner: torch.nn.Module
    kind: str  # "_parameters" or "_buffers"
    key: str
    obj: torch.Tensor | None
    value: torch.Tensor | None
    grad: torch.Tensor | None
    requires_grad: bool


def _snapshot_module(
    module: torch.nn.Module,
) -> tuple[list[_SavedTensor], list[tuple[torch.nn.Module, bool]]]:
    saved: list[_SavedTensor] = []
    seen: set[int] = set()
    for sub in module.modules():
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(sub, kind).items():
                if t is None:
                    saved.append(_SavedTensor(sub, kind, key, None, None, None, False))
                    continue
                value = None if id(t) in seen else t.detach().clone()
                seen.add(id(t))
                grad = t.grad.detach().clone() if kind == "_parameters" and t.grad is not None else None
                saved.append(_SavedTensor(sub, kind, key, t, value, grad, t.requires_grad))
    modes = [(sub, sub.training) for sub in module.modules()]
    return saved, modes


def _restore_module(snapshot: tuple[list[_SavedTensor], list[tuple[torch.nn.Module, bool]]]) -> None:
    saved, modes = snapshot
    with torch.no_grad():
        for s in saved:
            getattr(s.owner, s.kind)[s.key] = s.obj
            if s.obj is None:
                continue
            if s.value is not None:
                s.obj.copy_(s.value)
            if s.kind == "_parameters":
                s.obj.grad = s.grad
                if s.obj.is_leaf:
                    s.obj.requires_grad_(s.requires_grad)
    for sub, training in modes:
        sub.training = training


_SMALL_SAE_ELEMENTS = 1 << 20


@contextlib.contextmanager
def _few_threads(bias: torch.Tensor, n_elements: int) -> Iterator[None]:
    """Run a small CPU SAE on one thread: with tensors this small, intra-op threads only add scheduling
    latency (tens of milliseconds per op on a busy machine). The setting is restored afterwards."""
    if bias.device.type != "cpu" or n_elements > _SMALL_SAE_ELEMENTS or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _preserved(training_sae: Any, adapter: Any) -> Iterator[None]:
    """Restore ``b_dec`` and, for modules, every parameter, buffer, gradient and train flag, on any exit."""
    with torch.no_grad():
        weight = adapter.decoder_weight()
    bias = adapter.decoder_bias()
    if not isinstance(bias, torch.Tensor):
        raise TrainingCheckError(
            f"{_adapter_name(adapter)}: decoder_bias() must return the decoder-bias tensor itself, "
            f"got {type(bias).__qualname__}."
        )
    bias_value = bias.detach().clone()
    bias_grad = bias.grad.detach().clone() if bias.grad is not None else None
    module = getattr(adapter, "module", None)
    if module is None and isinstance(training_sae, torch.nn.Module):
        module = training_sae
    snapshot = _snapshot_module(module) if isinstance(module, torch.nn.Module) else None
    try:
        with _few_threads(bias, int(weight.numel())):
            yield
    finally:
        if snapshot is not None:
            _restore_module(snapshot)
        with torch.no_grad():
            bias.copy_(bias_value)
        if bias.is_leaf:
            bias.grad = bias_grad


def _set_bias(adapter: Any, value: torch.Tensor) -> None:
    with torch.no_grad():
        adapter.decoder_bias().copy_(value)


# --------------------------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    d_in: int
    d_sae: int
    dtype: torch.dtype
    device: torch.device


def _setup(adapter: Any) -> _Setup:
    with torch.no_grad():
        w = adapter.decoder_weight()
        b = adapter.decoder_bias()
    if w.ndim != 2 or b.ndim != 1 or w.shape[1] != b.shape[0]:
        raise TrainingCheckError(
            f"{_adapter_name(adapter)}: decoder_weight() must be [d_sae, d_in] and decoder_bias() [d_in]; "
            f"got {tuple(w.shape)} and {tuple(b.shape)}."
        )
    return _Setup(d_in=int(w.shape[1]), d_sae=int(w.shape[0]), dtype=b.dtype, device=b.device)


def _make_batch(setup: _Setup, batch: torch.Tensor | None, batch_size: int, seed: int) -> torch.Tensor:
    if batch is not None:
        if batch.ndim != 2 or batch.shape[1] != setup.d_in:
            raise ConfigError(f"batch must be [n, d_in={setup.d_in}], got {tuple(batch.shape)}.")
        if batch.shape[0] < 2:
            raise ConfigError("batch needs at least 2 rows.")
        return batch.detach().to(device=setup.device, dtype=setup.dtype)
    if batch_size < 2:
        raise ConfigError(f"batch_size must be at least 2, got {batch_size}.")
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(setup.d_in, generator=gen, dtype=torch.float64)
    x = mean + torch.randn(batch_size, setup.d_in, generator=gen, dtype=torch.float64)
    return x.to(device=setup.device, dtype=setup.dtype)


def _probe_vector(setup: _Setup, x: torch.Tensor, seed: int, scale: float = 2.0) -> torch.Tensor:
    """A clearly nonzero vector: a random direction with norm ``scale`` × the mean row norm of ``x``."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(setup.d_in, generator=gen, dtype=torch.float64)
    norm = max(float(x.detach().double().norm(dim=-1).mean()), 1.0)
    v = v / v.norm() * (scale * norm)
    return v.to(device=setup.device, dtype=setup.dtype)


def _dead_mask(setup: _Setup, num_dead: int, seed: int) -> torch.Tensor:
    mask = torch.zeros(setup.d_sae, dtype=torch.bool)
    if num_dead >= setup.d_sae:
        mask[:] = True
    elif num_dead > 0:
        gen = torch.Generator().manual_seed(seed)
        mask[torch.randperm(setup.d_sae, generator=gen)[:num_dead]] = True
    return mask.to(setup.device)


def _k_aux_and_scale(adapter: Any, num_dead: int, d: int) -> tuple[int, float]:
    fn: Callable[[int, int], tuple[int, float]] = getattr(adapter, "k_aux_and_scale", gao_k_aux_and_scale)
    k_aux, scale = fn(num_dead, d)
    return int(k_aux), float(scale)


def _groups(adapter: Any, x: torch.Tensor, setup: _Setup) -> Sequence[tuple[int, int, torch.Tensor]]:
    groups_fn = getattr(adapter, "aux_groups", None)
    groups = groups_fn(x) if callable(groups_fn) else None
    if groups is None:
        return [(0, setup.d_sae, adapter.reconstruction(x))]
    return list(groups)


@dataclass
class _RefInputs:
    """What the reference reads from the implementation for one batch and one ``b_dec`` value."""

    pre: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor
    groups: list[tuple[int, int, torch.Tensor]]


def _reference_inputs(
    adapter: Any, x: torch.Tensor, setup: _Setup, *, differentiable: bool = False
) -> _RefInputs:
    """Pre-activations, decoder rows, ``b_dec`` and reconstructions; float64 without a graph unless
    ``differentiable`` (then the implementation's dtype, with the graph)."""
    ctx = contextlib.nullcontext() if differentiable else torch.no_grad()
    with ctx:
        pre = adapter.aux_pre_activations(x)
        w = adapter.decoder_weight()
        b = adapter.decoder_bias()
        groups = [(int(a), int(z), x_hat) for a, z, x_hat in _groups(adapter, x, setup)]
    if pre.shape != (x.shape[0], setup.d_sae):
        raise TrainingCheckError(
            f"{_adapter_name(adapter)}: aux_pre_activations(x) must be [batch, d_sae] = "
            f"{[x.shape[0], setup.d_sae]}, got {list(pre.shape)}."
        )
    if differentiable:
        return _RefInputs(pre, w, b, x, groups)
    with torch.no_grad():
        return _RefInputs(
            pre.double(), w.double(), b.double(), x.double(), [(a, z, h.double()) for a, z, h in groups]
        )


def _reference_loss(
    adapter: Any,
    inputs: _RefInputs,
    dead_mask: torch.Tensor,
    setup: _Setup,
    *,
    double_count: bool = False,
    detach: bool = True,
    scale_override: float | None = None,
    k_dim: int | None = None,
) -> torch.Tensor:
    """The AuxK loss computed from the implementation's pre-activations and decoder rows.

    ``double_count`` adds ``b_dec`` to the aux reconstruction (the bug); ``detach=False`` lets gradient flow
    into the residual (the other bug). ``scale_override`` and ``k_dim`` evaluate alternative k_aux/scale
    formulas.
    """
    selection = getattr(adapter, "selection", "value")
    total = inputs.x.new_zeros(())
    for start, stop, x_hat in inputs.groups:
        mask = dead_mask[start:stop]
        num_dead = int(mask.sum())
        if num_dead == 0:
            continue
        k_aux, scale = _k_aux_and_scale(adapter, num_dead, setup.d_in if k_dim is None else k_dim)
        k_aux = min(k_aux, num_dead)
        if scale_override is not None:
            scale = scale_override
        p = inputs.pre[:, start:stop]
        key = p.abs() if selection == "magnitude" else p
        key = key.detach().masked_fill(~mask[None, :], -math.inf)
        idx = key.topk(k_aux, dim=-1).indices
        # ê = Σ over the chosen dead latents of value × decoder row: the decoder weights alone
        e_hat = torch.einsum("bk,bkd->bd", p.gather(-1, idx), inputs.w[start:stop][idx])
        if double_count:
            e_hat = e_hat + inputs.b
        e = inputs.x - x_hat
        if detach:
            e = e.detach()
        total = total + scale * adapter.reduce_aux_error((e_hat - e).pow(2), inputs.x)
    return total


def _impl_loss(adapter: Any, x: torch.Tensor, dead_mask: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        loss = adapter.aux_loss(x, dead_mask)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TrainingCheckError(
            f"{_adapter_name(adapter)}: aux_loss(x, dead_mask) must return a scalar tensor, got "
            f"{type(loss).__qualname__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}."
        )
    return loss.reshape(())


def _close(a: float, b: float, atol: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def _check_tolerances(atol: float, rtol: float) -> None:
    if not (atol >= 0 and rtol >= 0):
        raise ConfigError(f"atol and rtol must be non-negative, got atol={atol}, rtol={rtol}.")


def _fmt(v: float) -> str:
    return f"{v:.9g}"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _record(
    assertion: str, adapter: Any, metric: str, value: float, tol: float, message: str | None, **details: Any
) -> None:
    """Attach a plain record of this check to the running test (for --saecheck-json / the HTML report)."""
    from pytest_saecheck import records

    records.record(
        {
            "kind": "assertion",
            "assertion": assertion,
            "label": None,
            "implementation": _adapter_name(adapter),
            "metric": metric,
            "value": value,
            "tol": tol,
            "passed": message is None,
            "message": message,
            **details,
        }
    )


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------


_PROBE_SCALES = (1.0, 0.5, 3.0, 0.25)


def _separating_probe(
    adapter: Any, x: torch.Tensor, dead: torch.Tensor, setup: _Setup, seed: int
) -> tuple[torch.Tensor, float, float]:
    """Pick, among a few seeded probe vectors, the one whose correct and double-counting reference losses
    differ the most (relative), so that a coincidence cannot hide the difference. Returns (probe, ref, dbl)."""
    best: tuple[float, torch.Tensor, float, float] | None = None
    for i, scale in enumerate(_PROBE_SCALES):
        probe = _probe_vector(setup, x, seed + 1 + i, scale=scale)
        _set_bias(adapter, probe)
        inputs = _reference_inputs(adapter, x, setup)
        ref = float(_reference_loss(adapter, inputs, dead, setup))
        dbl = float(_reference_loss(adapter, inputs, dead, setup, double_count=True))
        del inputs
        denom = max(abs(ref), abs(dbl), 1e-300)
        separation = abs(dbl - ref) / denom if math.isfinite(ref) and math.isfinite(dbl) else -1.0
        if best is None or separation > best[0]:
            best = (separation, probe, ref, dbl)
        if separation > 0.25:
            break
    assert best is not None
    return best[1], best[2], best[3]


def assert_no_aux_bias_double_count(
    training_sae: Any,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    adapter: Any = None,
    batch: torch.Tensor | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Fail if the AuxK loss adds ``b_dec`` to the aux reconstruction (so ``b_dec`` is counted twice).

    Sets ``b_dec`` to a clearly nonzero probe, marks every latent dead, and compares the implementation's aux
    loss with the reference computed without ``b_dec`` and with the value the double-counting formula would
    give. Where the encoder sees ``x - b_dec`` (adapter ``shift_invariant``), also checks that shifting ``x``
    and ``b_dec`` by the same vector leaves the aux loss unchanged. The object is restored afterwards.

    ``batch`` (``[n, d_in]``) replaces the synthetic seeded batch; ``atol``/``rtol`` compare the
    implementation's value with the reference (float64).
    """
    __tracebackhide__ = True
    _check_tolerances(atol, rtol)
    ad = resolve_training_adapter(training_sae, adapter)
    with _preserved(training_sae, ad):
        setup = _setup(ad)
        x = _make_batch(setup, batch, batch_size, seed)
        dead = _dead_mask(setup, setup.d_sae, seed)
        probe, ref, dbl = _separating_probe(ad, x, dead, setup, seed)
        _set_bias(ad, probe)
        impl = float(_impl_loss(ad, x, dead))
        if _close(dbl, ref, 10 * atol, 10 * rtol):
            raise TrainingCheckError(
                f"{_adapter_name(ad)}: with b_dec set to a probe vector the correct and double-counting AuxK "
                f"losses are indistinguishable ({_fmt(ref)} vs {_fmt(dbl)}); is the aux-loss coefficient zero?"
            )
        shifted: float | None = None
        if getattr(ad, "shift_invariant", False):
            shift = _probe_vector(setup, x, seed + 100, scale=1.0)
            _set_bias(ad, probe + shift)
            shifted = float(_impl_loss(ad, x + shift, dead))
        probe_norm = float(probe.double().norm())

    matches_ref = _close(impl, ref, atol, rtol)
    matches_dbl = _close(impl, dbl, atol, rtol)
    shift_ok = shifted is None or _close(shifted, impl, atol, rtol)
    details = {"reference": ref, "double_counting": dbl, "shifted": shifted, "atol": atol}
    if matches_ref and shift_ok:
        _record("assert_no_aux_bias_double_count", ad, "aux_loss", impl, rtol, None, **details)
        return
    matched = (
        "reference (b_dec excluded)"
        if matches_ref
        else "double-counting formula (b_dec added to the aux reconstruction)"
        if matches_dbl
        else "neither"
    )
    rows = [
        ["implementation aux loss", _fmt(impl)],
        ["reference: ê = z_aux W_dec (no b_dec)", _fmt(ref)],
        ["double-counting formula: ê + b_dec", _fmt(dbl)],
    ]
    if shifted is not None:
        rows.append(["implementation at (x + v, b_dec + v)", _fmt(shifted)])
    lines = [
        f"AuxK loss of {_adapter_name(ad)} does not exclude b_dec from the aux reconstruction",
        f"  b_dec set to a probe with norm {probe_norm:.4g}, all {setup.d_sae} latents dead, batch of {x.shape[0]}:",
        _table(rows, indent="    "),
        f"  matched: {matched}",
    ]
    if not shift_ok:
        lines.append(
            "  metamorphic check failed: shifting x and b_dec by the same vector v changed the aux loss "
            "(a correct aux loss is unchanged)"
        )
    lines.append(f"  tolerance: atol={atol:g}, rtol={rtol:g}")
    if matches_dbl:
        lines.append(
            "  x̂ already contains b_dec, so the aux latents must be decoded with the decoder weights alone; "
            "decoding them through a decode() that adds b_dec pulls dead latents toward e - b_dec."
        )
    message = "\n".join(lines)
    _record(
        "assert_no_aux_bias_double_count", ad, "aux_loss", impl, rtol, message, matched=matched, **details
    )
    raise AssertionError(message)


def _grads(
    loss: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, retain_graph: bool = False
) -> list[torch.Tensor]:
    """Gradients of ``loss`` with respect to ``tensors`` (zeros where unused), detached, in their own dtype."""
    items = list(tensors.values())
    if not loss.requires_grad:
        return [torch.zeros_like(t).detach() for t in items]
    grads = torch.autograd.grad(loss, items, allow_unused=True, retain_graph=retain_graph)
    return [(g if g is not None else torch.zeros_like(t)).detach() for g, t in zip(grads, items, strict=True)]


def _norm(grads: Sequence[torch.Tensor], minus: Sequence[torch.Tensor] | None = None) -> float:
    """‖grads‖ or ‖grads - minus‖ over all tensors (at least float32; relative precision far below rtol)."""
    total = 0.0
    for i, g in enumerate(grads):
        d = g if minus is None else g - minus[i]
        if d.dtype in (torch.float16, torch.bfloat16):
            d = d.float()
        total += float(torch.linalg.vector_norm(d)) ** 2
    return math.sqrt(total)


def assert_aux_residual_detached(
    training_sae: Any,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-9,
    adapter: Any = None,
    batch: torch.Tensor | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Fail if gradient from the AuxK loss reaches the main reconstruction through the residual target e.

    Compares the gradient of the implementation's aux loss (with respect to ``gradient_tensors()``: by default
    every trainable parameter) with the gradients of four reference formulas: residual detached or not, ``b_dec``
    excluded or double-counted. Passes when a detached formula matches (the ``b_dec`` question is
    :func:`assert_no_aux_bias_double_count`'s). ``rtol`` bounds ‖g_impl - g_ref‖ / ‖g_ref‖.
    """
    __tracebackhide__ = True
    _check_tolerances(atol, rtol)
    ad = resolve_training_adapter(training_sae, adapter)
    with _preserved(training_sae, ad):
        setup = _setup(ad)
        x = _make_batch(setup, batch, batch_size, seed)
        probe = _probe_vector(setup, x, seed + 1)
        dead = _dead_mask(setup, setup.d_sae, seed)
        _set_bias(ad, probe)
        grad_fn = getattr(ad, "gradient_tensors", None)
        tensors = dict(grad_fn()) if callable(grad_fn) else {"b_dec": ad.decoder_bias()}
        tensors = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad}
        if not tensors:
            raise TrainingCheckError(
                f"{_adapter_name(ad)}: no tensor that requires grad to compare aux-loss gradients on."
            )
        with torch.enable_grad():
            impl_loss = _impl_loss(ad, x, dead, grad=True)
            if not impl_loss.requires_grad:
                raise TrainingCheckError(
                    f"{_adapter_name(ad)}: the aux loss carries no autograd graph to any of "
                    f"{', '.join(tensors)}; it would train nothing."
                )
            g_impl = _grads(impl_loss, tensors)
            inputs = _reference_inputs(ad, x, setup, differentiable=True)
            cands: dict[tuple[bool, bool], list[torch.Tensor]] = {}
            for detach in (True, False):
                for dbl in (False, True):
                    ref = _reference_loss(ad, inputs, dead, setup, double_count=dbl, detach=detach)
                    cands[(detach, dbl)] = _grads(ref, tensors, retain_graph=True)
            del inputs
        names = ", ".join(tensors)

    impl_norm = _norm(g_impl)
    dists: dict[tuple[bool, bool], float] = {}
    abs_dists: dict[tuple[bool, bool], float] = {}
    for key, g in cands.items():
        abs_dists[key] = _norm(g_impl, g)
        dists[key] = abs_dists[key] / max(_norm(g), impl_norm, 1e-300)
    sep = _norm(cands[(True, False)], cands[(False, False)]) / max(_norm(cands[(True, False)]), 1e-300)
    if sep <= 10 * rtol:
        raise TrainingCheckError(
            f"{_adapter_name(ad)}: the detached and undetached reference gradients are indistinguishable "
            f"(relative difference {sep:.3g}); cannot decide."
        )
    ok = [key for key, d in dists.items() if d <= rtol or abs_dists[key] <= atol]
    correct = dists[(True, False)]
    if any(detach for detach, _ in ok):
        _record("assert_aux_residual_detached", ad, "relative_gradient_distance", correct, rtol, None)
        return
    labels = {
        (True, False): "residual detached, b_dec excluded (correct)",
        (True, True): "residual detached, b_dec double-counted",
        (False, False): "residual NOT detached, b_dec excluded",
        (False, True): "residual NOT detached, b_dec double-counted",
    }
    rows = [["formula", "relative gradient distance"]]
    rows += [[labels[k], f"{dists[k]:.3g}"] for k in labels]
    matched = ", ".join(labels[k] for k in ok) or "none"
    message = "\n".join(
        [
            f"AuxK loss of {_adapter_name(ad)} sends gradient into the main reconstruction through the "
            "residual target e (e is not detached)",
            f"  gradients of the aux loss with respect to {names}, all {setup.d_sae} latents dead, "
            f"batch of {x.shape[0]}:",
            _table(rows, indent="    "),
            f"  ‖g_impl‖ = {impl_norm:.6g}; matched: {matched}; tolerance rtol={rtol:g}",
            "  Use e = (x - x̂).detach() as the aux target; otherwise the aux loss pulls the live latents "
            "toward the dead latents' reconstruction and fights the main loss.",
        ]
    )
    _record(
        "assert_aux_residual_detached",
        ad,
        "relative_gradient_distance",
        correct,
        rtol,
        message,
        matched=matched,
    )
    raise AssertionError(message)


def _dead_counts(setup: _Setup, adapter: Any) -> list[int]:
    k_full, _ = _k_aux_and_scale(adapter, setup.d_sae, setup.d_in)
    k = max(k_full, 1)
    counts = {1, max(1, k // 2), k, 2 * k, setup.d_sae}
    return sorted(c for c in counts if 1 <= c <= setup.d_sae)


def assert_aux_k_scaling(
    training_sae: Any,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    adapter: Any = None,
    batch: torch.Tensor | None = None,
    batch_size: int = 32,
    seed: int = 0,
    dead_counts: Sequence[int] | None = None,
) -> None:
    """Fail unless ``k_aux`` and the dead-latent scaling follow the documented formula.

    For several numbers of dead latents (1, k_aux/2, k_aux, 2·k_aux, all; ``dead_counts`` overrides) compares
    the implementation's aux loss with the reference using the adapter's ``k_aux_and_scale`` (default
    ``k_aux = d_in // 2`` capped at the number dead, ``scale = min(num_dead / (d_in // 2), 1)``). ``b_dec`` is
    zeroed while this runs, so the answer does not depend on the ``b_dec`` question.
    """
    __tracebackhide__ = True
    _check_tolerances(atol, rtol)
    ad = resolve_training_adapter(training_sae, adapter)
    rows: list[list[str]] = []
    failed = False
    with _preserved(training_sae, ad):
        setup = _setup(ad)
        x = _make_batch(setup, batch, batch_size, seed)
        _set_bias(ad, torch.zeros(setup.d_in, dtype=setup.dtype, device=setup.device))
        counts = list(dead_counts) if dead_counts is not None else _dead_counts(setup, ad)
        for n in counts:
            if not 1 <= n <= setup.d_sae:
                raise ConfigError(f"dead_counts must lie in [1, d_sae={setup.d_sae}], got {n}.")
        inputs = _reference_inputs(ad, x, setup)
        for i, n in enumerate(counts):
            dead = _dead_mask(setup, n, seed + 10 + i)
            impl = float(_impl_loss(ad, x, dead))
            ref = float(_reference_loss(ad, inputs, dead, setup))
            alternatives = {
                "no scale (scale = 1)": float(_reference_loss(ad, inputs, dead, setup, scale_override=1.0)),
                "k_aux from d_sae instead of d_in": float(
                    _reference_loss(ad, inputs, dead, setup, k_dim=setup.d_sae)
                ),
            }
            k_aux, scale = _k_aux_and_scale(ad, n, setup.d_in)
            ok = _close(impl, ref, atol, rtol)
            failed = failed or not ok
            if ok:
                match = "documented formula"
            else:
                match = (
                    ", ".join(
                        name
                        for name, v in alternatives.items()
                        if _close(impl, v, atol, rtol) and not _close(v, ref, atol, rtol)
                    )
                    or "neither"
                )
            ratio = impl / ref if ref != 0 else math.nan
            rows.append([str(n), str(k_aux), f"{scale:.4g}", _fmt(impl), _fmt(ref), f"{ratio:.4g}", match])
    worst = max((abs(float(r[5]) - 1.0) for r in rows if r[5] != "nan"), default=0.0)
    if not failed:
        _record("assert_aux_k_scaling", ad, "max_relative_deviation", worst, rtol, None)
        return
    header = ["dead", "k_aux", "scale", "implementation", "reference", "impl/ref", "matched"]
    message = "\n".join(
        [
            f"AuxK loss of {_adapter_name(ad)} does not follow the documented k_aux / dead-latent scaling",
            f"  d_in={setup.d_in}, d_sae={setup.d_sae}, b_dec zeroed, batch of {x.shape[0]}; reference: k_aux = "
            "d_in // 2 capped at the number dead, scale = min(num_dead / (d_in // 2), 1) (or the adapter's "
            "k_aux_and_scale):",
            _table([header, *rows], indent="    "),
            f"  tolerance: atol={atol:g}, rtol={rtol:g}",
        ]
    )
    _record("assert_aux_k_scaling", ad, "max_relative_deviation", worst, rtol, message)
    raise AssertionError(message)


def assert_aux_loss_zero_without_dead(
    training_sae: Any,
    *,
    atol: float = 0.0,
    adapter: Any = None,
    batch: torch.Tensor | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Fail unless the AuxK loss is exactly zero (``|L| <= atol``) when no latent is dead (``b_dec`` set to a
    nonzero probe, so a loss that decodes ``b_dec`` alone is caught too)."""
    __tracebackhide__ = True
    _check_tolerances(atol, 0.0)
    ad = resolve_training_adapter(training_sae, adapter)
    with _preserved(training_sae, ad):
        setup = _setup(ad)
        x = _make_batch(setup, batch, batch_size, seed)
        _set_bias(ad, _probe_vector(setup, x, seed + 1))
        impl = float(_impl_loss(ad, x, _dead_mask(setup, 0, seed)))
    if math.isfinite(impl) and abs(impl) <= atol:
        _record("assert_aux_loss_zero_without_dead", ad, "aux_loss", impl, atol, None)
        return
    message = "\n".join(
        [
            f"AuxK loss of {_adapter_name(ad)} is not zero when no latent is dead",
            _table([["implementation aux loss", _fmt(impl)], ["expected", "0"]], indent="    "),
            f"  tolerance: atol={atol:g}; d_sae={setup.d_sae}, b_dec set to a nonzero probe, batch of {x.shape[0]}",
        ]
    )
    _record("assert_aux_loss_zero_without_dead", ad, "aux_loss", impl, atol, message)
    raise AssertionError(message)


def assert_training_objective(training_sae: Any, *, adapter: Any = None, **kwargs: Any) -> None:
    """Run the four AuxK checks and report every failure in one AssertionError.

    ``kwargs`` (``batch``, ``batch_size``, ``seed``) are passed to each check; tolerances keep their defaults.
    """
    __tracebackhide__ = True
    allowed = {"batch", "batch_size", "seed"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ConfigError(f"unknown argument(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    ad = resolve_training_adapter(training_sae, adapter)
    failures: list[str] = []
    for check in (
        assert_no_aux_bias_double_count,
        assert_aux_residual_detached,
        assert_aux_k_scaling,
        assert_aux_loss_zero_without_dead,
    ):
        try:
            check(training_sae, adapter=ad, **kwargs)
        except AssertionError as exc:
            failures.append(f"[{check.__name__}]\n{exc}")
    if failures:
        raise AssertionError("\n\n".join(failures))
