"""Plug-ins of the saecheck hooks (pytest_saecheck.extensions): the bundled demo is one, found through its entry
point, in pytest and outside it; a conftest hook answers before it; ``-p no:saecheck-demo`` leaves it out."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pytest_saecheck import extensions, groups, running, scaling
from pytest_saecheck.demo import plugin as demo_plugin
from pytest_saecheck.errors import ConfigError, SAECheckWarning


def test_the_demo_is_a_plugin_outside_pytest() -> None:
    """Plain Python (no pytest session's relay): the package's own manager holds the demo from its entry point."""
    with running.activated(running.HookOnly(None)):
        relay = extensions.relay()
        assert relay is extensions._standalone().hook
        assert extensions._standalone().is_registered(demo_plugin)
        assert "demo" in scaling.named_laws()
        assert scaling.model_default_law("demo") is not None
        assert scaling.model_default_law("gpt2") is None
        assert groups.check_spec("demo_constructs") == "demo_constructs"
        assert relay.pytest_saecheck_default_model(sae_spec="demo/good", sae=None) == "demo"
        assert relay.pytest_saecheck_default_tokens(sae_spec="release/id", sae=None) is None


def test_the_demo_is_registered_in_pytest_and_can_be_left_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_saecheck import groups, scaling

        def test_named():
            print("LAWS", sorted(scaling.named_laws()), "GROUPINGS", sorted(groups.named_groupings()))
        """
    )
    result = pytester.runpytest_inprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*LAWS [[]'demo'[]] GROUPINGS [[]'demo_constructs'[]]*"])
    left_out = pytester.runpytest_inprocess("-s", "-p", "no:saecheck-demo")
    left_out.assert_outcomes(passed=1)
    left_out.stdout.fnmatch_lines(["*LAWS [[][]] GROUPINGS [[][]]*"])


def test_a_conftest_hook_answers_before_the_demo(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_saecheck_default_scaling_law(model_spec):
            return "chinchilla" if model_spec == "demo" else None
        """
    )
    pytester.makepyfile(
        """
        from pytest_saecheck import scaling

        def test_law():
            assert scaling.model_default_law("demo").name == "chinchilla"
        """
    )
    pytester.runpytest_inprocess().assert_outcomes(passed=1)


def _answering(value: Any) -> Any:
    return lambda **_: value


def _relay_answering(**answers: Any) -> SimpleNamespace:
    """A stand-in hook relay whose hooks return ``answers[name]`` (a list, as a non-firstresult hook does)."""
    return SimpleNamespace(**{name: _answering(value) for name, value in answers.items()})


def test_named_things_are_refused_when_two_plugins_or_a_builtin_take_one_name() -> None:
    def law() -> scaling.ScalingLaw:
        return scaling.DEFAULT_LAW

    def relay_answering(**answers: Any) -> running.HookOnly:
        return running.HookOnly(_relay_answering(**answers))

    with running.activated(relay_answering(pytest_saecheck_scaling_laws=[{"mine": law}, {"mine": law}])):
        assert set(scaling.named_laws()) == {"mine"}, (
            "one object under one name twice is the same registration"
        )
    twice = [{"mine": law}, {"mine": lambda: scaling.DEFAULT_LAW}]
    with running.activated(relay_answering(pytest_saecheck_scaling_laws=twice)):
        with pytest.raises(ConfigError, match="two plug-ins register the scaling law 'mine'"):
            scaling.named_laws()
    with running.activated(relay_answering(pytest_saecheck_scaling_laws=[{"Epoch": law}])):
        with pytest.raises(ConfigError, match="epoch, which are built in"):
            scaling.named_laws()
    with running.activated(relay_answering(pytest_saecheck_groupings=[{"position": lambda m, t: None}])):
        with pytest.raises(ConfigError, match="position, which are built in"):
            groups.named_groupings()


def test_an_unknown_law_lists_the_plugins_laws() -> None:
    with pytest.raises(ConfigError, match=r"a plug-in's named law \(demo\)"):
        scaling.as_scaling_law("no-such-law")
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        scaling.as_scaling_law("dmo")


def test_the_demo_module_is_light() -> None:
    """Loading the plug-in (every pytest run does) imports no torch: checked in a fresh interpreter."""
    import subprocess
    import sys

    code = "import sys, pytest_saecheck.demo.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_settings_are_checked_against_the_session_s_plugins(pytester: pytest.Pytester) -> None:
    """The command line is validated with the session's own plug-ins: without the demo, its law is unknown (a
    fresh process, where the package's own plugin manager, which holds the demo, would otherwise answer)."""
    pytester.makepyfile("def test_nothing():\n    pass\n")
    pytester.runpytest_inprocess("--saecheck-scaling-law=demo").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("-p", "no:saecheck-demo", "--saecheck-scaling-law=demo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--saecheck-scaling-law*a plug-in's named law (none registered)*got 'demo'*"]
    )


def test_a_stale_install_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install whose metadata predates the entry point would lose the demo without a word: it warns."""
    import pluggy

    assert extensions._advertised_by_this_package(), "this environment's metadata advertises the demo"
    monkeypatch.setattr(extensions, "_advertised_by_this_package", lambda: False)
    with pytest.warns(SAECheckWarning, match="reinstall it"):
        extensions.load_plugins(pluggy.PluginManager(extensions.PROJECT))
