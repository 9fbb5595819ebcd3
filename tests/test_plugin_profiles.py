"""Profiles: named sets of settings in the configuration file, chosen with --saecheck-profile."""

from __future__ import annotations

import json
import textwrap

import pytest

SHOW = """
import pytest
pytestmark = pytest.mark.saecheck(batch_size=4)

def test_show(saecheck_settings):
    s = saecheck_settings
    print(f"VALUES n_tokens={s.n_tokens} batch_size={s.batch_size} seed={s.seed} context_size={s.context_size}")
    print("SOURCES", s.sources["n_tokens"], s.sources["batch_size"], s.sources["seed"], s.sources["context_size"])
"""

PYPROJECT = """
[tool.pytest.ini_options]
saecheck_n_tokens = "4096"
saecheck_seed = "3"
saecheck_context_size = "32"

[tool.saecheck.profiles.smoke]
n_tokens = 256
batch_size = 2
seed = 7

[tool.saecheck.profiles.full]
n_tokens = 200_000
"""

INI = """
[pytest]
saecheck_n_tokens = 4096
saecheck_seed = 3
saecheck_context_size = 32

[saecheck:profile smoke]
n_tokens = 256
batch_size = 2
seed = 7
"""


@pytest.mark.parametrize("kind", ["pyproject", "ini"])
def test_a_profile_sits_between_the_command_line_and_the_ini_keys(
    pytester: pytest.Pytester, kind: str
) -> None:
    if kind == "pyproject":
        pytester.makepyprojecttoml(PYPROJECT)
    else:
        pytester.makeini(INI)
    pytester.makepyfile(SHOW)
    # without a profile: the ini keys
    result = pytester.runpytest_inprocess("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*VALUES n_tokens=4096 batch_size=4 seed=3 context_size=32"])
    # the profile beats the ini keys, the marker beats the profile (batch_size), the ini fills in the rest
    result = pytester.runpytest_inprocess("-s", "--saecheck-profile", "smoke")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "saecheck profile: smoke (n_tokens=256, batch_size=2, seed=7)",
            "*VALUES n_tokens=256 batch_size=4 seed=7 context_size=32",
            "*SOURCES profile marker profile ini",
        ]
    )
    # the command line beats the profile
    result = pytester.runpytest_inprocess("-s", "--saecheck-profile=smoke", "--saecheck-seed=11")
    result.stdout.fnmatch_lines(["*VALUES n_tokens=256 batch_size=4 seed=11 context_size=32"])


def test_the_report_names_the_profile(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(PYPROJECT)
    pytester.makepyfile(SHOW)
    result = pytester.runpytest_inprocess(
        "--saecheck-profile", "smoke", "--saecheck-json", "out.json", "--saecheck-report", "out.html"
    )
    result.assert_outcomes(passed=1)
    assert json.loads((pytester.path / "out.json").read_text())["run"]["profile"] == "smoke"
    assert "profile <code>smoke</code>" in (pytester.path / "out.html").read_text()
    result = pytester.runpytest_inprocess("--saecheck-json", "out.json")
    assert "profile" not in json.loads((pytester.path / "out.json").read_text())["run"]


@pytest.mark.parametrize(
    ("config", "arguments", "message"),
    [
        (PYPROJECT, ["--saecheck-profile", "smok"], "*no such profile*(profiles defined: full, smoke)*"),
        (
            PYPROJECT + "\n[tool.saecheck.profiles.typo]\nn_token = 5\n",
            ["--saecheck-profile", "typo"],
            "*unknown key 'n_token' in [[]tool.saecheck.profiles.typo[]] in pyproject.toml (did you mean 'n_tokens'?)*",
        ),
        (
            PYPROJECT + "\n[tool.saecheck.profiles.bad]\nn_tokens = -1\n",
            ["--saecheck-profile", "bad"],
            "*--saecheck-profile bad (n_tokens): saecheck setting 'n_tokens' must be at least 1, got -1*",
        ),
    ],
)
def test_a_bad_profile_is_a_usage_error(
    pytester: pytest.Pytester, config: str, arguments: list[str], message: str
) -> None:
    pytester.makepyprojecttoml(config)
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess(*arguments)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_profile_without_a_configuration_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess("--saecheck-profile", "smoke")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no such profile*(profiles defined: none)*"])


def test_relative_paths_in_a_profile_resolve_against_the_configuration_file(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyprojecttoml('[tool.saecheck.profiles.local]\ntokens = "data/tokens.npy"\n')
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "tokens.npy").write_bytes(b"")  # exists, so the spec names this path
    (pytester.path / "sub").mkdir()
    (pytester.path / "sub" / "test_path.py").write_text(
        textwrap.dedent(
            """
            def test_path(saecheck_settings):
                print("TOKENS", saecheck_settings.tokens)
            """
        )
    )
    result = pytester.runpytest_inprocess("-s", "--saecheck-profile", "local", "sub")
    result.stdout.fnmatch_lines([f"*TOKENS {pytester.path / 'data' / 'tokens.npy'}"])
