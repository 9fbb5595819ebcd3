"""The AuxK checks: each one resolves the adapter, measures against the reference, and concludes.

Every check follows the one check workflow (:mod:`pytest_saecheck.checks.workflow`): validate its arguments,
measure (the object under test is changed while it runs and restored on any exit), build a
:class:`~pytest_saecheck.checks.workflow.CheckOutcome` and hand it to
:func:`~pytest_saecheck.checks.workflow.conclude`, which records it on the running test and raises the failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pytest_saecheck.checks.workflow import CheckOutcome, conclude
from pytest_saecheck.errors import ConfigError, TrainingCheckError
from pytest_saecheck.messages import INDENT, fmt_exact, table
from pytest_saecheck.training.protocol import AuxLossAdapter
from pytest_saecheck.training.reference import (
    ReferenceInputs,
    Setup,
    check_tolerances,
    close,
    default_dead_counts,
    gradient_norm,
    gradients,
    implementation_loss,
    make_batch,
    make_dead_mask,
    preserved,
    probe_vector,
    reference_inputs,
    reference_loss,
    separating_probe,
    set_bias,
    setup_of,
)
from pytest_saecheck.training.resolve import ResolvedAdapter, resolve

__all__ = [
    "assert_aux_k_scaling",
    "assert_aux_loss_zero_without_dead",
    "assert_aux_residual_detached",
    "assert_no_aux_bias_double_count",
    "assert_training_objective",
]

_TABLE_INDENT = INDENT * 2

#: What ``adapter=`` takes: an adapter, a callable ``adapter(training_sae) -> adapter``, an adapter already
#: resolved, or None (the ``pytest_saecheck_training_adapter`` hook, then the built-in adapters).
AdapterSpec = AuxLossAdapter | Callable[..., AuxLossAdapter] | ResolvedAdapter | None


def _outcome(
    assertion: str,
    adapter: ResolvedAdapter,
    *,
    failure: str | None,
    details: Sequence[str],
    metric: str,
    value: float,
    tol: float,
    **fields: object,
) -> CheckOutcome:
    """The outcome of one AuxK check: no SAE label (the subject is an implementation, named in the record)."""
    return CheckOutcome(
        assertion=assertion,
        label=None,
        failures=() if failure is None else (failure,),
        details=tuple(details),
        metric=metric,
        value=value,
        fields={"implementation": adapter.name, "tol": tol, **fields},
    )


@dataclass(frozen=True)
class _Trial:
    """What every AuxK check starts from: the resolved adapter, the object's sizes and the input batch."""

    adapter: ResolvedAdapter
    setup: Setup
    x: torch.Tensor


@contextmanager
def _trial(
    training_sae: object, adapter: AdapterSpec, batch: torch.Tensor | None, batch_size: int, seed: int
) -> Iterator[_Trial]:
    """The checks' one prologue: resolve the adapter, and while the block runs (the object restored on any exit,
    :func:`~pytest_saecheck.training.reference.preserved`) its setup and the batch (given, or seeded)."""
    resolved = resolve(training_sae, adapter)
    with preserved(resolved):
        setup = setup_of(resolved)
        yield _Trial(resolved, setup, make_batch(setup, batch, batch_size, seed))


def assert_no_aux_bias_double_count(
    training_sae: object,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    adapter: AdapterSpec = None,
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

    Raises:
        AssertionError: the loss matches the double-counting formula, neither formula, or fails the shift check.
        ConfigError: a negative or non-finite tolerance, a malformed ``batch`` or ``batch_size``.
        TrainingCheckError: no adapter, or the two formulas cannot be told apart on this object.
    """
    __tracebackhide__ = True
    atol, rtol = check_tolerances(atol, rtol)
    with _trial(training_sae, adapter, batch, batch_size, seed) as trial:
        found = _measure_bias(trial, atol, rtol, seed)
    conclude(_bias_outcome(trial, found, atol, rtol))


@dataclass(frozen=True)
class _BiasMeasurement:
    probe_norm: float
    implementation: float
    reference: float
    double_counting: float
    shifted: float | None  # the implementation at (x + v, b_dec + v), for a shift-invariant encoder


def _measure_bias(trial: _Trial, atol: float, rtol: float, seed: int) -> _BiasMeasurement:
    """The aux loss with every latent dead and ``b_dec`` set to a probe that separates the two formulas."""
    resolved, setup, x = trial.adapter, trial.setup, trial.x
    dead = make_dead_mask(setup, setup.d_sae, seed)
    probe, reference, double_counting = separating_probe(resolved, x, dead, setup, seed)
    set_bias(resolved, probe)
    implementation = float(implementation_loss(resolved, x, dead))
    if close(double_counting, reference, 10 * atol, 10 * rtol):
        raise TrainingCheckError(
            f"{resolved.name}: with b_dec set to a probe vector the correct and double-counting AuxK "
            f"losses are indistinguishable ({fmt_exact(reference)} vs {fmt_exact(double_counting)}); is the "
            "aux-loss coefficient zero?"
        )
    shifted: float | None = None
    if resolved.shift_invariant:
        shift = probe_vector(setup, x, seed + 100, scale=1.0)
        set_bias(resolved, probe + shift)
        shifted = float(implementation_loss(resolved, x + shift, dead))
    return _BiasMeasurement(float(probe.double().norm()), implementation, reference, double_counting, shifted)


def _bias_outcome(trial: _Trial, found: _BiasMeasurement, atol: float, rtol: float) -> CheckOutcome:
    implementation, reference, double_counting = found.implementation, found.reference, found.double_counting
    matches_reference = close(implementation, reference, atol, rtol)
    matches_double_counting = close(implementation, double_counting, atol, rtol)
    shift_ok = found.shifted is None or close(found.shifted, implementation, atol, rtol)
    fields: dict[str, Any] = {
        "reference": reference,
        "double_counting": double_counting,
        "shifted": found.shifted,
        "atol": atol,
    }
    passed = matches_reference and shift_ok
    matched = (
        "reference (b_dec excluded)"
        if matches_reference
        else "double-counting formula (b_dec added to the aux reconstruction)"
        if matches_double_counting
        else "neither"
    )
    rows = [
        ["implementation aux loss", fmt_exact(implementation)],
        ["reference: ê = z_aux W_dec (no b_dec)", fmt_exact(reference)],
        ["double-counting formula: ê + b_dec", fmt_exact(double_counting)],
    ]
    if found.shifted is not None:
        rows.append(["implementation at (x + v, b_dec + v)", fmt_exact(found.shifted)])
    details = [
        f"{INDENT}b_dec set to a probe with norm {fmt_exact(found.probe_norm)}, all {trial.setup.d_sae} latents "
        f"dead, batch of {trial.x.shape[0]}:",
        *table(rows, indent=_TABLE_INDENT),
        f"{INDENT}matched: {matched}",
    ]
    if not shift_ok:
        details.append(
            f"{INDENT}metamorphic check failed: shifting x and b_dec by the same vector v changed the aux loss "
            "(a correct aux loss is unchanged)"
        )
    details.append(f"{INDENT}tolerance: atol={fmt_exact(atol)}, rtol={fmt_exact(rtol)}")
    if matches_double_counting:
        details.append(
            f"{INDENT}x̂ already contains b_dec, so the aux latents must be decoded with the decoder weights "
            "alone; decoding them through a decode() that adds b_dec pulls dead latents toward e - b_dec."
        )
    if not passed:
        fields["matched"] = matched
    name = trial.adapter.name
    failure = (
        None
        if passed
        else f"AuxK loss of {name} matches neither the reference nor the double-counting formula"
        if matched == "neither" and shift_ok
        else f"AuxK loss of {name} does not exclude b_dec from the aux reconstruction"
    )
    return _outcome(
        "assert_no_aux_bias_double_count",
        trial.adapter,
        failure=failure,
        details=details,
        metric="aux_loss",
        value=implementation,
        tol=rtol,
        **fields,
    )


_DETACH_LABELS = {
    (True, False): "residual detached, b_dec excluded (correct)",
    (True, True): "residual detached, b_dec double-counted",
    (False, False): "residual NOT detached, b_dec excluded",
    (False, True): "residual NOT detached, b_dec double-counted",
}


def assert_aux_residual_detached(
    training_sae: object,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-9,
    adapter: AdapterSpec = None,
    batch: torch.Tensor | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Fail if gradient from the AuxK loss reaches the main reconstruction through the residual target e.

    Compares the gradient of the implementation's aux loss (with respect to ``gradient_tensors()``: by default
    every trainable parameter) with the gradients of four reference formulas: residual detached or not, ``b_dec``
    excluded or double-counted. Passes when a detached formula matches (the ``b_dec`` question is
    :func:`assert_no_aux_bias_double_count`'s). ``rtol`` bounds ‖g_impl - g_ref‖ / ‖g_ref‖; ``atol`` the
    absolute distance (for gradients near zero).

    Raises:
        AssertionError: no detached formula matches the implementation's gradient.
        ConfigError: a negative or non-finite tolerance, a malformed ``batch`` or ``batch_size``.
        TrainingCheckError: no adapter, no trainable tensor, a loss without a graph, or indistinguishable
            reference gradients.
    """
    __tracebackhide__ = True
    atol, rtol = check_tolerances(atol, rtol)
    with _trial(training_sae, adapter, batch, batch_size, seed) as trial:
        names, implementation, candidates = _measure_gradients(trial, seed)
    conclude(_detach_outcome(trial, names, implementation, candidates, atol, rtol))


_Gradients = list[torch.Tensor]


def _measure_gradients(
    trial: _Trial, seed: int
) -> tuple[str, _Gradients, dict[tuple[bool, bool], _Gradients]]:
    """The names of the tensors compared on, the implementation's aux-loss gradient, and each reference
    formula's ``(detached, double-counted) → gradient``."""
    resolved, setup, x = trial.adapter, trial.setup, trial.x
    probe = probe_vector(setup, x, seed + 1)
    dead = make_dead_mask(setup, setup.d_sae, seed)
    set_bias(resolved, probe)
    tensors = {
        k: t
        for k, t in resolved.gradient_tensors().items()
        if isinstance(t, torch.Tensor) and t.requires_grad
    }
    if not tensors:
        raise TrainingCheckError(
            f"{resolved.name}: no tensor that requires grad to compare aux-loss gradients on."
        )
    with torch.enable_grad():
        implementation_loss_value = implementation_loss(resolved, x, dead, grad=True)
        if not implementation_loss_value.requires_grad:
            raise TrainingCheckError(
                f"{resolved.name}: the aux loss carries no autograd graph to any of "
                f"{', '.join(tensors)}; it would train nothing."
            )
        implementation = gradients(implementation_loss_value, tensors)
        inputs = reference_inputs(resolved, x, setup, differentiable=True)
        candidates: dict[tuple[bool, bool], _Gradients] = {}
        for detach in (True, False):
            for double_count in (False, True):
                reference = reference_loss(
                    resolved, inputs, dead, setup, double_count=double_count, detach=detach
                )
                candidates[(detach, double_count)] = gradients(reference, tensors, retain_graph=True)
        del inputs
    return ", ".join(tensors), implementation, candidates


def _detach_outcome(
    trial: _Trial,
    names: str,
    implementation: _Gradients,
    candidates: dict[tuple[bool, bool], _Gradients],
    atol: float,
    rtol: float,
) -> CheckOutcome:
    name = trial.adapter.name
    implementation_norm = gradient_norm(implementation)
    distances: dict[tuple[bool, bool], float] = {}
    absolute_distances: dict[tuple[bool, bool], float] = {}
    for key, gradient in candidates.items():
        absolute_distances[key] = gradient_norm(implementation, gradient)
        distances[key] = absolute_distances[key] / max(gradient_norm(gradient), implementation_norm, 1e-300)
    correct, undetached = candidates[(True, False)], candidates[(False, False)]
    separation = gradient_norm(correct, undetached) / max(gradient_norm(correct), 1e-300)
    if separation <= 10 * rtol:
        raise TrainingCheckError(
            f"{name}: the detached and undetached reference gradients are indistinguishable "
            f"(relative difference {fmt_exact(separation)}); cannot decide."
        )
    ok = [key for key, d in distances.items() if d <= rtol or absolute_distances[key] <= atol]
    passed = any(detach for detach, _ in ok)
    matched = ", ".join(_DETACH_LABELS[k] for k in ok) or "none"
    rows = [["formula", "relative gradient distance"]]
    rows += [[_DETACH_LABELS[k], fmt_exact(distances[k])] for k in _DETACH_LABELS]
    details = [
        f"{INDENT}gradients of the aux loss with respect to {names}, all {trial.setup.d_sae} latents dead, "
        f"batch of {trial.x.shape[0]}:",
        *table(rows, indent=_TABLE_INDENT),
        f"{INDENT}‖g_impl‖ = {fmt_exact(implementation_norm)}; matched: {matched}; tolerance rtol={fmt_exact(rtol)}",
        f"{INDENT}Use e = (x - x̂).detach() as the aux target; otherwise the aux loss pulls the live latents "
        "toward the dead latents' reconstruction and fights the main loss.",
    ]
    failure = (
        None
        if passed
        else f"AuxK loss of {name} sends gradient into the main reconstruction through the residual "
        "target e (e is not detached)"
        if ok
        else f"AuxK loss of {name} has a gradient that matches none of the reference formulas, detached or not"
    )
    return _outcome(
        "assert_aux_residual_detached",
        trial.adapter,
        failure=failure,
        details=details,
        metric="relative_gradient_distance",
        value=distances[(True, False)],
        tol=rtol,
        **({} if passed else {"matched": matched}),
    )


def _relative_deviation(implementation: float, reference: float) -> float:
    """``|implementation / reference - 1|``: 0 when equal, NaN when it is undefined (a zero or non-finite
    reference)."""
    if implementation == reference:
        return 0.0
    if reference == 0 or not (math.isfinite(implementation) and math.isfinite(reference)):
        return math.nan
    return abs(implementation / reference - 1.0)


def assert_aux_k_scaling(
    training_sae: object,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    adapter: AdapterSpec = None,
    batch: torch.Tensor | None = None,
    batch_size: int = 32,
    seed: int = 0,
    dead_counts: Sequence[int] | None = None,
) -> None:
    """Fail unless ``k_aux`` and the dead-latent scaling follow the documented formula.

    For several numbers of dead latents (1, k_aux/2, k_aux, 2·k_aux, all; ``dead_counts`` overrides) compares
    the implementation's aux loss with the reference using the adapter's ``k_aux_and_scale`` (default
    ``k_aux = d_in // 2`` capped at the number dead, ``scale = min(num_dead / (d_in // 2), 1)``). ``b_dec`` is
    zeroed while this runs, so the answer does not depend on the ``b_dec`` question. The recorded value is the
    largest ``|implementation / reference - 1|`` over the dead counts (NaN when one is undefined).

    Raises:
        AssertionError: some dead count's loss differs from the reference beyond ``atol + rtol·|reference|``.
        ConfigError: a negative or non-finite tolerance, a dead count outside ``[1, d_sae]``, a malformed batch.
        TrainingCheckError: no adapter for ``training_sae``.
    """
    __tracebackhide__ = True
    atol, rtol = check_tolerances(atol, rtol)
    with _trial(training_sae, adapter, batch, batch_size, seed) as trial:
        setup = trial.setup
        set_bias(trial.adapter, torch.zeros(setup.d_in, dtype=setup.dtype, device=setup.device))
        counts = list(dead_counts) if dead_counts is not None else default_dead_counts(setup, trial.adapter)
        for n in counts:
            if not 1 <= n <= setup.d_sae:
                raise ConfigError(f"dead_counts must lie in [1, d_sae={setup.d_sae}], got {n}.")
        inputs = reference_inputs(trial.adapter, trial.x, setup)
        rows = [_scaling_row(trial, inputs, n, seed + 10 + i, atol, rtol) for i, n in enumerate(counts)]
    deviations = [deviation for _, deviation, _ in rows]
    worst = math.nan if any(math.isnan(d) for d in deviations) else max(deviations, default=0.0)
    header = ["dead", "k_aux", "scale", "implementation", "reference", "impl/ref", "matched"]
    details = [
        f"{INDENT}d_in={setup.d_in}, d_sae={setup.d_sae}, b_dec zeroed, batch of {trial.x.shape[0]}; reference: "
        "k_aux = d_in // 2 capped at the number dead, scale = min(num_dead / (d_in // 2), 1) (or the adapter's "
        "k_aux_and_scale):",
        *table([header, *(row for row, _, _ in rows)], indent=_TABLE_INDENT),
        f"{INDENT}tolerance: atol={fmt_exact(atol)}, rtol={fmt_exact(rtol)}",
    ]
    failed = not all(ok for _, _, ok in rows)
    conclude(
        _outcome(
            "assert_aux_k_scaling",
            trial.adapter,
            failure=f"AuxK loss of {trial.adapter.name} does not follow the documented k_aux / dead-latent "
            "scaling"
            if failed
            else None,
            details=details,
            metric="max_relative_deviation",
            value=worst,
            tol=rtol,
        )
    )


def _scaling_row(
    trial: _Trial, inputs: ReferenceInputs, n_dead: int, seed: int, atol: float, rtol: float
) -> tuple[list[str], float, bool]:
    """One dead count's table row, ``|implementation / reference − 1|``, and whether the two are close."""
    resolved, setup = trial.adapter, trial.setup
    dead = make_dead_mask(setup, n_dead, seed)
    implementation = float(implementation_loss(resolved, trial.x, dead))
    reference = float(reference_loss(resolved, inputs, dead, setup))
    alternatives = {
        "no scale (scale = 1)": float(reference_loss(resolved, inputs, dead, setup, scale_override=1.0)),
        "k_aux from d_sae instead of d_in": float(
            reference_loss(resolved, inputs, dead, setup, k_dim=setup.d_sae)
        ),
    }
    k_aux, scale = resolved.k_aux_and_scale(n_dead, setup.d_in)
    ok = close(implementation, reference, atol, rtol)
    if ok:
        match = "documented formula"
    else:
        match = (
            ", ".join(
                name
                for name, value in alternatives.items()
                if close(implementation, value, atol, rtol) and not close(value, reference, atol, rtol)
            )
            or "neither"
        )
    ratio = implementation / reference if reference != 0 else math.nan
    row = [str(n_dead), str(k_aux), fmt_exact(scale), fmt_exact(implementation), fmt_exact(reference)]
    return [*row, fmt_exact(ratio), match], _relative_deviation(implementation, reference), ok


def assert_aux_loss_zero_without_dead(
    training_sae: object,
    *,
    atol: float = 0.0,
    adapter: AdapterSpec = None,
    batch: torch.Tensor | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Fail unless the AuxK loss is exactly zero (``|L| <= atol``) when no latent is dead (``b_dec`` set to a
    nonzero probe, so a loss that decodes ``b_dec`` alone is caught too).

    Raises:
        AssertionError: the loss is nonzero (or NaN) with no latent dead.
        ConfigError: a negative or non-finite ``atol``, a malformed batch.
        TrainingCheckError: no adapter for ``training_sae``.
    """
    __tracebackhide__ = True
    atol, _ = check_tolerances(atol, 0.0)
    with _trial(training_sae, adapter, batch, batch_size, seed) as trial:
        setup, x = trial.setup, trial.x
        set_bias(trial.adapter, probe_vector(setup, x, seed + 1))
        implementation = float(implementation_loss(trial.adapter, x, make_dead_mask(setup, 0, seed)))
    passed = math.isfinite(implementation) and abs(implementation) <= atol
    details = [
        *table(
            [["implementation aux loss", fmt_exact(implementation)], ["expected", "0"]], indent=_TABLE_INDENT
        ),
        f"{INDENT}tolerance: atol={fmt_exact(atol)}; d_sae={setup.d_sae}, b_dec set to a nonzero probe, "
        f"batch of {x.shape[0]}",
    ]
    conclude(
        _outcome(
            "assert_aux_loss_zero_without_dead",
            trial.adapter,
            failure=None
            if passed
            else f"AuxK loss of {trial.adapter.name} is not zero when no latent is dead",
            details=details,
            metric="aux_loss",
            value=implementation,
            tol=atol,
        )
    )


def assert_training_objective(training_sae: object, *, adapter: AdapterSpec = None, **kwargs: Any) -> None:
    """Run the four AuxK checks and report every failure in one AssertionError (each check records its own
    outcome).

    ``kwargs`` (``batch``, ``batch_size``, ``seed``) are passed to each check; tolerances keep their defaults.

    Raises:
        AssertionError: one or more checks failed; their messages, each under ``[check name]``.
        ConfigError: an argument other than ``batch``, ``batch_size``, ``seed``.
    """
    __tracebackhide__ = True
    allowed = {"batch", "batch_size", "seed"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ConfigError(f"unknown argument(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    resolved = resolve(training_sae, adapter)
    failures: list[str] = []
    for check in (
        assert_no_aux_bias_double_count,
        assert_aux_residual_detached,
        assert_aux_k_scaling,
        assert_aux_loss_zero_without_dead,
    ):
        try:
            check(training_sae, adapter=resolved, **kwargs)
        except AssertionError as exc:
            failures.append(f"[{check.__name__}]\n{exc}")
    if failures:
        raise AssertionError("\n\n".join(failures))
