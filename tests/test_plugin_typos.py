"""Misspelt ini keys and marks are errors, not silently ignored."""

from __future__ import annotations

import pytest

GOOD = 'pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens=160)'


@pytest.mark.parametrize(
    ("line", "suggestion"),
    [
        ("saecheck_n_token = 2048", "saecheck_n_tokens"),
        ("saecheck_reprot = report.html", "saecheck_report"),
        ("saecheck_baseline_dri = b", "saecheck_baseline_dir"),
        ("saechek_json = r.json", "saecheck_json"),
    ],
)
def test_a_misspelt_ini_key_is_a_usage_error_with_a_suggestion(
    pytester: pytest.Pytester, line: str, suggestion: str
) -> None:
    pytester.makeini(f"[pytest]\n{line}\n")
    pytester.makepyfile("def test_a():\n    pass\n")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    key = line.split(" =")[0]
    result.stderr.fnmatch_lines([f"*unknown ini key '{key}' in *.ini (did you mean '{suggestion}'?)*"])


def test_other_plugins_ini_keys_are_left_to_pytest(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsome_other_plugin_key = 1\nsaecheck_n_tokens = 2048\n")
    pytester.makepyfile("def test_a():\n    pass\n")
    result = pytester.runpytest_inprocess("-W", "ignore::pytest.PytestConfigWarning")
    result.assert_outcomes(passed=1)


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnknownMarkWarning"
)  # the inner run's misspelt marks, on purpose
def test_a_misspelt_saecheck_mark_on_a_fixture_test_errors_it(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        f"""
        import pytest

        pytestmark = {GOOD}

        @pytest.mark.saechek(sae="sae_random")
        def test_typo(saecheck):
            pass

        @pytest.mark.sae_check(sae="sae_random")
        def test_underscore(saecheck_settings):
            pass

        @pytest.mark.slow
        def test_unrelated_mark(saecheck_settings):
            pass

        @pytest.mark.saechek
        def test_no_fixture():
            pass
        """
    )
    result = tiny_pytester.runpytest_inprocess("-p", "no:warnings")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.saechek is not a saecheck marker (did you mean @pytest.mark.saecheck?)*",
            "*@pytest.mark.sae_check is not a saecheck marker*",
        ],
        consecutive=False,
    )
