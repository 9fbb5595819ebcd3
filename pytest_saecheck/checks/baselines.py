"""Regression baselines: the accepted numbers of each SAE, recorded once and compared on later runs.

A baseline is one small JSON file per SAE in the baseline directory (``--saecheck-baseline-dir DIR``, ini
``saecheck_baseline_dir`` relative to the ini file), named after the SAE's baseline key (:func:`baseline_key`: its
spec, model and hook as written, not the machine it ran on). It holds the metrics, the per-sequence sums a paired
bootstrap needs, SHA-256 hashes of the token ids and of the token policy, the model and SAE specs and the library
versions. Keys are sorted, objects indented, and each array written on one line, so a refreshed baseline diffs
as a few changed lines.

``--saecheck-update-baselines`` records (or refreshes) the baseline of every SAE evaluated in the run;
``--saecheck-update-baselines=missing`` only adds the missing ones. Workers send the baseline data on the test
reports; only the controller (the main process of a serial run) writes, once per SAE, atomically.

:func:`compare` is the statistics behind :func:`pytest_saecheck.checks.regression.assert_no_regression`: on the same
tokens, the bootstrap resamples sequences once and applies the same weights to both sides (a paired
difference); otherwise, only when asked, each side is resampled on its own.

Imports no torch and no numpy at import time (the core plugin imports it at start-up).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_saecheck import records
from pytest_saecheck.errors import ConfigError, SAECheckError
from pytest_saecheck.sums import Sum

if TYPE_CHECKING:
    import numpy as np

    from pytest_saecheck.files import RunLock

FORMAT = "pytest-saecheck-baseline"
FORMAT_VERSION = 1
BASELINE_DIR_OPTION = "--saecheck-baseline-dir"
UPDATE_OPTION = "--saecheck-update-baselines"
FAIL_UNUSED_OPTION = "--saecheck-fail-unused-baselines"
#: The suffix of the file beside a baseline that holds the numbers of a failed comparison (``<key>.obtained.json``).
OBTAINED_SUFFIX = ".obtained.json"
UPDATE_MODES = ("all", "missing")
DEFAULT_METRICS: tuple[str, ...] = ("delta_ce", "kl_sae", "explained_variance", "l0")
#: The record field that carries a baseline document from a worker to the controller.
RECORD_FIELD = "baseline_document"
_VERSIONED_PACKAGES = ("pytest-saecheck", "torch", "transformer-lens", "sae-lens", "numpy")


class BaselineError(SAECheckError, ValueError):
    """A baseline cannot be used: not a baseline file, or recorded on other tokens or another token policy."""


# --------------------------------------------------------------------------------------------------------
# options


def add_options(parser: pytest.Parser) -> None:
    """Register ``--saecheck-baseline-dir``, ``--saecheck-update-baselines`` and the ini key."""
    group = parser.getgroup("saecheck", "sparse autoencoder acceptance tests (pytest-saecheck)")
    group.addoption(
        BASELINE_DIR_OPTION,
        dest="saecheck_baseline_dir",
        metavar="DIR",
        default=None,
        help="directory of the regression baselines (one JSON file per SAE) that assert_no_regression compares with",
    )
    group.addoption(
        UPDATE_OPTION,
        dest="saecheck_update_baselines",
        nargs="?",
        const="all",
        default=None,
        metavar="all|missing",
        help="record or refresh the baseline of every SAE evaluated in this run; =missing only adds new ones "
        "(write it after the test paths, or with =: --saecheck-update-baselines=all)",
    )
    group.addoption(
        FAIL_UNUSED_OPTION,
        dest="saecheck_fail_unused_baselines",
        action="store_true",
        default=False,
        help="fail the run when the baseline directory holds baseline files that no assert_no_regression read "
        "(they are listed at the end of every run that compared baselines)",
    )
    parser.addini(
        "saecheck_baseline_dir",
        help="default for --saecheck-baseline-dir (relative to the ini file)",
        default=None,
    )


def baseline_dir(config: pytest.Config) -> Path | None:
    """The baseline directory: the option (relative to the invocation directory), else the ini key (relative to
    the ini file), else None."""
    from pytest_saecheck.files import option_path as _path

    return _path(config, "saecheck_baseline_dir")


def update_mode(config: pytest.Config) -> str | None:
    """``"all"``, ``"missing"`` or None (no ``--saecheck-update-baselines``)."""
    try:
        value = config.getoption("saecheck_update_baselines", default=None)
    except ValueError:
        return None
    return None if value is None else str(value)


def check_options(config: pytest.Config) -> None:
    """An update mode other than ``all``/``missing`` (typically a test path the option took as its value), or an
    update without a baseline directory, is a usage error, reported at start-up."""
    mode = update_mode(config)
    if mode is not None and mode not in UPDATE_MODES:
        raise pytest.UsageError(
            f"{UPDATE_OPTION} takes all (the default) or missing, got {mode!r}: a test path written right after it "
            f"is read as its value; write {UPDATE_OPTION}=all (or =missing), or put it after the test paths"
        )
    if mode is not None and baseline_dir(config) is None:
        raise pytest.UsageError(
            f"{UPDATE_OPTION} needs a baseline directory: pass {BASELINE_DIR_OPTION} DIR or set the ini key "
            "saecheck_baseline_dir"
        )


# --------------------------------------------------------------------------------------------------------
# the baseline document


def baseline_key(subject: Mapping[str, Any], hook_name: str | None) -> str:
    """The file stem of an SAE's baseline: a readable slug of its spec and a hash of (SAE spec, model spec, hook
    setting), all as written. Device, dtype and tokens are not part of it: a baseline recorded on a CPU is
    compared with a GPU run, and other tokens are an error, not a missing baseline."""
    from pytest_saecheck.naming import short_id

    sae = str(subject.get("sae") or "none")
    identity = json.dumps([sae, subject.get("model"), hook_name], sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", short_id(sae)).strip("._")[:60] or "sae"
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def baseline_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.json"


def obtained_path(path: Path) -> Path:
    """Where the numbers of a failed comparison with the baseline ``path`` go: ``<key>.obtained.json`` beside it."""
    return path.with_name(path.name.removesuffix(".json") + OBTAINED_SUFFIX)


def write_obtained(path: Path, document: Mapping[str, Any]) -> tuple[Path | None, str | None]:
    """Write the current evaluation's baseline document beside the baseline ``path`` (:func:`obtained_path`), as
    pytest-regressions writes the obtained data of a failed check: renamed to ``path``, it becomes the baseline.

    Returns ``(written path, None)``, or ``(None, why not)`` when it cannot be written (the comparison's failure
    stands either way).
    """
    from pytest_saecheck.files import write_atomic

    target = obtained_path(path)
    try:
        return write_atomic(target, dumps(document)), None
    except (OSError, BaselineError) as error:
        return None, f"{target} not written: {error}"


def token_ids_digest(tokens: Any) -> str:
    """SHA-256 of the token ids ``[n_sequences, seq_len]`` (a tensor or an array) as little-endian int64, with
    their shape."""
    import numpy as np

    if hasattr(tokens, "detach"):
        tokens = tokens.detach().to("cpu").numpy()
    array = np.ascontiguousarray(np.asarray(tokens), dtype="<i8")
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def policy_digest(policy: Mapping[str, Any]) -> str:
    """SHA-256 of a token policy's ``to_dict()`` (canonical JSON)."""
    return hashlib.sha256(json.dumps(dict(policy), sort_keys=True).encode()).hexdigest()


def compact_sums(per_sequence: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sequence sums with one number per sequence, as stored in a baseline (float64 ``[n_sequences]`` each).

    The only per-dimension sum, ``sum_x_centered`` ``[n_sequences, d]``, is folded into ``sum_sq_centered``: it
    becomes each sequence's Σ‖x − x̄‖² about the mean x̄ of all evaluated tokens, whose total is the exact total
    variance. Resampled, the variance is then taken about that fixed mean (a difference of order 1/n_tokens); the
    current evaluation goes through the same function before it is compared, so both sides are treated alike.
    """
    import numpy as np

    out = {
        key: np.asarray(value, dtype=np.float64) for key, value in per_sequence.items() if np.ndim(value) == 1
    }
    centered = per_sequence.get(Sum.SUM_X_CENTERED)
    if centered is not None and np.ndim(centered) == 2:
        centered = np.asarray(centered, dtype=np.float64)
        counts = out[Sum.N_REC]
        mean = centered.sum(0) / counts.sum()
        out[Sum.SUM_SQ_CENTERED] = (
            out[Sum.SUM_SQ_CENTERED] - 2.0 * (centered @ mean) + counts * float(mean @ mean)
        )
    return out


def _expanded(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Compacted sums in the form :func:`~pytest_saecheck.metrics.metrics_from_sums` reads (a zero
    ``sum_x_centered`` column: the variance sums are already about the mean)."""
    import numpy as np

    out = dict(sums)
    if Sum.SUM_SQ_CENTERED in out:
        out[Sum.SUM_X_CENTERED] = np.zeros((len(out[Sum.SUM_SQ_CENTERED]), 1))
    return out


def versions() -> dict[str, str | None]:
    from pytest_saecheck.files import package_version

    return {name: package_version(name) for name in _VERSIONED_PACKAGES}


def build_document(
    *,
    key: str,
    subject: Mapping[str, Any],
    evaluation: Any,
    tokens: Any,
    token_source: str | None,
    settings: Mapping[str, Any],
    model_spec: str | None = None,
) -> dict[str, Any]:
    """The baseline document of one evaluated SAE (plain JSON types; see the module docstring)."""
    policy = evaluation.token_policy.to_dict()
    law = evaluation.scaling_law
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "label": subject.get("label"),
        "sae": {
            "spec": subject.get("sae"),
            "hook_name": evaluation.hook_name,
            "hook_head_index": evaluation.hook_head_index,
        },
        "model": {
            "spec": subject.get("model"),
            "resolved": model_spec,
            "dtype": evaluation.model_dtype or subject.get("dtype"),
        },
        "tokens": {
            "source": subject.get("tokens") or token_source,
            "n_tokens": int(evaluation.n_tokens),
            "n_sequences": int(evaluation.n_sequences),
            "seq_len": int(evaluation.seq_len),
            "ids_sha256": token_ids_digest(tokens),
            "policy": policy,
            "policy_sha256": policy_digest(policy),
        },
        "settings": {
            name: records.plain(settings.get(name)) for name in ("n_tokens", "context_size", "seed")
        },
        "scaling_law": None if law is None else [float(law.irreducible), float(law.gamma)],
        "versions": versions(),
        "metrics": {name: float(value) for name, value in sorted(evaluation.metrics.items())},
        "per_sequence": {
            name: [float(value) for value in array]
            for name, array in sorted(compact_sums(evaluation.per_sequence).items())
        },
    }


def document_for(check: Any) -> dict[str, Any]:
    """The baseline document of a ``saecheck`` fixture's SAE (evaluates it if needed)."""
    evaluation = check.evaluation
    subject = check.subject()
    return build_document(
        key=baseline_key(subject, check.settings.hook_name),
        subject=subject,
        evaluation=evaluation,
        tokens=check.tokens,
        token_source=check.token_source,
        settings=check.settings.to_dict(),
        model_spec=check.model_spec,
    )


def _render(value: Any, indent: int) -> str:
    if isinstance(value, Mapping) and value:
        pad = " " * (indent + 1)
        inner = ",\n".join(
            f"{pad}{json.dumps(str(key), ensure_ascii=False)}: {_render(item, indent + 1)}"
            for key, item in sorted(value.items(), key=lambda pair: str(pair[0]))
        )
        return "{\n" + inner + "\n" + " " * indent + "}"
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def dumps(document: Mapping[str, Any]) -> str:
    """The baseline as text: sorted keys, objects indented, arrays on one line, floats exact (``repr``).

    Raises:
        BaselineError: a value is NaN or infinite (JSON cannot hold it).
    """
    try:
        return _render(document, 0) + "\n"
    except ValueError as error:
        raise BaselineError(f"baseline {document.get('key')!r} holds a non-finite number: {error}") from None


def load(path: Path) -> dict[str, Any]:
    """Read a baseline file.

    Raises:
        BaselineError: not JSON, or not a baseline of a format version this version reads.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BaselineError(
            f"{path} is not a readable baseline ({error}); delete it and record it again with {UPDATE_OPTION}"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BaselineError(f'{path} is not a pytest-saecheck baseline (no "format": "{FORMAT}")')
    if document.get("format_version") != FORMAT_VERSION:
        raise BaselineError(
            f"{path} has baseline format version {document.get('format_version')!r}; this pytest-saecheck reads "
            f"version {FORMAT_VERSION}: record it again with {UPDATE_OPTION}"
        )
    per_sequence = document.get("per_sequence")
    if not isinstance(per_sequence, dict) or not per_sequence:
        raise BaselineError(f"{path} holds no per-sequence sums; record it again with {UPDATE_OPTION}")
    _check_shape(document, path)
    return document


REQUIRED_SUMS = (Sum.N_CE, Sum.N_KL, Sum.CE_ORIG, Sum.CE_SAE, Sum.KL_SAE)
"""The per-sequence sums every baseline holds (what :func:`~pytest_saecheck.metrics.metrics_from_sums` always
reads)."""


def _check_shape(document: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`BaselineError` naming ``path`` and the key when a baseline's sections are malformed: no
    ``tokens`` (with ``ids_sha256``, ``policy_sha256`` and ``n_sequences``), ``metrics`` that are not numbers, a
    required per-sequence sum missing, or per-sequence arrays that are not ``n_sequences`` numbers each."""
    again = f"delete it and record it again with {UPDATE_OPTION}"
    tokens = document.get("tokens")
    if not isinstance(tokens, dict):
        raise BaselineError(f"{path}: key 'tokens' is missing or not an object; {again}")
    for key in ("ids_sha256", "policy_sha256"):
        if not isinstance(tokens.get(key), str):
            raise BaselineError(f"{path}: key 'tokens.{key}' is missing or not a string; {again}")
    n_sequences = tokens.get("n_sequences")
    if not isinstance(n_sequences, int) or isinstance(n_sequences, bool) or n_sequences < 1:
        raise BaselineError(
            f"{path}: key 'tokens.n_sequences' must be a positive integer, got {n_sequences!r}; {again}"
        )
    metrics = document.get("metrics")
    if not isinstance(metrics, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise BaselineError(f"{path}: key 'metrics' must map metric names to numbers; {again}")
    per_sequence = document["per_sequence"]
    missing = [name for name in REQUIRED_SUMS if name not in per_sequence]
    if missing:
        raise BaselineError(
            f"{path}: key 'per_sequence' lacks {', '.join(f'per_sequence.{name}' for name in missing)}; {again}"
        )
    for name, values in per_sequence.items():
        if not (
            isinstance(values, list)
            and len(values) == n_sequences
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            found = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
            raise BaselineError(
                f"{path}: key 'per_sequence.{name}' must be a list of {n_sequences} numbers (tokens.n_sequences), "
                f"got {found}; {again}"
            )


def per_sequence_arrays(document: Mapping[str, Any]) -> dict[str, np.ndarray]:
    import numpy as np

    return {name: np.asarray(values, dtype=np.float64) for name, values in document["per_sequence"].items()}


def token_mismatch(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """How the token sets of two baseline documents differ (empty when the ids and the policy are the same)."""
    mine, theirs = current["tokens"], baseline["tokens"]
    problems = []
    if mine.get("ids_sha256") != theirs.get("ids_sha256"):
        shape = (mine.get("n_sequences"), mine.get("seq_len"))
        their_shape = (theirs.get("n_sequences"), theirs.get("seq_len"))
        detail = (
            f"{shape[0]} × {shape[1]} now, {their_shape[0]} × {their_shape[1]} in the baseline"
            if shape != their_shape
            else f"same shape {shape[0]} × {shape[1]}, different ids"
        )
        problems.append(
            f"the token ids differ ({detail}; source now {mine.get('source')!r}, "
            f"baseline {theirs.get('source')!r})"
        )
    if mine.get("policy_sha256") != theirs.get("policy_sha256"):
        now, then = mine.get("policy") or {}, theirs.get("policy") or {}
        changed = sorted(key for key in set(now) | set(then) if now.get(key) != then.get(key))
        parts = ", ".join(f"{key}: {then.get(key)!r} → {now.get(key)!r}" for key in changed)
        problems.append(f"the token policy differs ({parts or 'different hash'})")
    return problems


# --------------------------------------------------------------------------------------------------------
# comparison


@dataclass(frozen=True)
class MetricComparison:
    """One metric, now against its baseline. ``difference`` = current − baseline (in the metric's units) with its
    bootstrap ``interval``; ``status`` is ``regressed`` (worse by more than ``tol`` at the confidence level),
    ``improved`` (better at the confidence level), ``unchanged`` (neither) or ``undefined``."""

    metric: str
    current: float | None
    baseline: float | None
    difference: float | None
    interval: tuple[float, float] | None
    higher_is_better: bool
    tol: float
    status: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "current": self.current,
            "baseline": self.baseline,
            "difference": self.difference,
            "interval": list(self.interval) if self.interval is not None else None,
            "higher_is_better": self.higher_is_better,
            "tol": self.tol,
            "status": self.status,
            "reason": self.reason,
        }


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _replicates(
    per_sequence: Mapping[str, np.ndarray], names: Sequence[str], law: Any, seed: int
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of metrics ``names`` of one side (for the unpaired comparison)."""
    import numpy as np

    from pytest_saecheck.metrics import metrics_from_sums
    from pytest_saecheck.stats import bootstrap_intervals

    gathered: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def keep(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = metrics_from_sums(sums, law)
        for name in names:
            gathered[name].append(np.asarray(values.get(name, np.full(len(sums[Sum.N_CE]), np.nan))))
        return {}

    bootstrap_intervals(per_sequence, keep, seed=seed)
    return {name: np.concatenate(chunks) for name, chunks in gathered.items()}


def compare(
    current: Mapping[str, np.ndarray],
    baseline: Mapping[str, np.ndarray],
    metrics: Sequence[str],
    *,
    level: float,
    tol: Mapping[str, float | None],
    scaling_law: Any,
    paired: bool = True,
) -> list[MetricComparison]:
    """Compare ``metrics`` of two sets of compacted per-sequence sums (:func:`compact_sums`).

    Paired (same tokens, same number of sequences): one set of bootstrap weights over sequences applied to both
    sides. Unpaired: each side resampled on its own, the difference of independent replicates. The interval is
    the bootstrap interval of the difference at ``level`` (BCa paired, percentile unpaired). A metric's ``tol`` of None is
    :func:`default_tolerance` of its baseline value.
    """
    now_sums, then_sums = _expanded(current), _expanded(baseline)
    now_points, then_points = _totals(now_sums, scaling_law), _totals(then_sums, scaling_law)
    defined = [
        name for name in metrics if _finite_point(now_points, name) and _finite_point(then_points, name)
    ]
    intervals = _intervals(now_sums, then_sums, defined, scaling_law, level, paired) if defined else {}
    return [
        _judge(name, now_points.get(name), then_points.get(name), intervals.get(name), tol.get(name))
        for name in metrics
    ]


def _totals(sums: Mapping[str, np.ndarray], law: Any) -> dict[str, Any]:
    """The metrics of the whole token set (every sequence's sums added up)."""
    from pytest_saecheck.metrics import metrics_from_sums

    return dict(metrics_from_sums({key: value.sum(0) for key, value in sums.items()}, law))


def _finite_point(points: Mapping[str, Any], name: str) -> bool:
    return name in points and math.isfinite(float(points[name]))


def _intervals(
    now_sums: Mapping[str, np.ndarray],
    then_sums: Mapping[str, np.ndarray],
    defined: Sequence[str],
    law: Any,
    level: float,
    paired: bool,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals at ``level`` of current − baseline of each metric in ``defined``.

    Paired: one set of bootstrap weights over sequences applied to both sides. Unpaired: the difference of
    independent replicates of each side (NaN bounds when a replicate is NaN).
    """
    import numpy as np

    from pytest_saecheck.metrics import metrics_from_sums
    from pytest_saecheck.stats import bootstrap_intervals
    from pytest_saecheck.sums import under_prefix, with_prefix

    if paired:
        joined = with_prefix("now:", now_sums) | with_prefix("then:", then_sums)

        def difference(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            now = metrics_from_sums(under_prefix("now:", sums), law)
            then = metrics_from_sums(under_prefix("then:", sums), law)
            return {name: now[name] - then[name] for name in defined}

        return dict(bootstrap_intervals(joined, difference, level=level))
    now_reps = _replicates(now_sums, defined, law, seed=0)
    then_reps = _replicates(then_sums, defined, law, seed=1)
    tail = (1.0 - level) / 2.0
    intervals: dict[str, tuple[float, float]] = {}
    for name in defined:
        diffs = now_reps[name] - then_reps[name]
        if np.isnan(diffs).any():
            intervals[name] = (math.nan, math.nan)
        else:
            low, high = np.quantile(diffs, [tail, 1.0 - tail])
            intervals[name] = (float(low), float(high))
    return intervals


def _judge(
    name: str, now_point: Any, then_point: Any, interval: tuple[float, float] | None, given_tol: float | None
) -> MetricComparison:
    """One metric's comparison: undefined on a side or in its interval, else regressed, improved or unchanged."""
    from pytest_saecheck.catalogue import METRICS

    higher_is_better = METRICS[name].higher_is_better
    now_value = None if now_point is None else _finite(now_point)
    then_value = None if then_point is None else _finite(then_point)
    allowed = default_tolerance(then_value) if given_tol is None else given_tol
    if now_value is None or then_value is None:
        side = "now" if now_value is None else "in the baseline"
        both = now_value is None and then_value is None
        return MetricComparison(
            name, now_value, then_value, None, None, higher_is_better, allowed,
            "undefined", f"undefined {'on both sides' if both else side}",
        )  # fmt: skip
    delta = now_value - then_value
    low, high = interval if interval is not None else (math.nan, math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        return MetricComparison(
            name, now_value, then_value, delta, None, higher_is_better, allowed, "undefined",
            "its bootstrap interval is undefined (a resample where the metric is undefined)",
        )  # fmt: skip
    status = _status(low, high, higher_is_better, allowed)
    return MetricComparison(
        name, now_value, then_value, delta, (low, high), higher_is_better, allowed, status
    )


def _status(low: float, high: float, higher_is_better: bool, allowed: float) -> str:
    """``regressed`` when the whole interval of the difference lies beyond ``allowed`` on the worse side,
    ``improved`` when it lies wholly on the better side, else ``unchanged``."""
    # "worse" is positive: a rise of a lower-is-better metric, a fall of a higher-is-better one
    worse_low, worse_high = (-high, -low) if higher_is_better else (low, high)
    if worse_low > allowed:
        return "regressed"
    if worse_high < 0.0:
        return "improved"
    return "unchanged"


# --------------------------------------------------------------------------------------------------------
# recording (worker side) and writing (controller side)


def record_fields(check: Any, config: pytest.Config | None) -> dict[str, Any]:
    """The fields an evaluation record carries when this run updates baselines: the SAE's baseline document."""
    if config is None or update_mode(config) is None:
        return {}
    return {RECORD_FIELD: document_for(check)}


class BaselineWriter:
    """On the controller: gathers the baseline documents from the reports and writes each once, at the end.

    The plugin's session object owns it (:class:`~pytest_saecheck.plugin.session.SAECheckSession`) and feeds it
    the reports (:meth:`add_report`), has it write (:meth:`write`) and print its lines (:meth:`summary`).
    """

    def __init__(self, directory: Path, mode: str) -> None:
        self.directory = directory
        self.mode = mode
        self.documents: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # key -> [(nodeid, document)]
        self.lines: list[tuple[str, bool]] = []  # (line, is a problem)
        self.lock: RunLock | None = None  # held for the whole run (writer_for)

    def add_report(self, report: pytest.TestReport) -> None:
        for plain in getattr(report, records.REPORT_ATTRIBUTE, None) or ():
            record = records.from_plain(plain)
            if not isinstance(record, records.EvaluationRecord):
                continue
            document = record.baseline_document
            if isinstance(document, Mapping) and isinstance(document.get("key"), str):
                self.documents.setdefault(document["key"], []).append((report.nodeid, dict(document)))

    def write(self, session: pytest.Session) -> None:
        """Write each baseline (atomically); one that cannot be written is one red line and a non-zero exit,
        and the others are still written."""
        from pytest_saecheck.files import commit_files, failed_exit_status

        for key in sorted(self.documents):
            found = sorted(self.documents[key], key=lambda pair: pair[0])
            nodeid, document = found[0]
            others = {dumps(other) for _, other in found[1:]} - {dumps(document)}
            if others:
                self.lines.append(
                    (
                        f"saecheck: {len(others)} other evaluation(s) of {document.get('label')} (other tokens or "
                        f"settings) were not recorded; the baseline is the one of {nodeid}",
                        True,
                    )
                )
            path = baseline_path(self.directory, key)
            text = dumps(document)
            if path.exists():
                if self.mode == "missing":
                    continue
                try:
                    if path.read_text(encoding="utf-8") == text:
                        self.lines.append((f"saecheck: baseline unchanged {path}", False))
                        continue
                except OSError:
                    pass
            [written] = commit_files([(path, text)])
            if written.error is not None:
                self.lines.append((f"saecheck: baseline not written: {written.error}", True))
                session.exitstatus = failed_exit_status(session.exitstatus)
                continue
            self.lines.append((f"saecheck: baseline written to {path}", False))

    def summary(self, terminalreporter: Any) -> None:
        for line, problem in self.lines:
            terminalreporter.write_line(line, red=problem)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def writer_for(config: pytest.Config) -> BaselineWriter | None:
    """The :class:`BaselineWriter` of an updating run, its baseline directory locked; None on an xdist worker
    (the controller writes) and in a run that does not update baselines.

    Raises:
        pytest.UsageError: another live run is recording baselines in the directory.
    """
    mode = update_mode(config)
    if mode is None or hasattr(config, "workerinput"):
        return None
    directory = baseline_dir(config)
    assert directory is not None
    from pytest_saecheck.files import RunLock

    lock = RunLock(directory)
    if not lock.acquire():
        raise pytest.UsageError(
            f"saecheck: another pytest run (process {lock.holder()}) is recording baselines in {directory} right "
            f"now (lock {lock.lock_path}); two runs recording at once would silently drop one run's numbers. "
            f"Wait for it to finish, or record into another {BASELINE_DIR_OPTION}"
        )
    writer = BaselineWriter(directory, mode)
    writer.lock = lock
    return writer


# --------------------------------------------------------------------------------------------------------
# baseline files no test read (reported at the end of the run, as syrupy reports unused snapshots)


def fail_unused(config: pytest.Config) -> bool:
    """Whether the run fails when a baseline file was not read (:data:`FAIL_UNUSED_OPTION`)."""
    try:
        return bool(config.getoption("saecheck_fail_unused_baselines", default=False))
    except ValueError:
        return False


def paths_read(plain_records: Any) -> set[Path]:
    """The baseline files that the ``assert_no_regression`` records among ``plain_records`` (a report's
    ``saecheck_records``) compared with, found missing, or recorded."""
    found = set()
    for plain in plain_records or ():
        record = records.from_plain(plain)
        if isinstance(record, records.AssertionRecord) and isinstance(record.baseline, Mapping):
            path = record.baseline.get("path")
            if isinstance(path, str) and path:
                found.add(Path(path).resolve())
    return found


def unused(directory: Path, read: set[Path]) -> list[Path]:
    """The baseline files (``*.json``, not ``*.obtained.json``) in ``directory`` that are not in ``read``, sorted."""
    try:
        files = sorted(directory.glob("*.json"))
    except OSError:
        return []
    resolved = {path.resolve() for path in read}
    return [
        path
        for path in files
        if not path.name.endswith(OBTAINED_SUFFIX) and path.is_file() and path.resolve() not in resolved
    ]


def unused_lines(paths: Sequence[Path], *, fail: bool) -> list[tuple[str, bool]]:
    """The terminal lines (text, is a failure) that list the baseline files no test read."""
    if not paths:
        return []
    n = len(paths)
    how = (
        f"the run fails ({FAIL_UNUSED_OPTION})"
        if fail
        else f"delete them if their SAEs are gone; {FAIL_UNUSED_OPTION} makes this a failure"
    )
    head = (
        f"saecheck: {n} baseline file{'' if n == 1 else 's'} no test read (a run of part of the tests lists "
        f"the baselines of the others too): {how}"
    )
    return [(head, fail), *((f"  {path}", fail) for path in paths)]


def record_command(nodeid: str | None, directory: Path) -> str:
    """The command that records the missing baseline of one test's SAE."""
    target = f"'{nodeid}' " if nodeid else ""
    return f"pytest {target}{BASELINE_DIR_OPTION} {directory} {UPDATE_OPTION}=missing"


#: The default ``tol`` of a metric: ``NOISE_RELATIVE × |baseline| + NOISE_ABSOLUTE`` in the metric's units. It
#: absorbs float differences between devices, kernels and library versions (a paired interval of a systematic
#: rounding difference is narrow, and would otherwise exclude 0), and nothing a user would call a regression.
NOISE_RELATIVE = 1e-3
NOISE_ABSOLUTE = 1e-5


def default_tolerance(baseline: float | None) -> float:
    return NOISE_RELATIVE * abs(baseline or 0.0) + NOISE_ABSOLUTE


def check_tol(tol: Any, metrics: Sequence[str]) -> dict[str, float | None]:
    """``tol`` (None, a number ≥ 0, or a mapping metric → number ≥ 0) as a mapping over ``metrics``; None where
    the default (:func:`default_tolerance`) applies."""
    from pytest_saecheck.checks.workflow import finite_number as _finite_number

    if tol is None:
        return dict.fromkeys(metrics)
    if isinstance(tol, Mapping):
        unknown = sorted(set(tol) - set(metrics))
        if unknown:
            raise ConfigError(
                f"assert_no_regression: tol names metrics that are not compared: {', '.join(map(str, unknown))}; "
                f"compared: {', '.join(metrics)}"
            )
        values: dict[str, float | None] = {
            name: None if tol.get(name) is None else _finite_number(f"tol[{name!r}]", tol[name])
            for name in metrics
        }
    else:
        values = dict.fromkeys(metrics, _finite_number("tol", tol))
    negative = {name: value for name, value in values.items() if value is not None and value < 0}
    if negative:
        raise ConfigError(
            f"assert_no_regression: tol must be at least 0 (how much worse a metric may get, in its units), got "
            f"{negative}"
        )
    return values
