"""Downstream tasks: does the model keep a capability with the SAE spliced in?

A **task** is a set of prompts, each with an answer token: a *next-token* task gives one right answer (the model
must rank it first among the whole vocabulary), a *multiple-choice* task gives the right answer and one or more
wrong candidates (the model must rank the right one above every wrong one). Tasks are written by hand as JSONL,
one prompt per line::

    {"prompt": "When Mary and John went to the store, John gave a drink to", "answer": " Mary", "wrong": [" John"]}
    {"prompt": "The capital of France is", "answer": " Paris"}

Keys: ``prompt`` (text, tokenised by the model's tokenizer with its usual BOS), ``answer`` (text of exactly one
token, written as it follows the prompt, usually with its leading space), ``wrong`` (optional list of such
texts; all lines of one file either have it or not). Blank lines are skipped; anything else is an error that
names the line (:func:`load_task`).

**Measures** (:func:`measure_task`), on the original and on the spliced model, at each prompt's last position:

- *logit difference* ``logit(right) − max logit(wrong)``, the wrong candidates being the listed ones (for a
  next-token task: every other token of the vocabulary). With one wrong candidate this is the logit difference
  of the indirect-object-identification study (Wang et al., 2022, "Interpretability in the Wild", §3: logit(IO)
  − logit(S)); it is positive exactly when the prompt is answered right;
- *accuracy*: the share of prompts with a positive logit difference (ties count as wrong).

``accuracy_drop = accuracy_orig − accuracy_sae`` and ``logit_diff_drop`` likewise, with paired BCa
bootstrap intervals over prompts (:func:`pytest_saecheck.stats.bootstrap_intervals`: one resample draws the same
prompts for both models). The spliced model is the engine's own splice (:class:`~pytest_saecheck.engine.cut.
ModelCut` and :class:`~pytest_saecheck.engine.member.Member`: the SAE's reconstruction replaces the written
activation, at ``hook_name_out`` for a transcoder, at the positions the token policy keeps).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_saecheck import messages, running
from pytest_saecheck.checks.workflow import (
    CheckOutcome,
    conclude,
    confidence_level,
    finite_number,
    is_fixture,
)
from pytest_saecheck.defaults import INTERVAL_LEVEL
from pytest_saecheck.errors import ConfigError, LoadError

NEXT_TOKEN = "next_token"
MULTIPLE_CHOICE = "multiple_choice"
TASK_KEYS = ("prompt", "answer", "wrong")
MIN_PROMPTS_FOR_INTERVAL = 2


@dataclass(frozen=True)
class TaskItem:
    """One prompt: its text, the right answer's text, the wrong candidates' texts, and its line in the file."""

    prompt: str
    answer: str
    wrong: tuple[str, ...] = ()
    line: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "answer": self.answer}
        if self.wrong:
            out["wrong"] = list(self.wrong)
        return out


@dataclass(frozen=True)
class Task:
    """A named set of prompts (:class:`TaskItem`), all next-token or all multiple choice; ``source`` says where
    it came from (a file path, or ``demo:<name>``)."""

    name: str
    items: tuple[TaskItem, ...]
    source: str = ""

    @property
    def kind(self) -> str:
        """``"next_token"`` or ``"multiple_choice"``."""
        return MULTIPLE_CHOICE if self.items and self.items[0].wrong else NEXT_TOKEN

    def to_jsonl(self) -> str:
        """The task in the JSONL format :func:`load_task` reads."""
        return "".join(json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in self.items)


def parse_task(text: str, name: str, source: str = "") -> Task:
    """A :class:`Task` from JSONL ``text`` (see the module docstring).

    Raises :class:`LoadError` naming the line of the first problem: not JSON, not an object, a missing, empty or
    non-text ``prompt``/``answer``, a ``wrong`` that is not a non-empty list of texts, the answer among the wrong
    candidates, an unknown key, next-token and multiple-choice lines mixed, or no prompt at all.
    """
    where = source or name
    items: list[TaskItem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        at = f"task {where!r} line {number}"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as error:
            raise LoadError(
                f"{at}: not valid JSON ({error.msg} at column {error.colno}); {_FORMAT}"
            ) from None
        if not isinstance(entry, dict):
            raise LoadError(f"{at}: expected a JSON object, got {type(entry).__name__}; {_FORMAT}")
        unknown = sorted(set(entry) - set(TASK_KEYS))
        if unknown:
            raise LoadError(
                f"{at}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(TASK_KEYS)}"
            )
        for key in ("prompt", "answer"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise LoadError(
                    f"{at}: {key!r} must be a non-empty string, got {entry.get(key)!r}; {_FORMAT}"
                )
        wrong = entry.get("wrong")
        if wrong is not None and (
            not isinstance(wrong, list)
            or not wrong
            or not all(isinstance(item, str) and item.strip() for item in wrong)
        ):
            raise LoadError(f"{at}: 'wrong' must be a non-empty list of non-empty strings, got {wrong!r}")
        if wrong is not None and entry["answer"] in wrong:
            raise LoadError(f"{at}: the answer {entry['answer']!r} is also listed as wrong")
        item = TaskItem(entry["prompt"], entry["answer"], tuple(wrong or ()), number)
        if items and bool(item.wrong) != bool(items[0].wrong):
            kinds = "multiple choice" if items[0].wrong else "next token"
            raise LoadError(
                f"{at}: mixes next-token and multiple-choice prompts (line {items[0].line} is {kinds}); put each "
                "kind in its own task file"
            )
        items.append(item)
    if not items:
        raise LoadError(f"task {where!r} holds no prompt; {_FORMAT}")
    return Task(name, tuple(items), source)


_FORMAT = (
    'each line is {"prompt": "...", "answer": " word"} or {"prompt": "...", "answer": " a", "wrong": [" b"]}'
)


def load_task(path: str | os.PathLike[str], name: str | None = None) -> Task:
    """Read a task from a JSONL file (named after the file's stem unless ``name`` is given).

    A relative path inside a running test resolves against that test file's directory (as the marker's paths
    resolve against the file that wrote them), so ``pytest proj/`` and ``cd proj; pytest`` read the same file;
    outside a test, against the working directory.

    Raises :class:`LoadError` when the file is missing or malformed (with the line number, :func:`parse_task`).
    """
    file = Path(os.path.expanduser(os.fspath(path)))
    item = running.current_item()
    if not file.is_absolute() and item is not None and getattr(item, "path", None) is not None:
        file = Path(item.path).parent / file
    if not file.is_file():
        raise LoadError(f"task file {str(path)!r} not found (looked for {file.resolve()})")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LoadError(f"task file {str(file)!r} cannot be read: {error}") from None
    return parse_task(text, name or file.stem, str(file))


def as_task(task: object) -> Task:
    """A :class:`Task`, or the path of a JSONL file; else :class:`ConfigError`."""
    if isinstance(task, Task):
        return task
    if isinstance(task, (str, os.PathLike)):
        return load_task(task)
    raise ConfigError(
        f"task must be a pytest_saecheck Task or the path of a JSONL task file, got {type(task).__name__}"
    )


# ------------------------------------------------------------------------------------------------------------
# measuring


@dataclass
class TaskResult:
    """A task measured on the original and the spliced model (see the module docstring for the definitions).

    ``per_prompt`` holds, per prompt, ``correct_orig``/``correct_sae`` (1 or 0) and ``diff_orig``/``diff_sae``
    (logit differences), in the task's order.
    """

    name: str
    kind: str
    source: str
    per_prompt: dict[str, Any] = field(repr=False)
    notes: list[str] = field(default_factory=list)
    _cache: dict[tuple[float, int], dict[str, tuple[float, float]]] = field(default_factory=dict, repr=False)

    @property
    def n_prompts(self) -> int:
        return len(self.per_prompt["correct_orig"])

    def values(self) -> dict[str, float]:
        """``accuracy_orig``, ``accuracy_sae``, ``accuracy_drop``, ``logit_diff_orig``, ``logit_diff_sae`` and
        ``logit_diff_drop`` (accuracy as a share in [0, 1]; logit differences in logit units)."""
        sums = {key: value.sum() for key, value in self.per_prompt.items()}
        return {name: float(value) for name, value in _statistics(sums, self.n_prompts).items()}

    def intervals(self, level: float = INTERVAL_LEVEL, seed: int = 0) -> dict[str, tuple[float, float]]:
        """Paired BCa bootstrap intervals over prompts of every value (empty with fewer than 2 prompts)."""
        key = (float(level), int(seed))
        if key not in self._cache:
            from pytest_saecheck.stats import bootstrap_intervals

            found: dict[str, tuple[float, float]] = {}
            if self.n_prompts >= MIN_PROMPTS_FOR_INTERVAL:
                import numpy as np

                per_prompt = {**self.per_prompt, "n": np.ones(self.n_prompts)}
                found = bootstrap_intervals(
                    per_prompt, lambda sums: _statistics(sums, sums["n"]), level=level, seed=seed
                )
            self._cache[key] = found
        return dict(self._cache[key])

    def to_dict(self, level: float = INTERVAL_LEVEL) -> dict[str, Any]:
        """Plain values for the report."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "n_prompts": self.n_prompts,
            **self.values(),
            "intervals": {name: [low, high] for name, (low, high) in self.intervals(level).items()},
            "interval_level": level,
            "notes": list(self.notes),
        }


def _statistics(sums: Mapping[str, Any], n: Any) -> dict[str, Any]:
    """The task's values from (possibly resampled) per-prompt sums; ``n`` the number of prompts."""
    out = {
        "accuracy_orig": sums["correct_orig"] / n,
        "accuracy_sae": sums["correct_sae"] / n,
        "logit_diff_orig": sums["diff_orig"] / n,
        "logit_diff_sae": sums["diff_sae"] / n,
    }
    out["accuracy_drop"] = out["accuracy_orig"] - out["accuracy_sae"]
    out["logit_diff_drop"] = out["logit_diff_orig"] - out["logit_diff_sae"]
    return out


def _one_token(cut: Any, text: str, what: str, item: TaskItem, task: Task) -> int:
    ids = cut.tokenize(text, prepend_bos=False)
    if len(ids) != 1:
        shown = [cut.tokenizer.decode([i]) for i in ids]
        raise LoadError(
            f"task {task.source or task.name!r} line {item.line}: the {what} {text!r} is {len(ids)} tokens {shown} "
            "for this model's tokenizer; every answer and wrong candidate must be exactly one token (write it as it "
            "follows the prompt, usually with its leading space)"
        )
    unk = getattr(cut.tokenizer, "unk_token_id", None)
    if isinstance(unk, int) and ids[0] == unk:
        raise LoadError(
            f"task {task.source or task.name!r} line {item.line}: the {what} {text!r} is not in this model's "
            f"vocabulary (it tokenises to the unknown token {cut.tokenizer.decode([unk])!r}), so no prediction "
            "can be right or wrong about it; write candidates the tokenizer knows"
        )
    return int(ids[0])


def tokenized(cut: Any, task: Task) -> list[tuple[list[int], int, list[int]]]:
    """``(prompt ids, right id, wrong ids)`` per prompt, with the tokenizer of the model reached through ``cut``
    (a :class:`~pytest_saecheck.engine.cut.ModelCut`; BOS as the model adds it).

    Raises :class:`ConfigError` when the model has no tokenizer, :class:`LoadError` (with the line) when an
    answer is not one token, candidates repeat, or a prompt does not fit the model's context.
    """
    if cut.tokenizer is None:
        raise ConfigError(
            "task prompts are text, but the model has no tokenizer; attach one (model.set_tokenizer)"
        )
    out = []
    n_ctx = cut.n_ctx
    for item in task.items:
        prompt = cut.tokenize(item.prompt, prepend_bos=None)
        if n_ctx is not None and len(prompt) > n_ctx:
            raise LoadError(
                f"task {task.source or task.name!r} line {item.line}: the prompt is {len(prompt)} tokens, more than "
                f"the model's context n_ctx={n_ctx}"
            )
        right = _one_token(cut, item.answer, "answer", item, task)
        wrong = [_one_token(cut, text, "wrong candidate", item, task) for text in item.wrong]
        if right in wrong or len(set(wrong)) != len(wrong):
            raise LoadError(
                f"task {task.source or task.name!r} line {item.line}: two candidates are the same token; each "
                "candidate must be a different token"
            )
        out.append((prompt, right, wrong))
    return out


def measure_task(
    model: Any,
    sae: Any,
    task: Task | str | os.PathLike[str],
    *,
    activation_scaler: Any = None,
    batch_size: int = 32,
) -> TaskResult:
    """Measure ``task`` on ``model`` and on ``model`` with ``sae`` spliced in (see the module docstring).

    Prompts of equal length run together (no padding), ``batch_size`` at a time. The splice is the engine's: the
    reconstruction replaces the activation at every position the default token policy keeps (BOS and special
    tokens stay untouched), inside the SAE's activation normalisation (``activation_scaler`` as for
    :func:`~pytest_saecheck.engine.evaluate`; estimated on the prompts when the SAE needs one and none is given).

    Raises :class:`ConfigError`, :class:`LoadError` (a malformed task, an answer that is not one token) and the
    engine's errors for a model or SAE it cannot splice.
    """
    import numpy as np
    import torch

    from pytest_saecheck import normalisation as norm
    from pytest_saecheck.engine.backends import cut_for
    from pytest_saecheck.engine.member import Member, Variant, hook_z_reshaping_off
    from pytest_saecheck.engine.splice import prepass, splice
    from pytest_saecheck.policy import TokenPolicy

    task = as_task(task)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    cut = cut_for(model)
    cut.check()
    items = tokenized(cut, task)
    member = Member(task.name, sae, cut, norm.as_normalisation(activation_scaler))
    policy = TokenPolicy().resolved_for(cut)
    sites = member.capture_sites(cut)
    order = sorted(range(len(items)), key=lambda index: len(items[index][0]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    pad = getattr(cut.tokenizer, "pad_token_id", None) or 0

    def padded(indices: list[int]) -> tuple[Any, Any, Any]:
        """Right-padded tokens, the positions kept for the splice (the token policy's, real tokens only) and each
        prompt's last position: a causal model's logits at a prompt's positions do not depend on the padding
        after it."""
        width = max(len(items[i][0]) for i in indices)
        rows = [items[i][0] + [pad] * (width - len(items[i][0])) for i in indices]
        lengths = torch.tensor([len(items[i][0]) for i in indices], device=cut.device)
        tokens = torch.tensor(rows, dtype=torch.long, device=cut.device)
        real = torch.arange(width, device=cut.device)[None, :] < lengths[:, None]
        return tokens, policy.kept_mask(tokens) & real, lengths - 1

    notes: list[str] = []
    correct = {"orig": np.zeros(len(items)), "sae": np.zeros(len(items))}
    diff = {"orig": np.zeros(len(items)), "sae": np.zeros(len(items))}
    with torch.inference_mode(), hook_z_reshaping_off([sae]), cut.prepared(sites):
        if norm.needs_estimate(member.info.normalize_activations, member.given):
            found = prepass(cut, [member], [], (padded(indices)[:2] for indices in batches))
            member.normalisation = norm.estimated(member.info.d_in, found.input_norm[member.name])
            notes.append(
                f"activation scaling factor estimated on the task's prompts: {member.normalisation.scaling_factor:.6g}"
            )
        for indices in batches:
            tokens, kept, last = padded(indices)
            run = cut.capture(tokens, sites)
            (final_sae,) = splice(cut, member, run, kept, [Variant.SAE])
            for variant, resid in (("orig", run.take_final()), ("sae", final_sae)):
                at_last = resid[torch.arange(len(indices), device=resid.device), last.to(resid.device)]
                logits = cut.logits(at_last[:, None]).double()[:, 0]
                for row, index in enumerate(indices):
                    _, right, wrong = items[index]
                    if wrong:
                        best_wrong = logits[row, wrong].max()
                    else:
                        others = logits[row].clone()
                        others[right] = -math.inf
                        best_wrong = others.max()
                    margin = float(logits[row, right] - best_wrong)
                    diff[variant][index] = margin
                    correct[variant][index] = 1.0 if margin > 0 else 0.0
    per_prompt = {
        "correct_orig": correct["orig"],
        "correct_sae": correct["sae"],
        "diff_orig": diff["orig"],
        "diff_sae": diff["sae"],
    }
    return TaskResult(task.name, task.kind, task.source, per_prompt, notes)


# ------------------------------------------------------------------------------------------------------------
# the assertion


def _model_and_sae(check: Any) -> tuple[Any, Any, str, Any]:
    """(model, SAE, label, activation_scaler) from the saecheck fixture or a ``(model, sae)`` pair."""
    if is_fixture(check):
        if check.joint:
            raise ConfigError(
                'assert_task_preserved splices one SAE; this test splices several (splice="joint"): test each SAE '
                "on its own"
            )
        # the SAE's shared evaluation (cached): the report files this test's task gate under it, beside the
        # evaluation's other tests with the same settings
        check.evaluation  # noqa: B018
        return check.model, check.sae, check.label, check.activation_scaler
    if isinstance(check, (tuple, list)) and len(check) == 2:
        model, sae = check
        from pytest_saecheck.dictionaries import describe

        return model, sae, f"SAE at {describe(sae).hook_name}", None
    raise ConfigError(
        f"assert_task_preserved expects the saecheck fixture or a (model, sae) pair, got {type(check).__name__}"
    )


def assert_task_preserved(
    check: Any,
    task: Task | str | os.PathLike[str],
    *,
    max_accuracy_drop: float,
    max_logit_diff_drop: float | None = None,
    confidence: float | None = None,
    batch_size: int = 32,
) -> None:
    """Assert that splicing the SAE in costs the model at most ``max_accuracy_drop`` accuracy on ``task``.

    ``check`` is the ``saecheck`` fixture (or a ``(model, sae)`` pair); ``task`` a :class:`Task` or the path of a
    JSONL task file (module docstring). ``max_accuracy_drop`` is a share (0.05 = five points);
    ``max_logit_diff_drop`` optionally bounds the drop of the mean logit difference too (logit units). Without
    ``confidence`` the point drops are gated; with it (e.g. 0.95), the upper bounds of their paired bootstrap
    intervals over prompts. NaN never passes. The measurement is recorded for the report (``saes[i].tasks``).

    Raises :class:`ConfigError` (bad thresholds, fewer than 2 prompts with ``confidence``, a joint splice) and
    :class:`LoadError` (a malformed task file, an answer that is not one token); fails with ``AssertionError``.
    """
    __tracebackhide__ = True
    high = finite_number("max_accuracy_drop", max_accuracy_drop)
    if not -1.0 <= high <= 1.0:
        raise ConfigError(
            f"assert_task_preserved: max_accuracy_drop is a share in [-1, 1] (0.05 = five points), got {high}"
        )
    logit_high = (
        None if max_logit_diff_drop is None else finite_number("max_logit_diff_drop", max_logit_diff_drop)
    )
    level = None if confidence is None else confidence_level("assert_task_preserved", confidence)
    task = as_task(task)
    if level is not None and len(task.items) < MIN_PROMPTS_FOR_INTERVAL:
        raise ConfigError(
            f"assert_task_preserved: confidence= needs an interval over prompts, and task {task.name!r} has "
            f"{len(task.items)} prompt; give at least {MIN_PROMPTS_FOR_INTERVAL} or gate the point drop"
        )
    model, sae, label, scaler = _model_and_sae(check)
    result = measure_task(model, sae, task, activation_scaler=scaler, batch_size=batch_size)
    chance = chance_accuracy(task, int(model.cfg.d_vocab))
    del model, sae, check
    shown_level = level if level is not None else INTERVAL_LEVEL
    values = result.values()
    intervals = result.intervals(shown_level)
    failures = []
    undefined = at_chance(values["accuracy_orig"], chance)
    if undefined is not None:
        failures.append(f"task {task.name!r}: accuracy_drop is undefined: {undefined}")
    for metric, bound, unit in (
        ("accuracy_drop", high, ""),
        ("logit_diff_drop", logit_high, " logits"),
    ):
        if bound is None or undefined is not None:
            continue
        gated = values[metric] if level is None else intervals.get(metric, (math.nan, math.nan))[1]
        what = metric if level is None else f"the upper bound of the {level:.0%} interval of {metric}"
        if not gated <= bound:  # NaN fails
            failures.append(f"{what} = {messages.fmt(gated)}{unit} is above {messages.fmt(bound)}{unit}")
    if failures:
        failures[0] = f"task {task.name!r}: {failures[0]}"
    record = result.to_dict(shown_level)
    conclude(
        CheckOutcome(
            assertion="assert_task_preserved",
            label=label,
            failures=tuple(failures),
            details=tuple(_details(result, values, intervals, shown_level)) if failures else (),
            metric="accuracy_drop",
            value=values["accuracy_drop"],
            fields={
                "interval": list(intervals["accuracy_drop"]) if "accuracy_drop" in intervals else None,
                "interval_level": shown_level,
                "confidence": level,
                "max_value": high,
                "max_logit_diff_drop": logit_high,
                "gate": "point estimate" if level is None else "interval bound",
                "task": {**record, "chance_accuracy": chance, "undefined": undefined},
            },
        )
    )


def chance_accuracy(task: Task, d_vocab: int) -> float:
    """The accuracy of guessing: the mean over prompts of 1 / (1 + number of wrong candidates) for multiple
    choice, 1 / d_vocab for next-token prompts (every token a candidate)."""
    if task.kind == MULTIPLE_CHOICE:
        return sum(1.0 / (1 + len(item.wrong)) for item in task.items) / max(1, len(task.items))
    return 1.0 / max(1, d_vocab)


def at_chance(accuracy_orig: float, chance: float) -> str | None:
    """Why a task gate is undefined (the original model does no better than guessing), or None.

    A drop from a model that cannot do the task measures nothing about the SAE: accuracy 0 → 0 would pass any
    gate. Undefined when the original model's accuracy is at or below the chance accuracy (or NaN).
    """
    if accuracy_orig > chance:
        return None
    return (
        f"the original model does no better than chance on this task (accuracy {messages.fmt(accuracy_orig)}, "
        f"chance {messages.fmt(chance)}), so a drop measures nothing about the SAE; use a task the model can do"
    )


def _details(
    result: TaskResult, values: Mapping[str, float], intervals: Mapping[str, Sequence[float]], level: float
) -> list[str]:
    rows = [("", "original", "spliced", "drop", f"{level:.0%} interval of the drop")]
    for name, key in (("accuracy", "accuracy"), ("logit difference", "logit_diff")):
        rows.append(
            (
                name,
                messages.fmt(values[f"{key}_orig"]),
                messages.fmt(values[f"{key}_sae"]),
                messages.fmt(values[f"{key}_drop"]),
                messages.fmt_interval(intervals.get(f"{key}_drop")),
            )
        )
    kind = "multiple choice" if result.kind == MULTIPLE_CHOICE else "next token"
    lines = messages.table(rows)
    lines.append(
        f"{messages.INDENT}task: {result.name} ({kind}), {result.n_prompts} prompts from {result.source or '-'}"
    )
    lines.append(
        f"{messages.INDENT}logit difference = logit(right) − max logit(wrong"
        + (" candidates)" if result.kind == MULTIPLE_CHOICE else " = every other token)")
        + "; accuracy = share of prompts where it is > 0"
    )
    lines.extend(f"{messages.INDENT}note: {note}" for note in result.notes)
    return lines


__all__ = [
    "MULTIPLE_CHOICE",
    "NEXT_TOKEN",
    "Task",
    "TaskItem",
    "TaskResult",
    "assert_task_preserved",
    "load_task",
    "measure_task",
    "parse_task",
]
