"""An evaluation's fields have one definition (``pytest_saecheck.evaluation_fields``): the engine's result, the
evaluation record, the document's SAE entry, its JSON Schema and SCHEMA.md all follow it, and a result is built
once and never changed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_saecheck.evaluation_fields import BY_NAME, EVALUATION_FIELDS
from pytest_saecheck.records import EvaluationRecord, from_plain
from pytest_saecheck.report.collect import sae_entry
from pytest_saecheck.report.schema import SAE_SCHEMA, SchemaError, validate

torch = pytest.importorskip("torch")

from pytest_saecheck.engine.result import Evaluation  # noqa: E402
from pytest_saecheck.policy import TokenPolicy  # noqa: E402

SCHEMA_MD = Path(__file__).resolve().parent.parent / "pytest_saecheck" / "report" / "SCHEMA.md"


def _evaluation(**overrides: Any) -> Evaluation:
    """A small evaluation built directly (two sequences of made-up sums; no model runs)."""
    rng = np.random.default_rng(0)
    values: dict[str, Any] = {
        "metrics": {"delta_ce": 0.25, "explained_variance": 0.9},
        "undefined": {"ce_loss_score": "zero denominator"},
        "n_tokens": 10,
        "n_sequences": 2,
        "seq_len": 6,
        "hook_name": "blocks.0.hook_resid_pre",
        "hook_head_index": None,
        "token_policy": TokenPolicy(),
        "latent_density": [0.0, 0.5],
        "delta_ce_by_position": [None, 0.1],
        "kl_by_position": [None, 0.2],
        "per_sequence": {"n_rec": rng.integers(1, 5, size=2).astype(float)},
    }
    return Evaluation(**{**values, **overrides})


def _sample(recorded: Any) -> Any:
    """A plain value that fits the field's schema (its document form is then the value itself)."""
    types = recorded.schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "array" in types:
        return [] if recorded.schema.get("maxItems") != 2 else [1.0, 2.0]
    if "integer" in types:
        return 7
    if "number" in types:
        return 0.5
    if "string" in types:
        return f"value of {recorded.name}"
    return {"from": recorded.name}


def test_every_engine_field_is_an_attribute_of_the_result_and_nothing_else_is_recorded() -> None:
    attributes = {field.name for field in dataclasses.fields(Evaluation)} | set(dir(Evaluation))
    engine = [recorded for recorded in EVALUATION_FIELDS if recorded.source == "engine"]
    assert all((recorded.attribute or recorded.name) in attributes for recorded in engine)
    assert list(_evaluation().to_dict()) == [recorded.name for recorded in engine]


def test_the_result_is_frozen_and_a_later_stage_copies_it() -> None:
    evaluation = _evaluation()
    with pytest.raises(dataclasses.FrozenInstanceError):
        evaluation.warnings = ["changed"]  # type: ignore[misc]
    before = evaluation.to_dict()
    finished = evaluation.finished(["blocks.0.hook_resid_pre"], 1.5)
    assert evaluation.to_dict() == before  # a later stage adds facts to a copy
    assert finished.model_hooks == ["blocks.0.hook_resid_pre"] and finished.duration_s == 1.5
    assert finished.warnings[0].startswith("the model has hooks attached (blocks.0.hook_resid_pre)")
    assert evaluation.finished([], 1.0).warnings == evaluation.warnings


def test_to_dict_holds_the_recorded_values_in_plain_types() -> None:
    evaluation = _evaluation(duration_s=2.0, model_hooks=["h"])
    data = evaluation.to_dict()
    assert data["token_policy"] == TokenPolicy().to_dict()
    assert data["scaling_law"] is None and data["compute_law"] is None
    assert data["duration_s"] == 2.0 and data["model_hooks"] == ["h"]
    assert data["delta_ce_by_position_interval"] == evaluation.delta_ce_by_position_interval()


def test_the_record_carries_exactly_the_defined_fields() -> None:
    plain = {
        "kind": "evaluation",
        "label": "x",
        **{name: _sample(BY_NAME[name]) for name in BY_NAME},
        "new": 1,
    }
    record = from_plain(plain)
    assert isinstance(record, EvaluationRecord)
    assert set(record.values) == set(BY_NAME)
    assert record.extra == {"new": 1}  # a field this version does not know is kept aside
    assert record.to_plain() == {**plain, **record.subject()}
    assert EvaluationRecord().metrics is None  # a field the record lacks reads as None
    with pytest.raises(AttributeError, match="no field 'metricz'"):
        _ = record.metricz


#: Fields whose entry value is more than their own value coerced (report.collect._composed), or whose sample above
#: is no value of theirs (an object for the intervals).
COMPOSED = (
    "metrics",
    "undefined",
    "intervals",
    "interval_level",
    "settings",
    "latent_density_histogram",
    "groups",
)
COMPOSED += ("sequential",)


def test_every_recorded_field_lands_at_its_place_in_the_entry_and_its_schema() -> None:
    plain = {"kind": "evaluation", "label": "x", **{name: _sample(BY_NAME[name]) for name in BY_NAME}}
    record = from_plain(plain)
    assert isinstance(record, EvaluationRecord)
    entry = sae_entry({"label": "x"}, record)
    for recorded in EVALUATION_FIELDS:
        if recorded.path is None:
            continue
        value, schema = entry, SAE_SCHEMA
        for key in recorded.path:
            value, schema = value[key], schema["properties"][key]
        assert schema["description"].startswith(recorded.description), recorded.name
        if recorded.name not in COMPOSED:
            assert value == _sample(recorded), recorded.name


def test_validation_is_json_schema_with_paths() -> None:
    from main_job import reference

    _, document, _, _ = reference()
    validate(document)
    broken = dict(document, saes=[dict(document["saes"][0], metrics={"delta_ce": math.inf})])
    with pytest.raises(SchemaError, match=r"\$\.saes\[0\]\.metrics\.delta_ce"):
        validate(broken)
    broken = dict(document, saes=[dict(document["saes"][0], hook={"name": 3})])
    with pytest.raises(SchemaError, match=r"\$\.saes\[0\]\.hook\.name: 3 is not of type"):
        validate(broken)


def test_schema_md_shows_the_schema_of_today() -> None:
    from pytest_saecheck.plugin.docs import with_tables

    text = SCHEMA_MD.read_text(encoding="utf-8")
    assert "<!-- sae-table:" in text
    assert with_tables(text) == text, (
        "run: python -m pytest_saecheck.plugin.docs pytest_saecheck/report/SCHEMA.md"
    )
