"""What an evaluation records: the one definition of its fields.

Each :class:`RecordedField` names one fact of an evaluation once: its key, what it means (with its unit), the JSON
Schema of its value in the result document, and where the document's SAE entry holds it. Everything else is
derived from :data:`EVALUATION_FIELDS`:

- ``Evaluation.to_dict()`` (:mod:`pytest_saecheck.engine.result`) writes the fields whose ``source`` is
  ``"engine"``, read from the attribute (or zero-argument method) ``attribute`` of the evaluation;
- :class:`pytest_saecheck.records.EvaluationRecord` carries exactly these fields (the fixture adds the ``"run"``
  ones: specs as resolved, settings, intervals);
- the SAE entry of the JSON document (:func:`pytest_saecheck.report.collect.sae_entry`) puts each field at
  ``place``, coerced to its ``schema``;
- the document's JSON Schema (:data:`pytest_saecheck.report.schema.JSON_SCHEMA`) holds ``schema`` with
  ``description`` at ``place``, and ``report/SCHEMA.md`` is generated from that schema.

Adding a fact to an evaluation is one entry here, the attribute the engine fills, and its display. Imports no
torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# JSON Schema fragments of the document's values (JSON Schema 2020-12).
NUMBER: dict[str, Any] = {"type": ["number", "null"]}
INTEGER: dict[str, Any] = {"type": ["integer", "null"]}
STRING: dict[str, Any] = {"type": ["string", "null"]}
OBJECT: dict[str, Any] = {"type": ["object", "null"]}
STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
SERIES: dict[str, Any] = {"type": ["array", "null"], "items": NUMBER}
INTERVAL: dict[str, Any] = {"type": ["array", "null"], "items": NUMBER, "minItems": 2, "maxItems": 2}
NAMED_NUMBERS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "number"}}
NAMED_INTERVALS: dict[str, Any] = {"type": "object", "additionalProperties": INTERVAL}
NAMED_STRINGS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}

Source = Literal["engine", "run"]


@dataclass(frozen=True)
class RecordedField:
    """One recorded fact of an evaluation.

    ``name`` is its key in ``Evaluation.to_dict()`` and in the evaluation record; ``description`` what it means
    (shown in the JSON Schema and SCHEMA.md), ``unit`` its unit where it has one; ``schema`` the JSON Schema of
    its value in the document's SAE entry; ``place`` the path of that value in the entry (``()``: the key
    ``name`` at the top; ``None``: recorded but not in the document); ``source`` who supplies it (``"engine"``:
    the evaluation, from its attribute or zero-argument method ``attribute``, default ``name``; ``"run"``: the
    fixture that records it).
    """

    name: str
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: OBJECT)
    place: tuple[str, ...] | None = ()
    source: Source = "engine"
    unit: str | None = None
    attribute: str | None = None

    @property
    def path(self) -> tuple[str, ...] | None:
        """Where the document's SAE entry holds the value (``None``: nowhere)."""
        if self.place is None:
            return None
        return self.place or (self.name,)

    def documented(self) -> dict[str, Any]:
        """``schema`` with the description (and unit) for the document's JSON Schema."""
        unit = f" ({self.unit})" if self.unit else ""
        return {**self.schema, "description": self.description + unit}


def _run(name: str, description: str, **kwargs: Any) -> RecordedField:
    return RecordedField(name, description, source="run", **kwargs)


#: Every recorded field of an evaluation, in the record's order.
EVALUATION_FIELDS: tuple[RecordedField, ...] = (
    _run("resolved_sae", "the SAE spec as resolved (absolute paths)", place=None),
    _run(
        "resolved_model",
        "the model spec as resolved (the SAE's model)",
        schema=STRING,
        place=("model", "resolved"),
    ),
    _run(
        "resolved_tokens",
        "the token source as loaded (the SAE's dataset when none is given)",
        schema=STRING,
        place=("tokens", "source"),
    ),
    _run(
        "model_loading",
        "`{loader, kwargs}`: the function that made the model and the keyword arguments it was given (weight "
        "processing switches, dtype), or null when the model was not loaded in this run",
        schema={
            "type": ["object", "null"],
            "properties": {"loader": {"type": "string"}, "kwargs": {"type": "object"}},
        },
        place=("model", "loading"),
    ),
    _run("settings", "all resolved saecheck settings", place=("settings",)),
    RecordedField(
        "metrics",
        "every metric the engine computed (names: see the metric reference, docs/reference/metrics.md), in "
        "each metric's own unit",
        schema=NAMED_NUMBERS,
    ),
    RecordedField("undefined", "metrics that are undefined on these tokens, and why", schema=NAMED_STRINGS),
    _run(
        "intervals",
        "`{name: [low, high]}`: bootstrap interval over sequences, paired across variants, at `interval_level`",
        schema=NAMED_INTERVALS,
    ),
    _run("interval_level", "the level of `intervals`, e.g. `0.95`", schema=NUMBER),
    RecordedField(
        "n_tokens", "positions scored", schema=INTEGER, place=("tokens", "n_tokens"), unit="tokens"
    ),
    RecordedField("n_sequences", "sequences evaluated", schema=INTEGER, place=("tokens", "n_sequences")),
    RecordedField(
        "seq_len", "tokens per sequence", schema=INTEGER, place=("tokens", "seq_len"), unit="tokens"
    ),
    RecordedField("hook_name", "the hook the SAE reads", schema=STRING, place=("hook", "name")),
    RecordedField(
        "hook_head_index", "the attention head it reads, if one", schema=INTEGER, place=("hook", "head_index")
    ),
    RecordedField(
        "hook_name_out",
        "the hook it writes (a transcoder's `hook_name_out`)",
        schema=STRING,
        place=("hook", "name_out"),
    ),
    RecordedField(
        "dictionary",
        "`{kind, architecture, hook_name, hook_name_out, hook_head_index, d_in, d_out, normalize_activations, "
        "context_size, points}`, where `points` is `{backend, read, write}`, each `{point, layer, tensor, source, "
        "reason}`: the point used on the model and why (the dictionary's `hf_hook_name` wins where its records "
        "disagree); with `max_cosine` (SAEBench's weight-based cosine statistics) when the run writes "
        'SAEBench-format results; for a joint evaluation `{kind: "joint", members}`',
    ),
    RecordedField(
        "normalisation",
        "`{scaling_factor, source, whitening}`: the input scaling applied around the SAE and where it came from",
    ),
    RecordedField(
        "model_hooks",
        "hooks found on the model before the evaluation (they ran in every variant)",
        schema=STRINGS,
    ),
    RecordedField(
        "warnings",
        "what the preflight found (scale mismatch, an estimated normalisation, a skewed interval, hooks)",
        schema=STRINGS,
    ),
    RecordedField("members", "joint evaluations: each SAE's reconstruction metrics inside the joint model"),
    RecordedField(
        "compounding",
        "joint evaluations: `{delta_ce_joint, delta_ce_isolated_sum, excess, excess_interval, ratio}` (`ratio` "
        "null unless the isolated sum is positive)",
    ),
    RecordedField(
        "token_policy",
        "`exclude_bos`, `exclude_token_ids`, `pad_token_id`; `chat_template` (`template_token_ids`, "
        "`template_tokens`, `template_positions`, `kept_positions`) when a chat template put template tokens in "
        "the evaluated tokens",
    ),
    RecordedField(
        "latent_density",
        "each latent's firing density (the document holds its histogram)",
        place=None,
    ),
    _run(
        "latent_density_histogram",
        "`log10_edges` (quarter decades up to 10⁰), `counts` per bin, `dead` (never fired), `n_latents`, "
        "`saebench` (SAEBench's density statistics: `frac_alive`, `freq_over_{1,10}_percent`, "
        "`normalized_freq_over_{1,10}_percent`)",
        schema={
            "type": ["object", "null"],
            "required": ["log10_edges", "counts", "dead", "n_latents"],
            "properties": {
                "log10_edges": {"type": "array", "items": {"type": "number"}},
                "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "dead": {"type": "integer", "minimum": 0},
                "n_latents": {"type": "integer", "minimum": 0},
            },
        },
    ),
    RecordedField(
        "delta_ce_by_position",
        "ΔCE per token position; null where excluded",
        schema=SERIES,
        unit="nats/token",
    ),
    RecordedField(
        "delta_ce_by_position_interval",
        "the paired bootstrap interval (over sequences, at `interval_level`) of `delta_ce_by_position` at each "
        "position; null where no prediction is evaluated",
        schema={"type": ["array", "null"], "items": INTERVAL},
        unit="nats/token",
    ),
    RecordedField(
        "kl_by_position", "KL per token position; null where excluded", schema=SERIES, unit="nats/token"
    ),
    RecordedField(
        "scaling_law",
        "[E, γ] of the law used for `compute_fraction`, or null",
        schema=SERIES,
        attribute="scaling_law_parameters",
    ),
    RecordedField(
        "compute_law",
        "the law behind `compute_fraction`: `name`, `spec`, `form`, `irreducible`, `gamma`, `parameters`, "
        "`source`, `corpus`, `origin` (`preset`, `given`, `fit`), `fitted` (false for a published preset: not "
        "fitted for this model), `default`, `intervals` (a fit's bootstrap intervals), `n_points` and `points` "
        "(a fit's `[compute, loss]` points: with `parameters.A` they let the HTML report draw the fitted curve), "
        "`path` (a fit file), `label`, `by_preset` (`compute_fraction` under each published preset; null where "
        "undefined), `band` ([min, max] of those), `above_one` (the splice lowered the loss), `note`",
    ),
    RecordedField("batch_size", "sequences per forward pass", schema=INTEGER, place=("batch_size",)),
    RecordedField("model_dtype", "the dtype of the model's forward pass", schema=STRING, place=("dtype",)),
    RecordedField("sae_dtype", "the dtype the SAE computed in", schema=STRING),
    RecordedField("backend", "the model backend (`transformer_lens` or `hf`)", schema=STRING),
    RecordedField(
        "duration_s",
        "how long the evaluation took *(timing)*",
        schema=NUMBER,
        place=("evaluation_duration_s",),
        unit="s",
    ),
    _run("baseline_document", "the SAE's regression baseline, when the run updates baselines", place=None),
    RecordedField(
        "groups",
        'the metrics by token group ("where it hurts"), in the grouping\'s order: `{name, n_tokens, '
        "n_predictions, metrics, intervals, interval_level, undefined}`; `n_tokens` counts the group's evaluated "
        "positions (reconstruction, KL), `n_predictions` the predictions made there (CE); `metrics` holds "
        "`ce_orig`, `ce_sae`, `delta_ce`, `kl_sae` and, for a single SAE, `explained_variance`, `cosine_sim`, "
        "`relative_error_norm`, `mse`, `l0`; null without a grouping",
        schema={
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["name", "n_tokens", "n_predictions", "metrics", "intervals", "undefined"],
                "properties": {
                    "name": {"type": "string"},
                    "n_tokens": INTEGER,
                    "n_predictions": INTEGER,
                    "metrics": NAMED_NUMBERS,
                    "intervals": NAMED_INTERVALS,
                    "interval_level": NUMBER,
                    "undefined": NAMED_STRINGS,
                },
            },
        },
    ),
    RecordedField(
        "sequential",
        "a sequential run: `looks` and `ceiling` (sequences), `interim_share`, the `look` reached, "
        "`n_sequences`, `sequences_evaluated`, `tokens_evaluated`, and `gates` (each decided gate's look and "
        "rule); null otherwise",
        schema={
            "type": ["object", "null"],
            "properties": {
                "looks": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "ceiling": INTEGER,
                "look": INTEGER,
                "sequences_evaluated": INTEGER,
                "tokens_evaluated": INTEGER,
                "gates": {"type": "array", "items": {"type": "object"}},
            },
        },
    ),
)

#: The recorded fields by name.
BY_NAME: dict[str, RecordedField] = {recorded.name: recorded for recorded in EVALUATION_FIELDS}
