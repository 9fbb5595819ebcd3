"""Scaling laws for compute_fraction: presets with provenance, the formula, fits and fit files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pytest_saecheck import fit_scaling_law, load_scaling_law
from pytest_saecheck.assertions import assert_ce_recovery
from pytest_saecheck.engine.finish import under_law
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.metrics import compute_fraction, compute_fraction_by_preset
from pytest_saecheck.plugin.settings import _scaling_law
from pytest_saecheck.scaling import DEFAULT_LAW, PRESETS, ScalingLaw, as_scaling_law, given_law

MARK = 'pytest.mark.saecheck(model="tiny", sae="sae_random", tokens="tokens.npy", n_tokens=160)'


def _frontier_loss(law, compute: float) -> float:
    """Compute-optimal loss of a Chinchilla-form law at compute C = 6 N D, by minimising over N numerically."""
    p = dict(law.parameters)
    log_n = np.linspace(math.log(compute / 6) / 2 - 15, math.log(compute / 6) / 2 + 15, 200_001)
    n = np.exp(log_n)
    d = compute / (6 * n)
    return float(np.min(p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]))


@pytest.mark.parametrize("name", ["chinchilla", "epoch"])
def test_chinchilla_form_presets_reproduce_their_frontier_gamma(name):
    law = PRESETS[name]
    p = dict(law.parameters)
    assert law.gamma == pytest.approx(p["alpha"] * p["beta"] / (p["alpha"] + p["beta"]), rel=1e-12)
    computes = np.logspace(20, 26, 7)
    reducible = [_frontier_loss(law, c) - law.irreducible for c in computes]
    slope = np.polyfit(np.log(computes), np.log(reducible), 1)[0]
    assert -slope == pytest.approx(law.gamma, rel=1e-3)
    # and compute_fraction reads the frontier back: the loss at a tenth of the compute is a fraction 0.1
    for c in (1e21, 1e24):
        assert float(
            compute_fraction(_frontier_loss(law, c), _frontier_loss(law, c / 10), law)
        ) == pytest.approx(0.1, rel=1e-3)


def test_presets_match_their_published_numbers():
    chinchilla, epoch, kaplan = PRESETS["chinchilla"], PRESETS["epoch"], PRESETS["kaplan"]
    assert chinchilla.gamma == pytest.approx(0.1535, abs=1e-4)
    # Hoffmann et al. 2022, approach 3: N_opt ∝ C^a with a = beta/(alpha+beta), published as 0.46 (from unrounded fits)
    p = dict(chinchilla.parameters)
    assert p["beta"] / (p["alpha"] + p["beta"]) == pytest.approx(0.46, abs=0.01)
    assert epoch.gamma == pytest.approx(0.3478 * 0.3658 / (0.3478 + 0.3658), rel=1e-12)
    assert (kaplan.irreducible, kaplan.gamma) == (0.0, 0.050)
    for law in PRESETS.values():
        assert law.origin == "preset" and not law.fitted
        assert "20" in law.source and law.corpus


def test_kaplan_compute_fraction_is_the_loss_ratio_power():
    """Kaplan: L(C) = (C_c/C)^0.050, so L(fC)/L(C) = f^-0.050 and f = (L_sae/L_orig)^(-1/0.050)."""
    law = PRESETS["kaplan"]
    c_c = dict(law.parameters)["C_c_PF_days"]
    for compute, fraction in ((1.0, 0.5), (30.0, 0.01)):
        l_orig, l_sae = (c_c / compute) ** 0.050, (c_c / (fraction * compute)) ** 0.050
        assert float(compute_fraction(l_orig, l_sae, law)) == pytest.approx(fraction, rel=1e-9)
    assert float(compute_fraction(3.0, 3.3, law)) == pytest.approx((3.3 / 3.0) ** -20, rel=1e-12)


@pytest.mark.parametrize("law", [*PRESETS.values(), given_law(0.5, 0.2)], ids=lambda law: law.name)
def test_compute_fraction_is_one_at_no_loss_and_falls_as_the_loss_grows(law):
    ce_orig = 3.2
    assert float(compute_fraction(ce_orig, ce_orig, law)) == pytest.approx(1.0, abs=1e-12)
    values = compute_fraction(ce_orig, np.array([3.2, 3.21, 3.3, 3.6, 4.5]), law)
    assert np.all(np.diff(values) < 0)
    assert np.all((values > 0) & (values <= 1))
    assert float(compute_fraction(ce_orig, 3.1, law)) > 1  # the splice lowered the loss: not a fraction


def test_compute_fraction_is_undefined_below_the_irreducible_loss():
    assert math.isnan(float(compute_fraction(1.6, 1.7, PRESETS["chinchilla"])))
    by_preset = compute_fraction_by_preset(1.9, 1.95)
    assert (
        by_preset["chinchilla"] is not None and by_preset["epoch"] is None and by_preset["kaplan"] is not None
    )


def test_an_unfitted_law_near_its_floor_gives_no_compute_fraction_but_the_reason():
    """A model whose loss (1.76) sits 0.07 nats above Chinchilla's E = 1.69, an SAE adding 0.8% to it: the presets
    said 0.31 (chinchilla) against 0.85 (kaplan), E alone deciding the number. An unfitted law this close to its
    floor gives none; a law the user fitted or gave for the model is trusted there."""
    from pytest_saecheck.scaling import FLOOR_MARGIN

    ce_orig, ce_sae = 1.76, 1.76 * 1.008
    assert FLOOR_MARGIN == pytest.approx(1.8172 - 1.69)
    reason = DEFAULT_LAW.undefined_reason(ce_orig, ce_sae)
    assert reason is not None and "E=1.69" in reason and "not fitted for this model" in reason
    assert "fit_scaling_law" in reason
    by_preset = compute_fraction_by_preset(ce_orig, ce_sae)
    assert by_preset["chinchilla"] is None and by_preset["epoch"] is None
    assert by_preset["kaplan"] == pytest.approx(1.008**-20, rel=1e-9)
    assert given_law(1.69, DEFAULT_LAW.gamma).undefined_reason(ce_orig, ce_sae) is None
    assert DEFAULT_LAW.undefined_reason(3.0, 3.05) is None  # far from the floor the preset gives its number
    assert DEFAULT_LAW.undefined_reason(1.6, 1.7) is not None and "is not below" in str(
        DEFAULT_LAW.undefined_reason(1.6, 1.7)
    )


def _tiny_evaluation(scaling_law):
    from factories import make_engine_model, make_tokens, random_sae

    from pytest_saecheck import evaluate

    return evaluate(
        make_engine_model(), random_sae(), make_tokens(n=16), scaling_law=scaling_law, progress=False
    )


def test_the_engine_leaves_compute_fraction_undefined_near_an_unfitted_floor():
    import dataclasses

    from pytest_saecheck.scaling import FLOOR_MARGIN

    base = _tiny_evaluation(None)
    lowest = min(base.metrics["ce_orig"], base.metrics["ce_sae"])
    floor = lowest - FLOOR_MARGIN / 2  # the default law moved up to just under this model's loss
    near = dataclasses.replace(DEFAULT_LAW, irreducible=floor)
    chosen = given_law(floor, DEFAULT_LAW.gamma)
    for result in (_tiny_evaluation(near), under_law(base, near)):
        assert "compute_fraction" not in result.metrics
        assert "not fitted for this model" in result.undefined["compute_fraction"]
    for result in (_tiny_evaluation(chosen), under_law(base, chosen)):
        expected = float(compute_fraction(base.metrics["ce_orig"], base.metrics["ce_sae"], chosen))
        assert result.metrics["compute_fraction"] == pytest.approx(expected, rel=1e-12)


def test_compute_fraction_warns_only_when_its_interval_is_asked_for():
    """A law whose E sits just under the losses leaves compute_fraction undefined in some resamples, and the
    splice may lower the loss (a value above 1): neither is warned about while nobody reads compute_fraction's
    interval; gating on another metric's interval resamples that metric alone."""
    import warnings

    from pytest_saecheck.errors import SAECheckWarning

    base = _tiny_evaluation(None)
    lowest = min(base.metrics["ce_orig"], base.metrics["ce_sae"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _tiny_evaluation(given_law(lowest - 1e-3, 0.2))
        delta = result.confidence_interval("delta_ce")
        every = result.confidence_intervals()
    assert not [str(w.message) for w in caught if issubclass(w.category, SAECheckWarning)]
    assert every["delta_ce"] == delta and math.isnan(every["compute_fraction"][0])
    assert not any("compute_fraction" in w for w in result.warnings)
    with pytest.warns(SAECheckWarning, match="interval of compute_fraction is undefined"):
        result.confidence_interval("compute_fraction")


def test_the_fit_recovers_known_parameters_from_synthetic_points():
    rng = np.random.default_rng(0)
    compute = np.repeat(np.logspace(17, 23, 13), 2)
    truth = {"E": 1.9, "A": 850.0, "gamma": 0.17}
    clean = truth["E"] + truth["A"] * compute ** -truth["gamma"]
    loss = clean * (1 + 1e-4 * rng.standard_normal(compute.size))
    law = fit_scaling_law(compute, loss, n_bootstrap=60, seed=1)
    fitted = dict(law.parameters)
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, rel=0.01), name
    assert (law.irreducible, law.gamma) == (fitted["E"], fitted["gamma"])
    assert law.origin == "fit" and law.fitted
    for name, low, high in law.intervals:
        assert low <= fitted[name] <= high
        assert low < truth[name] * 1.05 and high > truth[name] * 0.95
    assert len(law.points) == compute.size


def test_the_fit_is_robust_to_an_outlier():
    compute = np.logspace(18, 23, 11)
    loss = 2.0 + 400.0 * compute**-0.2
    loss[4] += 0.5  # one broken model
    law = fit_scaling_law(compute, loss, n_bootstrap=0)
    assert law.irreducible == pytest.approx(2.0, rel=0.01)
    assert law.gamma == pytest.approx(0.2, rel=0.05)
    # a quadratic loss (a Huber delta far above every residual) is dragged away by the one outlier
    squares = fit_scaling_law(compute, loss, n_bootstrap=0, huber_delta=100.0)
    assert abs(squares.gamma - 0.2) > 10 * abs(law.gamma - 0.2)


@pytest.mark.parametrize(
    ("compute", "loss", "match"),
    [
        ([1e18, 1e19, 1e20], [3.0, 2.8, 2.7], "at least 4 models"),
        ([1e18, 1e18, 1e19, 1e19], [3.0, 3.0, 2.8, 2.8], "3 or more compute budgets"),
        ([1e18, 1e19, 1e20, -1.0], [3.0, 2.8, 2.7, 2.6], "finite and positive"),
        ([1e18, 1e19, 1e20], [3.0, 2.8], "one value per model"),
    ],
)
def test_the_fit_refuses_bad_points(compute, loss, match):
    with pytest.raises(ConfigError, match=match):
        fit_scaling_law(compute, loss)


def test_a_fit_file_round_trips_through_the_setting(tmp_path):
    compute = np.logspace(18, 22, 6)
    law = fit_scaling_law(compute, 1.5 + 300 * compute**-0.15, n_bootstrap=20, corpus="my corpus")
    path = law.save(tmp_path / "law.json")
    loaded = _scaling_law("scaling_law", str(path))
    assert loaded is not None
    assert (loaded.irreducible, loaded.gamma, loaded.origin, loaded.corpus) == (
        law.irreducible,
        law.gamma,
        "fit",
        "my corpus",
    )
    assert loaded.parameters == law.parameters and loaded.intervals == law.intervals
    assert loaded.points == law.points and loaded.path == str(path.resolve())
    assert loaded.spec == str(path.resolve()) and loaded.fitted
    assert load_scaling_law(path) == loaded
    assert float(compute_fraction(2.5, 2.6, loaded)) == pytest.approx(float(compute_fraction(2.5, 2.6, law)))


def test_bad_fit_files_and_specs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the scaling law file"):
        as_scaling_law(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text(json.dumps({"E": 1.0}))
    with pytest.raises(ConfigError, match="not a scaling law fit file"):
        as_scaling_law(str(tmp_path / "other.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        as_scaling_law(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match=r"must be \(E, gamma\).*chinchilla, epoch, kaplan.*got 'gpt4',"):
        _scaling_law("scaling_law", "gpt4")
    with pytest.raises(ConfigError, match=r"got 'chinchila' \(did you mean 'chinchilla'\?\)"):
        as_scaling_law("chinchila")
    with pytest.raises(ConfigError, match="directory pytest runs in") as missing:
        as_scaling_law("missing-law.json")
    assert str(Path("missing-law.json").absolute()) in str(missing.value)
    assert _scaling_law("scaling_law", "Epoch") is PRESETS["epoch"]
    assert _scaling_law("scaling_law", "none") is None
    assert _scaling_law("scaling_law", "default") is DEFAULT_LAW and DEFAULT_LAW.default
    assert not PRESETS["chinchilla"].default


def _evaluation(law):
    return SimpleNamespace(
        metrics={"ce_orig": 3.0, "ce_sae": 3.1, "delta_ce": 0.1, "compute_fraction": 0.8},
        undefined={},
        scaling_law=law,
        confidence_interval=lambda name, level=0.95: (0.7, 0.9),
    )


def test_gating_compute_fraction_on_the_unfitted_default_is_refused():
    with pytest.raises(ConfigError, match=r"default scaling law.*NOT fitted.*fit_scaling_law.*choose one"):
        assert_ce_recovery(_evaluation(DEFAULT_LAW), metric="compute_fraction", min_score=0.5)
    # a law the user chose (a preset named explicitly, a given pair, a fit) may be gated on
    for law in (PRESETS["chinchilla"], given_law(1.0, 0.2)):
        assert_ce_recovery(_evaluation(law), metric="compute_fraction", min_score=0.5)
    assert_ce_recovery(_evaluation(DEFAULT_LAW), metric="delta_ce", max_value=0.2)  # other metrics are fine


def test_the_scaling_module_imports_no_numpy():
    code = (
        "import sys; import pytest_saecheck.scaling, pytest_saecheck.plugin.settings; "
        "print(sorted(m for m in ('numpy', 'scipy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_evaluation_records_the_law_and_the_preset_band(tiny_pytester: pytest.Pytester) -> None:
    compute = np.logspace(18, 22, 6)
    fit_scaling_law(compute, 0.5 + 300 * compute**-0.2, n_bootstrap=0).save(tiny_pytester.path / "law.json")
    tiny_pytester.makepyfile(
        f"""
        import pytest
        from pytest_saecheck import assert_ce_recovery
        from pytest_saecheck.errors import ConfigError
        from pytest_saecheck.metrics import compute_fraction
        pytestmark = {MARK}

        def test_default(saecheck):
            law = saecheck.evaluation.compute_law()
            assert law["name"] == "chinchilla" and law["default"] and not law["fitted"]
            assert "Hoffmann et al. 2022" in law["source"] and "MassiveText" in law["corpus"]
            assert set(law["by_preset"]) == {{"chinchilla", "epoch", "kaplan"}}
            defined = [v for v in law["by_preset"].values() if v is not None]
            assert law["band"] == [min(defined), max(defined)]
            assert "NOT fitted for this model" in law["note"] and "kaplan" in law["note"]
            # this random SAE lowers the tiny model's loss: the value above 1 is marked, never silent
            assert saecheck.metrics["delta_ce"] < 0 and saecheck.metrics["compute_fraction"] > 1
            assert law["above_one"] and "the splice lowered the loss" in law["note"]
            # ... in the law's note; not as a warning, which every such SAE would carry though nobody gated on it
            assert not any("compute_fraction" in w for w in saecheck.evaluation.warnings)
            with pytest.raises(ConfigError, match="fit the law"):
                assert_ce_recovery(saecheck, metric="compute_fraction", min_score=0.1)

        @pytest.mark.saecheck(model="tiny1", scaling_law="law.json")
        def test_fit_file(saecheck):
            law = saecheck.evaluation.scaling_law
            assert law.origin == "fit" and law.fitted and saecheck.settings.sources["scaling_law"] == "marker"
            m = saecheck.metrics
            assert m["compute_fraction"] == pytest.approx(float(compute_fraction(m["ce_orig"], m["ce_sae"], law)))
            assert saecheck.evaluation.compute_law()["fitted"] is True
            assert_ce_recovery(saecheck, metric="compute_fraction", min_score=0.0)
        """
    )
    result = tiny_pytester.runpytest_inprocess("--saecheck-json=report.json", "--saecheck-report=report.html")
    result.assert_outcomes(passed=2)
    # the terminal summary notes the unfitted law; a fitted law whose value is a fraction needs no note
    result.stdout.fnmatch_lines(
        [
            "saecheck: compute_fraction uses the scaling law chinchilla (E=1.69, *NOT fitted for this model*",
            "  sae_random @ tiny: compute_fraction * (published presets: * to *); above 1: the splice lowered*",
        ]
    )
    assert "sae_random @ tiny1: compute_fraction" not in result.stdout.str()
    document = json.loads((tiny_pytester.path / "report.json").read_text())
    laws = [sae["compute_law"] for sae in document["saes"] if sae.get("compute_law")]
    assert {law["origin"] for law in laws} == {"preset", "fit"}
    html = (tiny_pytester.path / "report.html").read_text()
    assert html.count("law not fitted") == 1  # the overview marks the default's value, not the fit's
    assert "under each published preset" in html
    # the fitted law (not the preset, which has no curve) is drawn, with its points and the SAE on it
    chart = html[html.index('id="effective-compute"') : html.index('<section class="sae')]
    assert chart.count("<svg") == 1 and chart.count("fit point: C") == 6 and "sae_random @ tiny" in chart
    assert "fitted for this model family" in chart and "NOT fitted" not in chart


def test_a_family_fit_scores_each_model_as_evaluate_does():
    import torch
    from factories import make_engine_model, make_tokens, random_sae

    from pytest_saecheck import evaluate, fit_scaling_law_from_models
    from pytest_saecheck.family import model_loss

    tokens = make_tokens(6)
    models = [make_engine_model(seed=seed) for seed in range(4)]
    n_params, n_train_tokens = [1e6, 4e6, 1.6e7, 6.4e7], [2e7, 8e7, 3.2e8, 1.28e9]
    law = fit_scaling_law_from_models(
        models, tokens, n_params=n_params, n_train_tokens=n_train_tokens, batch_size=4, n_bootstrap=0
    )
    with torch.no_grad():
        expected = [
            evaluate(
                model, random_sae("blocks.1.hook_resid_pre"), tokens, progress=False, scaling_law=None
            ).metrics["ce_orig"]
            for model in models
        ]
    assert [loss for _, loss in law.points] == pytest.approx(expected, rel=1e-6)
    assert [c for c, _ in law.points] == pytest.approx(
        [6 * n * d for n, d in zip(n_params, n_train_tokens, strict=True)]
    )
    assert law.origin == "fit" and f"on {tokens.numel()} tokens" in law.source
    assert model_loss(models[0], tokens, batch_size=5) == pytest.approx(expected[0], rel=1e-6)


def test_a_family_fit_needs_training_tokens_unless_the_suite_is_known():
    from factories import make_engine_model, make_tokens

    from pytest_saecheck import fit_scaling_law_from_models
    from pytest_saecheck.family import known_train_tokens

    assert known_train_tokens("EleutherAI/pythia-70m-deduped") == 299_892_736_000
    assert known_train_tokens("gpt2-small") is None
    with pytest.raises(ConfigError, match=r"training tokens of .* are unknown.*n_train_tokens"):
        fit_scaling_law_from_models([make_engine_model()], make_tokens(2))
    with pytest.raises(ConfigError, match="n_params needs one value per model"):
        fit_scaling_law_from_models([make_engine_model()], make_tokens(2), n_params=[1.0, 2.0])


def test_a_law_record_round_trips_and_the_law_inverts():
    compute = np.logspace(12, 15, 6)
    law = fit_scaling_law(compute, 1.2 + 50 * compute**-0.2, n_bootstrap=10)
    assert ScalingLaw.from_dict(json.loads(json.dumps(law.to_dict()))) == law
    for c in (1e10, 3e13, 1e17):
        assert law.compute_at(law.loss_at(c)) == pytest.approx(c, rel=1e-9)
    assert law.compute_at(law.irreducible) is None and law.compute_at(0.5) is None
    # the compute_fraction of two losses is the ratio of the computes at which the law reaches them
    assert float(compute_fraction(1.5, 1.6, law)) == pytest.approx(law.compute_at(1.6) / law.compute_at(1.5))
    for no_curve in (PRESETS["chinchilla"], given_law(1.0, 0.2)):
        with pytest.raises(ConfigError, match="no amplitude A"):
            no_curve.loss_at(1e12)
    with pytest.raises(ConfigError, match="not a scaling law record"):
        ScalingLaw.from_dict({"name": "x"})


def test_the_compute_curve_places_each_sae_on_the_law():
    from xml.etree import ElementTree

    from pytest_saecheck.report.charts import compute_curve

    compute = np.logspace(12, 15, 6)
    law = fit_scaling_law(compute, 1.2 + 50 * compute**-0.2, n_bootstrap=0)
    orig, worse, better = float(law.loss_at(1e15)), float(law.loss_at(1e14)), float(law.loss_at(2e15))
    svg = str(
        compute_curve(law, [("good", orig, worse), ("<b>lowered</b>", orig, better), ("below E", orig, 1.0)])
    )
    root = ElementTree.fromstring(svg)  # well-formed, every label escaped
    assert root.get("height") == str(260 + 14 * 4)  # a legend line per SAE, and one for the L_sae below E
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert any(t.startswith("good: L_orig") and "0.100 of the training compute" in t for t in texts)
    assert any(
        t.startswith("<b>lowered</b>") and "2.000 of the training compute (above 1" in t for t in texts
    )
    assert any(t == f"E = {law.irreducible:.3g}" for t in texts)
    circles = list(root.iter("{http://www.w3.org/2000/svg}circle"))
    fit_points = [
        c for c in circles if (c.findtext("{http://www.w3.org/2000/svg}title") or "").startswith("fit")
    ]
    assert len(fit_points) == 6
    # each SAE's marks sit on the curve at C(L_orig) = 1e15 and C(L_sae) = compute_fraction * C(L_orig)
    svg_ns = "{http://www.w3.org/2000/svg}"
    titles = [(c, c.findtext(f"{svg_ns}title") or "") for c in circles]
    origs = [float(c.get("cx")) for c, title in titles if "L_orig" in title]
    x_worse, x_better = (float(c.get("cx")) for c, title in titles if "L_sae" in title)
    ticks = {t.text: float(t.get("x")) for t in root.iter(f"{svg_ns}text") if (t.text or "").startswith("1e")}
    decade = ticks["1e15"] - ticks["1e14"]
    assert origs == pytest.approx([ticks["1e15"]] * 3, abs=0.1)
    assert x_worse == pytest.approx(ticks["1e14"], abs=0.1)
    assert x_better == pytest.approx(ticks["1e15"] + decade * math.log10(2), abs=0.1)
    assert any(t.startswith("below E: L_sae 1 at or below E") for t in texts)  # listed, not drawn
    with pytest.raises(ConfigError, match="no amplitude A"):
        compute_curve(PRESETS["epoch"], [("x", 2.0, 2.1)])


def test_the_shipped_demo_fit_is_the_fit_of_its_shipped_points():
    from pytest_saecheck import demo
    from pytest_saecheck.demo.build import BuildConfig

    meta = demo.metadata()
    law = demo.scaling_law()
    assert (law.name, law.spec, law.origin, law.fitted, law.default) == ("demo", "demo", "fit", True, False)
    assert as_scaling_law("demo") == law == _scaling_law("scaling_law", "demo")
    assert "fitted for this model family" in law.label()
    rows = meta["family"]["members"]
    assert [list(point) for point in law.points] == [[row["compute"], row["loss"]] for row in rows]
    for row in rows:
        assert row["compute"] == 6.0 * row["n_params"] * row["train_tokens"]
    # the demo model is the family's largest member, with its own shape and token budget
    config, last = meta["model_config"], rows[-1]
    assert last["name"] == demo.MODEL_NAME and last["train_tokens"] == meta["model"]["train_tokens"]
    assert (last["n_layers"], last["d_model"], last["n_heads"]) == (
        config["n_layers"],
        config["d_model"],
        config["n_heads"],
    )
    assert last["compute"] == max(row["compute"] for row in rows)
    assert [row["name"] for row in rows[:-1]] == [member.name for member in BuildConfig().family]
    # refitting the shipped points gives the shipped parameters and bootstrap intervals
    compute, loss = zip(*law.points, strict=True)
    refit = fit_scaling_law(compute, loss, n_bootstrap=meta["build_config"]["family_bootstrap"], seed=0)
    for name, value in law.parameters:
        assert dict(refit.parameters)[name] == pytest.approx(value, rel=1e-4)
    for (name, low, high), (_, refit_low, refit_high) in zip(law.intervals, refit.intervals, strict=True):
        assert (refit_low, refit_high) == pytest.approx((low, high), rel=1e-3), name
    # how far the demo model lies from the curve, as recorded (and shown in the README)
    record = meta["family"]["demo_model"]
    assert record["fit_loss"] == pytest.approx(law.loss_at(record["compute"]), rel=1e-12)
    assert record["residual"] == pytest.approx(record["loss"] - record["fit_loss"], abs=1e-12)
    without = fit_scaling_law(compute[:-1], loss[:-1], n_bootstrap=0)
    assert record["predicted_without_demo_model"] == pytest.approx(without.loss_at(compute[-1]), rel=1e-4)
    # so compute_fraction is defined for every demo SAE: every loss of the demo lies above E
    for name, metrics in meta["saes"].items():
        fraction = float(compute_fraction(metrics["ce_orig"], metrics["ce_sae"], law))
        assert 0 < fraction <= 1, name


@pytest.mark.parametrize(
    ("sae", "model", "law", "source", "expected"),
    [
        ("demo/good", None, DEFAULT_LAW, "default", "demo"),  # the demo family's fit replaces the default
        ("demo/good", "demo", DEFAULT_LAW, "default", "demo"),
        ("demo/good", None, PRESETS["epoch"], "marker", "epoch"),  # a chosen law is kept, even a preset
        ("demo/good", None, None, "command line", None),  # as is "none"
        ("sae_dir", "gpt2", DEFAULT_LAW, "default", "chinchilla"),  # another model keeps the default
    ],
)
def test_the_demo_model_defaults_to_its_family_law(sae, model, law, source, expected):
    from pytest_saecheck.plugin.fixtures import SAECheck
    from pytest_saecheck.plugin.session_cache import SessionCache
    from pytest_saecheck.plugin.settings import SAECheckSettings

    settings = SAECheckSettings(sae=sae, model=model, scaling_law=law, sources={"scaling_law": source})
    chosen = SAECheck(settings, "cpu", SessionCache()).scaling_law
    assert (None if chosen is None else chosen.spec) == expected


def test_an_interval_undefined_in_some_resamples_is_called_undefined_not_skewed():
    """On few short sequences of the demo, some resampled losses fall below the demo law's E, so compute_fraction
    is undefined there: the interval is (nan, nan) and the warning says why (it used to blame skew)."""
    import warnings

    from pytest_saecheck import demo, evaluate
    from pytest_saecheck.engine.result import interval_notes

    tokens = demo.load_tokens(n_sequences=32, seq_len=32, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(
            demo.load_model(device="cpu"),
            demo.load_sae("good", device="cpu"),
            tokens,
            scaling_law="demo",
            progress=False,
        )
        low, high = result.confidence_interval("compute_fraction")
    assert math.isfinite(result.metrics["compute_fraction"])
    assert math.isnan(low) and math.isnan(high)
    (message,) = [str(w.message) for w in caught if "interval of compute_fraction" in str(w.message)]
    assert "is undefined" in message and "irreducible loss E" in message and "skewed" not in message
    # the warning is the result's reading, not a change to it; a record of the interval carries it
    assert message not in result.warnings
    assert interval_notes(result.metrics, {"compute_fraction": (low, high)}, 0.95) == [message]


def test_a_point_gate_shows_an_undefined_interval_without_a_warning():
    """A gate on compute_fraction's value shows its interval; undefined in some resamples, that interval is no
    warning there (nobody gated on it), and it is one for a gate with confidence=, which reads it."""
    import warnings

    from pytest_saecheck.errors import SAECheckWarning

    base = _tiny_evaluation(None)
    lowest = min(base.metrics["ce_orig"], base.metrics["ce_sae"])
    result = under_law(base, given_law(lowest - 1e-3, 0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAECheckWarning)
        assert_ce_recovery(result, metric="compute_fraction", min_score=0.0)
    with pytest.warns(SAECheckWarning, match="interval of compute_fraction is undefined"):
        with pytest.raises(AssertionError, match="compute_fraction"):
            assert_ce_recovery(result, metric="compute_fraction", min_score=0.0, confidence=0.95)
