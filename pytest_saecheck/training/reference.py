"""The independent reference of the AuxK checks, and the state they change and restore.

Everything here reads the implementation through a :class:`~pytest_saecheck.training.resolve.ResolvedAdapter`.
The reference loss is computed from the implementation's own encoder pre-activations and decoder rows, in
float64 (formula: Gao et al. 2024, appendix B.1; see :mod:`pytest_saecheck.training`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from pytest_saecheck.checks.workflow import finite_number
from pytest_saecheck.errors import ConfigError, TrainingCheckError
from pytest_saecheck.training.resolve import ResolvedAdapter

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
def preserved(adapter: ResolvedAdapter) -> Iterator[None]:
    """Restore ``b_dec`` and, for modules, every parameter, buffer, gradient and train flag, on any exit."""
    with torch.no_grad():
        weight = adapter.decoder_weight()
    bias = adapter.decoder_bias()
    if not isinstance(bias, torch.Tensor):
        raise TrainingCheckError(
            f"{adapter.name}: decoder_bias() must return the decoder-bias tensor itself, "
            f"got {type(bias).__qualname__}."
        )
    bias_value = bias.detach().clone()
    bias_grad = bias.grad.detach().clone() if bias.grad is not None else None
    snapshot = _snapshot_module(adapter.module) if adapter.module is not None else None
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


def set_bias(adapter: ResolvedAdapter, value: torch.Tensor) -> None:
    with torch.no_grad():
        adapter.decoder_bias().copy_(value)


# --------------------------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    d_in: int
    d_sae: int
    dtype: torch.dtype
    device: torch.device


def setup_of(adapter: ResolvedAdapter) -> Setup:
    with torch.no_grad():
        w = adapter.decoder_weight()
        b = adapter.decoder_bias()
    if w.ndim != 2 or b.ndim != 1 or w.shape[1] != b.shape[0]:
        raise TrainingCheckError(
            f"{adapter.name}: decoder_weight() must be [d_sae, d_in] and decoder_bias() [d_in]; "
            f"got {tuple(w.shape)} and {tuple(b.shape)}."
        )
    return Setup(d_in=int(w.shape[1]), d_sae=int(w.shape[0]), dtype=b.dtype, device=b.device)


def make_batch(setup: Setup, batch: torch.Tensor | None, batch_size: int, seed: int) -> torch.Tensor:
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


def probe_vector(setup: Setup, x: torch.Tensor, seed: int, scale: float = 2.0) -> torch.Tensor:
    """A clearly nonzero vector: a random direction with norm ``scale`` × the mean row norm of ``x``."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(setup.d_in, generator=gen, dtype=torch.float64)
    norm = max(float(x.detach().double().norm(dim=-1).mean()), 1.0)
    v = v / v.norm() * (scale * norm)
    return v.to(device=setup.device, dtype=setup.dtype)


def make_dead_mask(setup: Setup, num_dead: int, seed: int) -> torch.Tensor:
    mask = torch.zeros(setup.d_sae, dtype=torch.bool)
    if num_dead >= setup.d_sae:
        mask[:] = True
    elif num_dead > 0:
        gen = torch.Generator().manual_seed(seed)
        mask[torch.randperm(setup.d_sae, generator=gen)[:num_dead]] = True
    return mask.to(setup.device)


def groups_of(adapter: ResolvedAdapter, x: torch.Tensor, setup: Setup) -> list[tuple[int, int, torch.Tensor]]:
    """The adapter's groups of latents, or one group of all latents with the main reconstruction."""
    groups = adapter.aux_groups(x)
    if groups is None:
        return [(0, setup.d_sae, adapter.reconstruction(x))]
    return [(int(start), int(stop), x_hat) for start, stop, x_hat in groups]


@dataclass
class ReferenceInputs:
    """What the reference reads from the implementation for one batch and one ``b_dec`` value."""

    pre: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor
    groups: list[tuple[int, int, torch.Tensor]]


def reference_inputs(
    adapter: ResolvedAdapter, x: torch.Tensor, setup: Setup, *, differentiable: bool = False
) -> ReferenceInputs:
    """Pre-activations, decoder rows, ``b_dec`` and reconstructions; float64 without a graph unless
    ``differentiable`` (then the implementation's dtype, with the graph)."""
    ctx = contextlib.nullcontext() if differentiable else torch.no_grad()
    with ctx:
        pre = adapter.aux_pre_activations(x)
        w = adapter.decoder_weight()
        b = adapter.decoder_bias()
        groups = groups_of(adapter, x, setup)
    if pre.shape != (x.shape[0], setup.d_sae):
        raise TrainingCheckError(
            f"{adapter.name}: aux_pre_activations(x) must be [batch, d_sae] = "
            f"{[x.shape[0], setup.d_sae]}, got {list(pre.shape)}."
        )
    if differentiable:
        return ReferenceInputs(pre, w, b, x, groups)
    with torch.no_grad():
        return ReferenceInputs(
            pre.double(), w.double(), b.double(), x.double(), [(a, z, h.double()) for a, z, h in groups]
        )


def reference_loss(
    adapter: ResolvedAdapter,
    inputs: ReferenceInputs,
    dead_mask: torch.Tensor,
    setup: Setup,
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
    total = inputs.x.new_zeros(())
    for start, stop, x_hat in inputs.groups:
        mask = dead_mask[start:stop]
        num_dead = int(mask.sum())
        if num_dead == 0:
            continue
        k_aux, scale = adapter.k_aux_and_scale(num_dead, setup.d_in if k_dim is None else k_dim)
        k_aux = min(k_aux, num_dead)
        if scale_override is not None:
            scale = scale_override
        p = inputs.pre[:, start:stop]
        key = p.abs() if adapter.selection == "magnitude" else p
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


def implementation_loss(
    adapter: ResolvedAdapter, x: torch.Tensor, dead_mask: torch.Tensor, *, grad: bool = False
) -> torch.Tensor:
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        loss = adapter.aux_loss(x, dead_mask)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TrainingCheckError(
            f"{adapter.name}: aux_loss(x, dead_mask) must return a scalar tensor, got "
            f"{type(loss).__qualname__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}."
        )
    return loss.reshape(())


def close(a: float, b: float, atol: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def check_tolerances(atol: object, rtol: object) -> tuple[float, float]:
    """``(atol, rtol)`` as finite non-negative floats, else :class:`ConfigError`."""
    atol, rtol = finite_number("atol", atol), finite_number("rtol", rtol)
    if atol < 0 or rtol < 0:
        raise ConfigError(f"atol and rtol must be non-negative, got atol={atol}, rtol={rtol}.")
    return atol, rtol


_PROBE_SCALES = (1.0, 0.5, 3.0, 0.25)


def separating_probe(
    adapter: ResolvedAdapter, x: torch.Tensor, dead: torch.Tensor, setup: Setup, seed: int
) -> tuple[torch.Tensor, float, float]:
    """Pick, among a few seeded probe vectors, the one whose correct and double-counting reference losses
    differ the most (relative), so that a coincidence cannot hide the difference. Returns (probe, reference loss, double-counting loss)."""
    best: tuple[float, torch.Tensor, float, float] | None = None
    for i, scale in enumerate(_PROBE_SCALES):
        probe = probe_vector(setup, x, seed + 1 + i, scale=scale)
        set_bias(adapter, probe)
        inputs = reference_inputs(adapter, x, setup)
        reference = float(reference_loss(adapter, inputs, dead, setup))
        double_counting = float(reference_loss(adapter, inputs, dead, setup, double_count=True))
        del inputs
        scale_of_both = max(abs(reference), abs(double_counting), 1e-300)
        finite = math.isfinite(reference) and math.isfinite(double_counting)
        separation = abs(double_counting - reference) / scale_of_both if finite else -1.0
        if best is None or separation > best[0]:
            best = (separation, probe, reference, double_counting)
        if separation > 0.25:
            break
    assert best is not None
    return best[1], best[2], best[3]


def gradients(
    loss: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, retain_graph: bool = False
) -> list[torch.Tensor]:
    """Gradients of ``loss`` with respect to ``tensors`` (zeros where unused), detached, in their own dtype."""
    items = list(tensors.values())
    if not loss.requires_grad:
        return [torch.zeros_like(t).detach() for t in items]
    grads = torch.autograd.grad(loss, items, allow_unused=True, retain_graph=retain_graph)
    return [(g if g is not None else torch.zeros_like(t)).detach() for g, t in zip(grads, items, strict=True)]


def gradient_norm(grads: Sequence[torch.Tensor], minus: Sequence[torch.Tensor] | None = None) -> float:
    """‖grads‖ or ‖grads - minus‖ over all tensors (at least float32; relative precision far below rtol)."""
    total = 0.0
    for i, g in enumerate(grads):
        d = g if minus is None else g - minus[i]
        if d.dtype in (torch.float16, torch.bfloat16):
            d = d.float()
        total += float(torch.linalg.vector_norm(d)) ** 2
    return math.sqrt(total)


def default_dead_counts(setup: Setup, adapter: ResolvedAdapter) -> list[int]:
    k_full, _ = adapter.k_aux_and_scale(setup.d_sae, setup.d_in)
    k = max(k_full, 1)
    counts = {1, max(1, k // 2), k, 2 * k, setup.d_sae}
    return sorted(c for c in counts if 1 <= c <= setup.d_sae)
