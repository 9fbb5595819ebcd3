"""How the terminal table and the HTML report show outcome counts and SAE names (one home for both).

Numbers are formatted by :mod:`pytest_saecheck.messages` (``column_format``). Pure Python: imported by
the plugin's terminal summary, so it imports neither torch nor jinja2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_saecheck.naming import short_id
from pytest_saecheck.report.schema import OUTCOMES


def outcome_counts(counts: Mapping[str, int]) -> str:
    """``{"passed": 6, "xfailed": 1}`` -> ``"6 passed, 1 xfailed"``, worst outcome first; ``"-"`` when empty."""
    return ", ".join(f"{counts[name]} {name}" for name in OUTCOMES if counts.get(name)) or "-"


def short_labels(subjects: Sequence[tuple[str, str | None, str | None]]) -> list[str]:
    """Short names for table rows: each ``(label, sae spec, model spec)`` with local paths cut to their last part.

    A label that is the plugin's own ``"<sae>"``, ``"<sae> (joint)"`` or either with ``" @ <model>"`` is rebuilt
    from :func:`short_id` of each spec (``/long/path/run-42 @ /models/gpt2-ft`` -> ``run-42 @ gpt2-ft``; a joint
    splice's ``/runs/l4 + /runs/l8 (joint)`` -> ``l4 + l8 (joint)``); any other label is kept. When two different
    labels would get the same short name, both keep their full label.
    """
    shorts = []
    for label, sae, model in subjects:
        short = label
        if sae is not None and label.startswith(sae):
            rest = label[len(sae) :]
            at_model = f" @ {model}"
            if model is not None and rest.endswith(at_model):
                rest = rest[: -len(at_model)] + f" @ {short_id(str(model))}"
            if rest in ("", " (joint)") or rest.startswith((" @ ", " (joint) @ ")):
                short = short_id(sae) + rest
        shorts.append(short)
    owners: dict[str, set[str]] = {}
    for (label, _, _), short in zip(subjects, shorts, strict=True):
        owners.setdefault(short, set()).add(label)
    return [
        short if len(owners[short]) == 1 else label
        for (label, _, _), short in zip(subjects, shorts, strict=True)
    ]


def _setting(sae: Mapping[str, Any], name: str) -> Any:
    settings = sae.get("settings") or {}
    policy = sae.get("token_policy") or {}
    value = settings.get(name) if isinstance(settings, Mapping) else None
    if value is None and isinstance(policy, Mapping):
        value = policy.get(name)
    return value


#: What can tell two evaluations of one SAE apart, in the order a label names them: ``(name, value of an SAE
#: entry of the result document)``. Any other setting that differs is named after these, then the entry's id.
DISTINGUISHING: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = (
    (
        "model",
        lambda sae: (
            short_id(str(m)) if (m := sae["model"].get("resolved") or sae["model"].get("spec")) else None
        ),
    ),
    ("tokens", lambda sae: short_id(str(t)) if (t := sae["tokens"].get("source")) else None),
    ("n_tokens", lambda sae: sae["tokens"].get("requested_n_tokens") or sae["tokens"].get("n_tokens")),
    ("context_size", lambda sae: sae["tokens"].get("context_size")),
    ("seed", lambda sae: sae["tokens"].get("seed")),
    ("dtype", lambda sae: sae.get("dtype")),
    ("SAE dtype", lambda sae: sae.get("sae_dtype")),
    ("backend", lambda sae: sae.get("backend")),
    ("device", lambda sae: sae.get("device")),
    ("exclude_bos", lambda sae: _setting(sae, "exclude_bos")),
    ("exclude_special_tokens", lambda sae: _setting(sae, "exclude_special_tokens")),
    ("exclude_token_ids", lambda sae: _setting(sae, "exclude_token_ids")),
    ("hook", lambda sae: sae["hook"].get("name")),
    ("batch_size", lambda sae: sae.get("batch_size")),
)


def _shown(value: object) -> str:
    if value is None:  # a setting left unset: "(token_groups=none)", as the settings are written
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def row_labels(saes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The one label rule of every table of SAEs (terminal, HTML): a distinct label per entry of the document.

    Each SAE entry of a result document gets its short label (:func:`short_labels`). Entries that would share one
    (the same SAE evaluated with other settings: another ``n_tokens``, dtype, token policy, token file, ...) get
    ``"<label> (name=value, ...)"`` naming every fact of :data:`DISTINGUISHING` on which they differ, then any
    other differing setting; entries that still coincide get their id appended. The result depends only on the
    entries, not on their order.
    """
    shorts = short_labels(
        [
            (str(sae.get("label", "")), sae.get("sae", {}).get("spec"), sae.get("model", {}).get("spec"))
            for sae in saes
        ]
    )
    groups: dict[str, list[int]] = {}
    for index, short in enumerate(shorts):
        groups.setdefault(short, []).append(index)
    labels = list(shorts)
    for short, members in groups.items():
        if len(members) == 1:
            continue
        facts = [dict(_facts(saes[index])) for index in members]
        names = [name for name in _names(facts) if len({repr(fact.get(name)) for fact in facts}) > 1]
        for index, fact in zip(members, facts, strict=True):
            if names:
                labels[index] = f"{short} ({', '.join(f'{name}={_shown(fact.get(name))}' for name in names)})"
        seen: dict[str, int] = {}
        for index in members:
            seen[labels[index]] = seen.get(labels[index], 0) + 1
        for index in members:
            if seen[labels[index]] > 1:
                labels[index] = f"{labels[index]} [{saes[index].get('id')}]"
    return labels


def _facts(sae: Mapping[str, Any]) -> list[tuple[str, Any]]:
    facts = [(name, read(sae)) for name, read in DISTINGUISHING]
    known = {name for name, _ in DISTINGUISHING}
    settings = sae.get("settings") or {}
    if isinstance(settings, Mapping):
        facts += [(str(name), value) for name, value in sorted(settings.items()) if name not in known]
    return facts


def _names(facts: Sequence[Mapping[str, Any]]) -> list[str]:
    names = [name for name, _ in DISTINGUISHING]
    names += sorted({name for fact in facts for name in fact} - set(names))
    return names


#: SAE statuses that mean the SAE was checked (a gate ran on it, whatever it decided).
CHECKED_STATUSES = ("failed", "error", "passed")


def verdict(saes: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """The run's one-line verdict on its SAEs, as ``(kind, text)`` with kind ``"bad"``, ``"good"`` or
    ``"unchecked"``; ``None`` when no SAE was under test. One home for the HTML banner and the terminal line.

    A run in which no SAE was checked (every SAE's tests skipped or never run: the data or model was not on
    this machine, ``unavailable=skip``) is never good: it says so. When some SAEs passed and others were
    skipped, the good verdict names the skipped ones' count.
    """
    if not saes:
        return None
    plural = "" if len(saes) == 1 else "s"
    failing = [sae for sae in saes if sae.get("status") in ("failed", "error")]
    if failing:
        return "bad", f"{len(failing)} of {len(saes)} SAE{plural} failed or errored."
    unchecked = [sae for sae in saes if sae.get("status") not in CHECKED_STATUSES]
    if len(unchecked) == len(saes):
        return (
            "unchecked",
            f"No SAE was checked: the tests of all {len(saes)} SAE{plural} were skipped or did not run, "
            "so nothing passed.",
        )
    if unchecked:
        return (
            "good",
            f"Every SAE checked passed; {len(unchecked)} of {len(saes)} SAE{plural} were skipped or not run "
            "and were not checked.",
        )
    return "good", "Every SAE passed the tests that ran."
