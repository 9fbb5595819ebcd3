"""Scaling laws for ``compute_fraction``: published presets with their provenance, and fits for your own family.

``compute_fraction`` places the spliced model's loss on the model family's compute scaling curve: it is the
fraction of the model's training compute C at which the family would reach ``L_sae`` instead of ``L_orig``.
Every law here reduces, along its compute-optimal frontier, to ``L(C) = E + G * C^(-gamma)`` (nats/token), so

    L_orig = E + G C^-gamma,  L_sae = E + G (f C)^-gamma  =>  f = ((L_sae - E) / (L_orig - E))^(-1/gamma)

(:func:`pytest_saecheck.metrics.compute_fraction`, the one home of the formula). For Chinchilla-form laws
``L(N, D) = E + A/N^alpha + B/D^beta`` the compute-optimal loss falls as ``C^-gamma`` with
``gamma = alpha*beta/(alpha+beta)``. Kaplan et al. 2020's compute law ``L(C) = (C_c/C)^alpha_C`` has no
irreducible term: ``L_sae / L_orig = f^-alpha_C``, i.e. the same formula with ``E = 0`` and
``gamma = alpha_C`` (``f = (L_sae / L_orig)^(-1/alpha_C)``).

Every preset was fitted on one corpus with one tokenizer; E (and the whole curve) moves with both, so a preset
applied to another model family gives an uncalibrated number. Fit the law for your family
(:func:`fit_scaling_law`) and pass the fit file to the ``scaling_law`` setting.

This module imports no numpy, scipy or torch at import time (the plugin imports it through the settings).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_saecheck import extensions
from pytest_saecheck.defaults import INTERVAL_LEVEL
from pytest_saecheck.errors import ConfigError

FIT_FILE_FORMAT = "pytest-saecheck scaling law fit"
FIT_FILE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """A compute scaling law, reduced to ``L(C) = E + G C^-gamma`` (nats/token) along its compute frontier.

    ``name``: a preset name, ``"given"`` for an ``(E, gamma)`` pair, or ``"fit"``. ``form``: ``"chinchilla"``
    (``E + A/N^alpha + B/D^beta``), ``"kaplan"`` (``(C_c/C)^alpha_C``, E = 0) or ``"compute"``
    (``E + A C^-gamma``). ``parameters``: the law's published or fitted constants as ``(name, value)`` pairs.
    ``origin``: ``"preset"`` (published for another model family), ``"given"`` (by the user) or ``"fit"``.
    ``default``: the package default, not chosen by the user. ``intervals``: bootstrap intervals of a fit's
    parameters ``(name, low, high)``; ``points``: a fit's ``(compute, loss)`` points; ``path``: its file.
    """

    name: str
    form: str
    irreducible: float
    gamma: float
    source: str
    corpus: str
    origin: str
    parameters: tuple[tuple[str, float], ...] = ()
    default: bool = False
    intervals: tuple[tuple[str, float, float], ...] = ()
    points: tuple[tuple[float, float], ...] = ()
    path: str | None = None

    @property
    def fitted(self) -> bool:
        """False for a published preset (fitted for another model family), True for a fit or a given pair."""
        return self.origin != "preset"

    def undefined_reason(self, ce_orig: float, ce_sae: float) -> str | None:
        """Why this law gives no ``compute_fraction`` for these losses (nats/token), or None when it gives one.

        Undefined (1) where either loss is not above the irreducible loss E (no compute reaches it), and (2) for a
        law not fitted for the model (a preset) where either loss lies within :data:`FLOOR_MARGIN` of E: the
        published estimates of E disagree by that much, and near the floor the value is decided by E alone
        (``log f ≈ −ΔCE / (γ (L_orig − E))``: an error of E as large as ``L_orig − E`` changes ``log f`` by 100% or
        more, e.g. 0.005 against 0.86 between the presets for ΔCE 0.8% at L_orig 1.76).
        """
        if not (math.isfinite(ce_orig) and math.isfinite(ce_sae)):
            return "ce_orig or ce_sae is not finite"
        lowest = min(ce_orig, ce_sae)
        fix = (
            "fit the law for this model family (pytest_saecheck.fit_scaling_law) or choose another "
            "(scaling_law=PRESET, (E, gamma) or a fit file)"
        )
        if not lowest > self.irreducible:
            return (
                f"the scaling law's irreducible loss E={self.irreducible:.3f} ({self.spec}) is not below both "
                f"ce_orig ({ce_orig:.4g}) and ce_sae ({ce_sae:.4g}); {fix}"
            )
        if not self.fitted and lowest - self.irreducible < FLOOR_MARGIN:
            return (
                f"the loss ({lowest:.4g} nats/token) lies within {FLOOR_MARGIN:.3g} nats of the irreducible loss "
                f"E={self.irreducible:.4g} of the scaling law {self.spec}, which was not fitted for this model: "
                f"published estimates of E differ by {FLOOR_MARGIN:.3g} nats, and this close to the floor E alone "
                f"decides the value; {fix}"
            )
        return None

    @property
    def spec(self) -> str:
        """How to write this law in the ``scaling_law`` setting."""
        if self.origin == "preset" or self.name in named_laws():
            return self.name
        if self.path is not None:
            return self.path
        return f"{self.irreducible:g},{self.gamma:g}"

    def label(self) -> str:
        """One line for reports: the law, its source and whether it was fitted for this model."""
        shown = Path(self.path).name if self.path is not None else self.spec
        what = f"{shown} (E={self.irreducible:.4g}, gamma={self.gamma:.4g}"
        if self.origin == "preset":
            return f"{what}; {self.source}, fitted on {self.corpus}: NOT fitted for this model)"
        if self.origin == "fit":
            return f"{what}; fitted for this model family: {self.source})"
        return f"{what}; given by the user)"

    def loss_at(self, compute: float) -> float:
        """The law's loss ``E + A C^-gamma`` (nats/token) at training compute ``compute`` (the fit's unit, e.g.
        FLOPs). Needs the amplitude ``A``, which a fit records (:func:`fit_scaling_law`); raises
        :class:`ConfigError` for a law without one (a preset, an ``(E, gamma)`` pair) or compute <= 0."""
        amplitude = self._amplitude()
        if not (math.isfinite(compute) and compute > 0):
            raise ConfigError(f"training compute must be finite and > 0, got {compute}")
        return self.irreducible + amplitude * compute ** (-self.gamma)

    def compute_at(self, loss: float) -> float | None:
        """The training compute at which the law reaches ``loss`` (the inverse of :meth:`loss_at`); None when
        ``loss`` is at or below the irreducible loss E, which no compute reaches. Raises as :meth:`loss_at`."""
        amplitude = self._amplitude()
        if not (math.isfinite(loss) and loss > self.irreducible):
            return None
        return float((amplitude / (loss - self.irreducible)) ** (1.0 / self.gamma))

    def _amplitude(self) -> float:
        amplitude = dict(self.parameters).get("A")
        if self.form != "compute" or amplitude is None or not amplitude > 0:
            raise ConfigError(
                f"the scaling law {self.spec!r} has no amplitude A of L(C) = E + A*C^-gamma (only a fit records "
                "one); fit the law with pytest_saecheck.fit_scaling_law"
            )
        return float(amplitude)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: the record of the law an evaluation used."""
        return {
            "name": self.name,
            "spec": self.spec,
            "form": self.form,
            "irreducible": self.irreducible,
            "gamma": self.gamma,
            "parameters": dict(self.parameters),
            "source": self.source,
            "corpus": self.corpus,
            "origin": self.origin,
            "fitted": self.fitted,
            "default": self.default,
            "intervals": {name: [low, high] for name, low, high in self.intervals},
            "n_points": len(self.points),
            "points": [list(point) for point in self.points],
            "path": self.path,
        }

    @classmethod
    def from_dict(cls, record: Any) -> ScalingLaw:
        """The law of a record written by :meth:`to_dict` (e.g. a JSON report's ``compute_law``); raises
        :class:`ConfigError` when it is not one."""
        try:
            return cls(
                name=str(record["name"]),
                form=str(record["form"]),
                irreducible=float(record["irreducible"]),
                gamma=float(record["gamma"]),
                source=str(record.get("source") or ""),
                corpus=str(record.get("corpus") or "unknown"),
                origin=str(record["origin"]),
                parameters=tuple((str(k), float(v)) for k, v in dict(record.get("parameters") or {}).items()),
                default=bool(record.get("default", False)),
                intervals=tuple(
                    (str(k), float(v[0]), float(v[1])) for k, v in dict(record.get("intervals") or {}).items()
                ),
                points=tuple((float(c), float(loss)) for c, loss in record.get("points") or ()),
                path=None if record.get("path") is None else str(record["path"]),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise ConfigError(f"not a scaling law record ({error!r}): {record!r:.200}") from None

    def to_file_dict(self) -> dict[str, Any]:
        """The fit file's contents (plain JSON types; :func:`law_from_file_dict` reads them back)."""
        return {
            "format": FIT_FILE_FORMAT,
            "version": FIT_FILE_VERSION,
            "form": self.form,
            "E": self.irreducible,
            "gamma": self.gamma,
            "parameters": dict(self.parameters),
            "intervals": {name: [low, high] for name, low, high in self.intervals},
            "points": [list(point) for point in self.points],
            "source": self.source,
            "corpus": self.corpus,
        }

    def save(self, path: str | Path) -> Path:
        """Write this law (with a fit's points and intervals) to a JSON file the ``scaling_law`` setting reads."""
        target = Path(path)
        target.write_text(json.dumps(self.to_file_dict(), indent=2) + "\n", encoding="utf-8")
        return target


def _chinchilla_gamma(alpha: float, beta: float) -> float:
    return alpha * beta / (alpha + beta)


def _chinchilla_form(
    name: str, e: float, a: float, b: float, alpha: float, beta: float, source: str
) -> ScalingLaw:
    return ScalingLaw(
        name=name,
        form="chinchilla",
        irreducible=e,
        gamma=_chinchilla_gamma(alpha, beta),
        source=source,
        corpus="MassiveText (Gopher's SentencePiece tokenizer, 32k vocabulary)",
        origin="preset",
        parameters=(("E", e), ("A", a), ("B", b), ("alpha", alpha), ("beta", beta)),
    )


PRESETS: dict[str, ScalingLaw] = {
    law.name: law
    for law in (
        _chinchilla_form(
            "chinchilla",
            1.69,
            406.4,
            410.7,
            0.34,
            0.28,
            "Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, approach 3 (rounded)",
        ),
        _chinchilla_form(
            "epoch",
            1.8172,
            482.01,
            2085.43,
            0.3478,
            0.3658,
            "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt (refit of approach 3)",
        ),
        ScalingLaw(
            name="kaplan",
            form="kaplan",
            irreducible=0.0,
            gamma=0.050,
            source="Kaplan et al. 2020, Scaling Laws for Neural Language Models: L(C_min) = (C_c/C_min)^0.050",
            corpus="WebText2 (GPT-2's byte-level BPE tokenizer, 50257 tokens)",
            origin="preset",
            parameters=(("alpha_C", 0.050), ("C_c_PF_days", 3.1e8)),
        ),
    )
}
"""Published laws by name. Each was fitted on one corpus and tokenizer: none is fitted for your model."""

FLOOR_MARGIN: float = abs(PRESETS["epoch"].irreducible - PRESETS["chinchilla"].irreducible)
"""How far above a preset's irreducible loss E a loss must lie for the unfitted preset to place it (nats/token):
the spread of the published estimates of E (Hoffmann et al.'s 1.69 and Besiroglu et al.'s refit of the same data,
1.8172). Closer to E, compute_fraction is undefined (:meth:`ScalingLaw.undefined_reason`)."""

DEFAULT_LAW: ScalingLaw = dataclasses.replace(PRESETS["chinchilla"], default=True)
"""What ``compute_fraction`` uses unless told otherwise; gating on it is refused (it is not fitted)."""


def given_law(irreducible: float, gamma: float) -> ScalingLaw:
    """An ``(E, gamma)`` pair given by the user (E >= 0 nats/token, gamma > 0); raises :class:`ConfigError`."""
    if not (math.isfinite(irreducible) and math.isfinite(gamma) and irreducible >= 0 and gamma > 0):
        raise ConfigError(
            f"a scaling law needs E >= 0 nats/token and gamma > 0; got E={irreducible}, gamma={gamma}"
        )
    return ScalingLaw(
        name="given",
        form="compute",
        irreducible=float(irreducible),
        gamma=float(gamma),
        source="given by the user",
        corpus="unknown",
        origin="given",
    )


def load_scaling_law(path: str | Path) -> ScalingLaw:
    """Read a fit file written by :meth:`ScalingLaw.save`; raises :class:`ConfigError` naming what is wrong."""
    target = Path(path).expanduser()
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(
            f"cannot read the scaling law file {str(target.absolute())!r}: {error.strerror or error}; a relative "
            "path is read from the directory pytest runs in (give an absolute path, or a preset name)"
        ) from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"the scaling law file {str(target)!r} is not JSON: {error}") from None
    law = law_from_file_dict(data, repr(str(target)), default_source=f"fit file {target.name}")
    return dataclasses.replace(law, path=str(target.resolve()))


def law_from_file_dict(
    data: Any, where: str, *, default_source: str = "a fit", name: str = "fit"
) -> ScalingLaw:
    """The :class:`ScalingLaw` of a fit file's contents (:meth:`ScalingLaw.to_file_dict`), named ``name``.

    ``where`` names the contents in errors. Raises :class:`ConfigError` naming what is wrong.
    """
    if not isinstance(data, dict) or data.get("format") != FIT_FILE_FORMAT:
        raise ConfigError(
            f'{where} is not a scaling law fit file (no "format": {FIT_FILE_FORMAT!r}); '
            "write one with pytest_saecheck.fit_scaling_law(...).save(path)"
        )
    try:
        law = given_law(float(data["E"]), float(data["gamma"]))
        parameters = tuple((str(k), float(v)) for k, v in dict(data.get("parameters") or {}).items())
        intervals = tuple(
            (str(k), float(v[0]), float(v[1])) for k, v in dict(data.get("intervals") or {}).items()
        )
        points = tuple((float(c), float(loss)) for c, loss in data.get("points") or ())
    except (KeyError, TypeError, ValueError, IndexError, ConfigError) as error:
        raise ConfigError(f"the scaling law file {where} is malformed ({error}); refit and save it") from None
    return dataclasses.replace(
        law,
        name=name,
        form=str(data.get("form") or "compute"),
        source=str(data.get("source") or default_source),
        corpus=str(data.get("corpus") or "unknown"),
        origin="fit",
        parameters=parameters,
        intervals=intervals,
        points=points,
    )


def named_laws() -> dict[str, Callable[[], ScalingLaw]]:
    """The scaling laws plug-ins register by name (``pytest_saecheck_scaling_laws``), lower case: the bundled
    demo's ``"demo"``. Raises :class:`ConfigError` when a plug-in takes a preset's name, ``"default"`` or
    ``"none"``, or two plug-ins take one name."""
    laws = {
        name.lower(): law
        for name, law in extensions.named(
            extensions.relay().pytest_saecheck_scaling_laws(), "scaling law"
        ).items()
    }
    taken = sorted(set(laws) & {*PRESETS, "default", "none"})
    if taken:
        raise ConfigError(
            f"a plug-in registers the scaling law name(s) {', '.join(taken)}, which are built in"
        )
    return laws


def model_default_law(model_spec: str) -> ScalingLaw | None:
    """The law of tests on ``model_spec`` whose ``scaling_law`` setting is left at its default: the named law a
    plug-in gives (``pytest_saecheck_default_scaling_law``: the demo family's fit on the demo model), else None
    (the setting's default applies)."""
    name = extensions.relay().pytest_saecheck_default_scaling_law(model_spec=model_spec)
    return None if name is None else as_scaling_law(name)


def as_scaling_law(value: Any) -> ScalingLaw | None:
    """A :class:`ScalingLaw` from a law, a preset name, ``"E,gamma"``/``(E, gamma)``, a fit file path, or None.

    ``"none"`` and ``None`` mean no ``compute_fraction``; ``"default"`` is :data:`DEFAULT_LAW`; a name from
    :func:`named_laws` is a plug-in's law (the bundled demo's ``"demo"``: the fit for its model family). Raises
    :class:`ConfigError` for anything else.
    """
    if value is None or isinstance(value, ScalingLaw):
        return value
    given = value
    hint = ""
    if isinstance(value, Path):
        return load_scaling_law(value)
    if isinstance(value, str):
        text = value.strip()
        key = text.lower()
        if key in ("", "default"):
            return DEFAULT_LAW
        if key == "none":
            return None
        if key in PRESETS:
            return PRESETS[key]
        named = named_laws()
        if key in named:
            return named[key]()
        if key.endswith(".json") or Path(text).expanduser().is_file():
            return load_scaling_law(text)
        parts = [part for part in text.strip("()[] ").replace(",", " ").split() if part]
        value = parts
        close = difflib.get_close_matches(key, [*PRESETS, *named, "none", "default"], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            irreducible, gamma = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            pass
        else:
            if irreducible >= 0 and gamma > 0:
                return given_law(irreducible, gamma)
    raise ConfigError(
        "a scaling law must be (E, gamma) with E >= 0 nats and gamma > 0 for L(C) = E + A*C^-gamma, a preset "
        f"({', '.join(PRESETS)}), the path of a fit file (.json), a plug-in's named law "
        f'({", ".join(named_laws()) or "none registered"}) or "none"; got '
        f"{given!r}{hint}, e.g. scaling_law=(1.69, 0.1535) or --saecheck-scaling-law=epoch"
    )


def fit_scaling_law(
    compute: Sequence[float],
    loss: Sequence[float],
    *,
    n_bootstrap: int = 200,
    level: float = INTERVAL_LEVEL,
    seed: int = 0,
    huber_delta: float = 1e-3,
    source: str = "fit_scaling_law",
    corpus: str = "unknown",
) -> ScalingLaw:
    """Fit ``L(C) = E + A C^-gamma`` to a model family's ``(compute, loss)`` points.

    ``compute``: training compute per model (FLOPs, e.g. 6*N*D; any unit, used consistently); ``loss``: each
    model's loss on the same tokens (nats/token). As Hoffmann et al. 2022 do, minimises a Huber loss (delta
    ``huber_delta``) of ``log L_predicted - log L`` with scipy's ``least_squares(loss="huber")`` from a grid of
    starts, over ``E = exp(e)``, ``A = exp(a)`` and gamma. Intervals: percentile bootstrap (``n_bootstrap``
    resamples of the points with replacement, at ``level``) of E, A and gamma. Returns a :class:`ScalingLaw`
    with ``origin="fit"``; save it with :meth:`ScalingLaw.save`. Needs scipy. Raises :class:`ConfigError` for
    fewer than 4 points, fewer than 3 distinct compute values, non-positive or non-finite values, or a failed fit.
    """
    import numpy as np

    c = np.asarray(compute, dtype=np.float64).reshape(-1)
    y = np.asarray(loss, dtype=np.float64).reshape(-1)
    if c.shape != y.shape:
        raise ConfigError(f"compute and loss need one value per model; got {c.size} and {y.size}")
    if c.size < 4 or np.unique(c).size < 3:
        raise ConfigError(
            f"fitting E, A and gamma needs at least 4 models at 3 or more compute budgets; got {c.size} points "
            f"at {np.unique(c).size} budgets"
        )
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y)) and np.all(c > 0) and np.all(y > 0)):
        raise ConfigError("compute and loss must be finite and positive (FLOPs, nats/token)")
    if not 0 < level < 1 or n_bootstrap < 0:
        raise ConfigError(f"level must be in (0, 1) and n_bootstrap >= 0; got {level}, {n_bootstrap}")
    scale = float(np.exp(np.mean(np.log(c))))  # fit in units of the geometric-mean compute: a well-scaled A
    best = _fit_points(np.log(c / scale), y, huber_delta)
    if best is None:
        raise ConfigError("the scaling law fit did not converge; check that the loss falls with compute")
    e, a, gamma = best
    irreducible, amplitude = float(np.exp(e)), float(np.exp(a) * scale**gamma)
    intervals: tuple[tuple[str, float, float], ...] = ()
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_bootstrap):
            index = rng.integers(0, c.size, c.size)
            if np.unique(c[index]).size < 3:
                continue
            found = _fit_points(np.log(c[index] / scale), y[index], huber_delta, start=best)
            if found is not None:
                samples.append((np.exp(found[0]), np.exp(found[1]) * scale ** found[2], found[2]))
        if samples:
            values = np.asarray(samples)
            tail = (1 - level) / 2 * 100
            low, high = np.percentile(values, [tail, 100 - tail], axis=0)
            intervals = tuple(
                (name, float(low[i]), float(high[i])) for i, name in enumerate(("E", "A", "gamma"))
            )
    return ScalingLaw(
        name="fit",
        form="compute",
        irreducible=irreducible,
        gamma=float(gamma),
        source=source,
        corpus=corpus,
        origin="fit",
        parameters=(("E", irreducible), ("A", amplitude), ("gamma", float(gamma))),
        intervals=intervals,
        points=tuple((float(ci), float(yi)) for ci, yi in zip(c, y, strict=True)),
    )


def _fit_points(
    log_c: Any, loss: Any, huber_delta: float, start: tuple[float, float, float] | None = None
) -> tuple[float, float, float] | None:
    """Best (log E, log A', gamma) over a grid of starts (or one start), or None when nothing converges."""
    import numpy as np
    from scipy.optimize import least_squares

    log_loss = np.log(loss)

    def residuals(x: Any) -> Any:
        e, a, gamma = x
        return np.logaddexp(e, a - gamma * log_c) - log_loss

    if start is not None:
        starts = [start]
    else:
        low = float(np.min(loss))
        starts = [
            (math.log(low * fraction), math.log(max(low * (1 - fraction), 1e-6)), gamma)
            for fraction in (0.1, 0.5, 0.8, 0.95)
            for gamma in (0.05, 0.2, 0.5, 1.0)
        ]
    best: tuple[float, tuple[float, float, float]] | None = None
    for x0 in starts:
        result = least_squares(
            residuals,
            np.asarray(x0, dtype=np.float64),
            loss="huber",
            f_scale=huber_delta,
            bounds=([-30.0, -30.0, 1e-4], [30.0, 30.0, 10.0]),
            x_scale="jac",
            xtol=1e-14,
            ftol=1e-14,
            gtol=1e-14,
            max_nfev=5000,
        )
        if not np.all(np.isfinite(result.x)):
            continue
        cost = float(result.cost)
        if best is None or cost < best[0]:
            best = (cost, (float(result.x[0]), float(result.x[1]), float(result.x[2])))
    return None if best is None else best[1]
