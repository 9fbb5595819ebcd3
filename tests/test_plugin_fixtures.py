"""The saecheck fixtures end to end (pytester, tiny model served by a hook, local SAE and token files)."""

from __future__ import annotations

import json

import pytest

from pytest_saecheck.report.collect import build_document
from pytest_saecheck.report.terminal import summary_lines

MARK = 'pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens=160)'


def test_fixtures_load_model_sae_and_tokens(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        f"""
        import pytest, torch
        pytestmark = {MARK}

        def test_objects(saecheck_model, saecheck_sae, saecheck_tokens, saecheck_device, saecheck):
            assert type(saecheck_model).__name__ == "HookedTransformer"
            assert saecheck_sae.cfg.d_in == saecheck_model.cfg.d_model
            assert saecheck_tokens.dtype == torch.long
            assert tuple(saecheck_tokens.shape) == (10, 16)   # 160 tokens / context_size 16 from the SAE config
            assert bool((saecheck_tokens[:, 0] == 0).all())    # BOS at position 0
            assert saecheck_device in ("cpu", "cuda")
            assert saecheck.device == saecheck_device
            assert str(next(saecheck_model.parameters()).device).startswith(saecheck_device)
        """
    )
    tiny_pytester.runpytest_inprocess().assert_outcomes(passed=1)


def test_evaluation_is_computed_once_and_shared(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        f"""
        import pytest
        import conftest
        from pytest_saecheck.plugin.fixtures import session_cache
        pytestmark = {MARK}

        def test_first(saecheck):
            assert saecheck.metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)

        def test_second(saecheck):
            assert saecheck.evaluation is saecheck.evaluation
            assert saecheck.metrics["delta_ce"] == pytest.approx(0.0, abs=1e-5)

        @pytest.mark.saecheck(batch_size=3)   # another batch size is another evaluation
        def test_third(saecheck, request):
            saecheck.evaluation
            cache = session_cache(request.config)
            assert cache.loads == {{"model": 1, "sae": 1, "tokens": 1, "evaluation": 2, "pass": 2}}
            assert conftest.LOADS == ["tiny"]
        """
    )
    tiny_pytester.runpytest_inprocess().assert_outcomes(passed=3)


def test_cached_evaluation_needs_no_model(tiny_pytester: pytest.Pytester) -> None:
    """Going back to an SAE whose evaluation is cached must not reload its model."""
    tiny_pytester.makepyfile(
        """
        import pytest
        import conftest

        @pytest.mark.saecheck(model="tiny")
        def test_a(saecheck):
            saecheck.evaluation

        @pytest.mark.saecheck(model="tiny1")
        def test_b(saecheck):
            saecheck.evaluation

        @pytest.mark.saecheck(model="tiny")
        def test_c(saecheck):
            saecheck.evaluation
            assert conftest.LOADS == ["tiny", "tiny1"]
        """
    )
    result = tiny_pytester.runpytest_inprocess(
        "--saecheck-sae=sae_random", "--saecheck-tokens=tokens.npy", "--saecheck-n-tokens=64"
    )
    result.assert_outcomes(passed=3)


def test_model_defaults_to_the_one_named_in_the_sae_config(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(sae="sae_identity", tokens="tokens.npy", n_tokens=32)
        def test_model_from_sae(saecheck):
            assert saecheck.model_spec == "tiny"
            assert saecheck.context_size == 16
            saecheck.model
        """
    )
    tiny_pytester.runpytest_inprocess().assert_outcomes(passed=1)


def test_missing_sae_setting_errors_with_the_fix(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        """
        def test_no_sae(saecheck_sae):
            pass
        """
    )
    result = tiny_pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*ConfigError: no SAE is configured for this test; add @pytest.mark.saecheck(sae=...)*"]
    )


def test_device_option_marker_and_fixture_override(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        """
        import pytest
        def test_option(saecheck_device):
            assert saecheck_device == "cpu"

        @pytest.mark.saecheck(device="meta")
        def test_marker(saecheck_device, saecheck):
            assert saecheck_device == "meta"
            assert saecheck.device == "meta"
        """
    )
    tiny_pytester.runpytest_inprocess("--saecheck-device=cpu").assert_outcomes(passed=2)

    tiny_pytester.makeconftest(
        "import pytest\n@pytest.fixture\ndef saecheck_device():\n    return 'cpu:override'\n"
    )
    tiny_pytester.makepyfile(
        """
        def test_fixture_override(saecheck):
            assert saecheck.device == "cpu:override"
        """
    )
    tiny_pytester.runpytest_inprocess().assert_outcomes(passed=1)


def test_auto_device_is_cuda_only_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pytest_saecheck.devices import auto_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_device() == "cpu"


UNAVAILABLE_CONFTEST = """
from pytest_saecheck.errors import WeightsUnavailableError

def pytest_saecheck_load_sae(spec, device, dtype):
    if spec == "remote/sae":
        raise WeightsUnavailableError("SAE remote/sae is not available on this machine; download it with X")
"""


def test_unavailable_weights_skip_with_the_download_hint(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(UNAVAILABLE_CONFTEST)
    tiny_pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(sae="remote/sae")
        def test_remote(saecheck_sae):
            pass
        """
    )
    result = tiny_pytester.runpytest_inprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*saecheck: SAE remote/sae is not available on this machine; download it with X*"]
    )

    result = tiny_pytester.runpytest_inprocess("--saecheck-unavailable=error")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*WeightsUnavailableError: SAE remote/sae is not available*"])


def test_a_failed_load_is_not_retried(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        """
        from pytest_saecheck.errors import LoadError
        CALLS = []
        def pytest_saecheck_load_sae(spec, device, dtype):
            CALLS.append(spec)
            raise LoadError("broken SAE")
        """
    )
    tiny_pytester.makepyfile(
        """
        import pytest
        import conftest
        pytestmark = pytest.mark.saecheck(sae="x/y")
        def test_1(saecheck_sae): pass
        def test_2(saecheck_sae): pass
        def test_calls():
            assert conftest.CALLS == ["x/y"]
        """
    )
    result = tiny_pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2, passed=1)
    result.stdout.fnmatch_lines(["*LoadError: broken SAE*"])


def test_records_ride_on_reports_as_plain_values(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        f"""
        import pytest
        from pytest_saecheck.assertions import assert_ce_recovery
        pytestmark = {MARK}

        def test_gate(saecheck):
            assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9, confidence=0.9)
        """
    )
    reprec = tiny_pytester.inline_run()
    reprec.assertoutcome(passed=1)
    setup, call = (
        report for report in reprec.getreports("pytest_runtest_logreport") if report.when in ("setup", "call")
    )
    assert [entry["kind"] for entry in setup.saecheck_records] == ["subject"]
    kinds = [entry["kind"] for entry in call.saecheck_records]
    assert kinds == ["evaluation", "assertion"]
    assertion = call.saecheck_records[1]
    assert assertion["metric"] == "kl_div_score" and assertion["passed"] is True
    assert assertion["min_score"] == 0.9 and assertion["confidence"] == 0.9
    assert len(assertion["interval"]) == 2
    # plain Python types only: survives JSON (and therefore xdist's execnet serialisation)
    json.dumps(call.saecheck_records)
    assert call._to_json()["saecheck_records"] == call.saecheck_records


def test_summary_table_lists_each_sae_with_metrics_and_outcomes(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        """
        import pytest
        from pytest_saecheck.assertions import assert_ce_recovery

        @pytest.mark.parametrize("min_score", [
            pytest.param(0.99, marks=pytest.mark.saecheck(sae="sae_identity"), id="identity"),
            pytest.param(0.99, marks=pytest.mark.saecheck(sae="sae_random"), id="random"),
        ])
        def test_gate(saecheck, min_score):
            assert_ce_recovery(saecheck, metric="kl_div_score", min_score=min_score)
        """
    )
    result = tiny_pytester.runpytest_inprocess("--saecheck-tokens=tokens.npy", "--saecheck-n-tokens=64")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*= saecheck summary =*",
            "SAE*model*tokens*n_tokens*CE score*ΔCE*KL score*R²*L0*tests",
            # the tiny random model does better zero-ablated (L_zero < L_orig, resolved), so its CE score is
            # undefined ("-"), even for the identity SAE; the R² column: -11.967 sets 3 decimals
            "sae_identity*tiny*tokens.npy*60*-*0.0000*1.0000*1.000 *1 passed",
            "sae_random*tiny*tokens.npy*60*1 failed",
        ]
    )


def test_summary_counts_setup_errors_and_skips() -> None:
    from types import SimpleNamespace

    subject = [{"kind": "subject", "label": "a/b", "device": "cpu"}]
    reports = [
        SimpleNamespace(
            nodeid="t1", when="setup", outcome="failed", failed=True, skipped=False, saecheck_records=subject
        ),
        SimpleNamespace(
            nodeid="t2", when="setup", outcome="skipped", failed=False, skipped=True, saecheck_records=subject
        ),
    ]
    assert summary_lines(build_document(reports))[-1].split()[-4:] == ["1", "error,", "1", "skipped"]


def test_records_survive_report_serialisation_and_build_the_table(tiny_pytester: pytest.Pytester) -> None:
    """xdist ships reports through pytest_report_to_serializable; the records and the table must survive it."""
    tiny_pytester.makepyfile(
        f"""
        import pytest
        pytestmark = {MARK}
        def test_metrics(saecheck):
            assert saecheck.metrics["explained_variance"] > 0.99
        """
    )
    reprec = tiny_pytester.inline_run()
    config = reprec.getcalls("pytest_sessionstart")[0].session.config
    restored_reports = []
    for report in reprec.getreports("pytest_runtest_logreport"):
        data = json.loads(json.dumps(config.hook.pytest_report_to_serializable(config=config, report=report)))
        restored = config.hook.pytest_report_from_serializable(config=config, data=data)
        assert getattr(restored, "saecheck_records", None) == getattr(report, "saecheck_records", None)
        restored_reports.append(restored)
    lines = summary_lines(build_document(restored_reports))
    assert lines[2].startswith("sae_identity @ tiny") and lines[2].endswith("1 passed")


def test_one_session_object_is_registered_per_run(pytester: pytest.Pytester) -> None:
    """One session object per run: registered as a plugin, the active run while the run lasts (its hook relay and
    the running test), and the outer run's again when a nested run ends."""
    from pytest_saecheck import running

    outer = running.active()
    pytester.makepyfile(
        """
        from pytest_saecheck import running
        from pytest_saecheck.plugin.session import SESSION_NAME, SAECheckSession
        def test_registered(request):
            session = request.config.pluginmanager.get_plugin(SESSION_NAME)
            assert isinstance(session, SAECheckSession) and session.config is request.config
            assert SAECheckSession.of(request.config) is session
            assert running.active() is session and running.current_item() is request.node
            assert running.active_hook() is request.config.hook
            assert [p for p in request.config.pluginmanager.get_plugins() if isinstance(p, SAECheckSession)] == [session]

        def test_the_fixture_is_recognised_by_its_class(request, saecheck):
            from types import SimpleNamespace
            from pytest_saecheck.checks.workflow import is_fixture
            assert is_fixture(saecheck) and saecheck.item is request.node  # asking evaluates nothing (no SAE set)
            assert not is_fixture(SimpleNamespace(evaluation=None, settings=None, subject=dict))
        """
    )
    pytester.runpytest_inprocess().assert_outcomes(passed=2)
    assert running.active() is outer


def test_failure_output_shows_the_table_and_hides_helper_frames(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        """
        import pytest
        from pytest_saecheck.assertions import assert_ce_recovery
        pytestmark = pytest.mark.saecheck(model="tiny", sae="sae_random", tokens="tokens.npy", n_tokens=64)

        def test_gate(saecheck):
            assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9, confidence=0.95)
        """
    )
    result = tiny_pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            '>       assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9, confidence=0.95)',
            "E       AssertionError: assert_ce_recovery failed for sae_random @ tiny: the lower bound of the 95% "
            "interval of kl_div_score = * is below min_score 0.9000",
            "E * value * 95% interval * threshold",
            "E * ce_orig *",
            "E * kl_div_score * [[]*, *[]] * ≥ 0.9000 (gated on the lower bound)",
            "E * tokens: 60 evaluated (4 sequences × 16), position 0 (BOS) excluded",
            "E * scale: kl_div_score = (KL_zero − KL_sae) / KL_zero*",
        ]
    )
    output = result.stdout.str()  # __tracebackhide__: no frame of the plugin's assertion code is shown
    assert "pytest_saecheck/assertions.py" not in output and "pytest_saecheck/checks/" not in output


def test_scaling_law_setting_reaches_compute_fraction(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        f"""
        import pytest
        pytestmark = {MARK}

        @pytest.mark.saecheck(sae="sae_random", scaling_law=(0.5, 0.2))
        def test_given(saecheck):
            m = saecheck.metrics
            expected = ((m["ce_sae"] - 0.5) / (m["ce_orig"] - 0.5)) ** (-1 / 0.2)
            assert m["compute_fraction"] == pytest.approx(expected, rel=1e-9)
            law = saecheck.evaluation.scaling_law
            assert (law.irreducible, law.gamma, law.origin) == (0.5, 0.2, "given")

        @pytest.mark.saecheck(sae="sae_random", scaling_law="none")
        def test_disabled(saecheck):
            assert "compute_fraction" not in saecheck.metrics

        @pytest.mark.saecheck(sae="sae_random", scaling_law=(0.5,))
        def test_malformed(saecheck):
            pass
        """
    )
    result = tiny_pytester.runpytest_inprocess()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*scaling_law*must be (E, gamma)*"])


def test_scaling_law_command_line(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        f"""
        import pytest
        pytestmark = {MARK}

        def test_cli(saecheck):
            law = saecheck.settings.scaling_law
            assert (law.irreducible, law.gamma) == (0.25, 0.3)
            assert saecheck.settings.sources["scaling_law"] == "command line"
        """
    )
    tiny_pytester.runpytest_inprocess("--saecheck-scaling-law=0.25,0.3").assert_outcomes(passed=1)


def test_loading_errors_show_the_users_frames_and_the_clear_line_only(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        """
        import pytest
        from pytest_saecheck import assert_ce_recovery

        @pytest.mark.saecheck(model="tiny", sae="./no_such_sae", tokens="tokens.npy", n_tokens=160)
        def test_in_the_call(saecheck):
            assert_ce_recovery(saecheck, min_score=0.9)

        @pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="no_such_tokens.jsonl", n_tokens=160)
        def test_in_a_fixture(saecheck_tokens):
            pass
        """
    )
    result = tiny_pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1, errors=1)
    text = result.stdout.str()
    start = text.index("= ERRORS =")
    end = (
        text.index("saecheck summary")
        if "saecheck summary" in text
        else text.index("short test summary info")
    )
    shown = text[start:end].splitlines()
    assert len(shown) < 25, "\n".join(shown)  # it was ~120 lines of plugin internals before the clear line
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_in_a_fixture*",
            "E   pytest_saecheck.errors.LoadError: token source 'no_such_tokens.jsonl' is not an existing file*",
            "*test_in_the_call*",
            ">       assert_ce_recovery(saecheck, min_score=0.9)",
            "E       pytest_saecheck.errors.LoadError: SAE directory '*no_such_sae' does not exist (looked for *no_such_sae)*",
        ]
    )
    for internal in ("pytest_saecheck/loading/", "fixtures.py", "session_cache.py", "pluggy", "_pytest"):
        assert internal not in text[start:end], internal
    # --full-trace still shows every frame
    full = tiny_pytester.runpytest_inprocess("--full-trace")
    assert "pytest_saecheck/loading/" in full.stdout.str() and "session_cache.py" in full.stdout.str()


def test_sae_lens_deprecation_warnings_are_hidden_but_the_users_are_not(
    tiny_pytester: pytest.Pytester,
) -> None:
    tiny_pytester.makepyfile(
        f"""
        import warnings
        import pytest
        pytestmark = {MARK}

        def test_loads_sae_lens(saecheck):
            assert saecheck.metrics["explained_variance"] > 0.99   # the first import of sae_lens happens here

        def test_users_warning():
            warnings.warn("the user's own deprecation", DeprecationWarning)
        """
    )
    # a fresh interpreter, where SAE Lens is imported for the first time by the plugin
    result = tiny_pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*DeprecationWarning: the user's own deprecation"])
    # SAE Lens importing TransformerLens' deprecated utils, at the plugin's first load
    assert "sae_lens/" not in result.stdout.str() and "'utils' module" not in result.stdout.str()


def _counting_sae_loader(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the SAE loader by one that counts its calls and returns an object with an SAE Lens config."""
    from types import SimpleNamespace

    from pytest_saecheck import loading

    loads: list[str] = []
    metadata = {
        "model_name": "gpt2",
        "dataset_path": "some/dataset",
        "context_size": 32,
        "prepend_bos": False,
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
    }

    def load_sae(spec: str, *args: object, **kwargs: object) -> object:
        loads.append(spec)
        return SimpleNamespace(cfg=SimpleNamespace(metadata=dict(metadata)))

    monkeypatch.setattr(loading, "load_sae", load_sae)
    return loads


def test_cache_keys_load_the_sae_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The specs the settings leave to the SAE's config are resolved once into a frozen value: computing keys
    again (after the SAE left the cache, as it does when another model loads) or for another test with the same
    settings loads no SAE."""
    import dataclasses

    from pytest_saecheck.plugin.fixtures import ResolvedSpecs, SAECheck
    from pytest_saecheck.plugin.session_cache import SessionCache
    from pytest_saecheck.plugin.settings import SAECheckSettings

    loads = _counting_sae_loader(monkeypatch)
    cache = SessionCache()
    settings = SAECheckSettings(sae="org/release-id")
    check = SAECheck(settings, "cpu", cache)
    key = check.evaluation_key()
    assert loads == ["org/release-id"]
    specs = check.specs
    assert isinstance(specs, ResolvedSpecs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs.model = "other"  # type: ignore[misc]
    assert (check.model_spec, check.token_source, check.context_size) == ("gpt2", "hf:some/dataset", 32)
    assert check.model_from_pretrained_kwargs == {"center_writing_weights": False}
    assert specs.prepend_bos is False

    cache.release_model()  # drops the cached SAEs, as loading a different model does
    assert check.evaluation_key() == key
    assert SAECheck(settings, "cpu", cache).evaluation_key() == key  # the next test with the same settings
    assert loads == ["org/release-id"]

    other = SAECheck(
        dataclasses.replace(settings, n_tokens=64), "cpu", cache
    )  # other settings: resolved anew
    other.evaluation_key()
    assert loads == ["org/release-id", "org/release-id"]


def test_explicit_specs_still_need_the_sae_config_only_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_saecheck.errors import ConfigError
    from pytest_saecheck.plugin.fixtures import SAECheck
    from pytest_saecheck.plugin.session_cache import SessionCache
    from pytest_saecheck.plugin.settings import FrozenKwargs, SAECheckSettings

    loads = _counting_sae_loader(monkeypatch)
    settings = SAECheckSettings(
        model="tiny",
        sae="org/release-id",
        tokens="tokens.npy",
        context_size=8,
        model_from_pretrained_kwargs=FrozenKwargs({}),
    )
    check = SAECheck(settings, "cpu", SessionCache())
    assert (check.model_spec, check.token_source, check.context_size) == ("tiny", "tokens.npy", 8)
    assert check.model_from_pretrained_kwargs == {}
    assert len(loads) == 1  # prepend_bos comes from the SAE's config

    no_sae = SAECheck(SAECheckSettings(), "cpu", SessionCache())
    with pytest.raises(ConfigError, match="no model is configured"):
        no_sae.model_spec  # noqa: B018
    with pytest.raises(ConfigError, match="no SAE is configured"):
        no_sae.token_source  # noqa: B018
    assert len(loads) == 1
