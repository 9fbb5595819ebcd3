"""Settings: marker, command-line options and ini keys, their precedence, validation and the marker's registration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytest_saecheck.errors import ConfigError, SAECheckError
from pytest_saecheck.plugin.settings import SETTINGS, SAECheckSettings, SettingsUsageError, marker_kwargs
from pytest_saecheck.scaling import ScalingLaw

SHOW_SETTINGS = """
import json
def test_show(saecheck_settings):
    print("SETTINGS=" + json.dumps(saecheck_settings.to_dict()))
    print("SOURCES=" + json.dumps(dict(saecheck_settings.sources)))
"""


def _settings(result: pytest.RunResult) -> tuple[dict, dict]:
    import json

    out = result.stdout.str()
    settings = json.loads(out.split("SETTINGS=", 1)[1].splitlines()[0])
    sources = json.loads(out.split("SOURCES=", 1)[1].splitlines()[0])
    return settings, sources


def test_plugin_import_does_not_import_torch() -> None:
    code = "import sys, pytest_saecheck.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_defaults_when_nothing_is_configured(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest_inprocess("-s")
    result.assert_outcomes(passed=1)
    settings, sources = _settings(result)
    plain = {setting.name: SAECheckSettings().to_dict()[setting.name] for setting in SETTINGS}
    assert settings == json.loads(json.dumps(plain))
    assert settings["scaling_law"] == "chinchilla"  # a law travels as its spec
    assert set(sources.values()) == {"default"}


@pytest.mark.parametrize("setting", [s for s in SETTINGS], ids=lambda s: s.name)
def test_every_setting_has_an_option_an_ini_key_and_a_marker_key(pytester: pytest.Pytester, setting) -> None:
    example = {
        "model": "tiny",
        "sae": "some-release/some-id",
        "tokens": "hf:owner/data",
        "n_tokens": "2048",
        "sequential": "true",
        "context_size": "32",
        "batch_size": "3",
        "device": "cpu",
        "dtype": "bfloat16",
        "n_devices": "2",
        "backend": "hf",
        "device_map": '{"model.layers.0": "cpu", "lm_head": "cpu"}',
        "max_memory": '{"cpu": "1GiB"}',
        "exclude_bos": "false",
        "exclude_special_tokens": "false",
        "exclude_token_ids": "5,7",
        "activation_scaler": "0.25",
        "seed": "7",
        "splice": "joint",
        "release_group_mib": "512",
        "weight_budget_mib": "64",
        "unavailable": "error",
        "scaling_law": "0.5,0.2",
        "model_from_pretrained_kwargs": '{"fold_ln": false, "n_ctx": 8}',
        "hook_name": "blocks.0.hook_resid_pre",
        "hook_name_override": "true",
        "token_groups": "position",
    }[setting.name]
    parsed = setting.parse(setting.name, example)
    if isinstance(parsed, tuple):
        parsed = list(parsed)  # as the settings travel through JSON
    if isinstance(parsed, ScalingLaw):
        parsed = parsed.spec  # a law travels as its spec
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest_inprocess("-s", f"{setting.option}={example}")
    assert _settings(result)[0][setting.name] == parsed
    assert _settings(result)[1][setting.name] == "command line"

    pytester.makeini(f"[pytest]\n{setting.ini} = {example}\n")
    result = pytester.runpytest_inprocess("-s")
    assert _settings(result)[0][setting.name] == parsed
    assert _settings(result)[1][setting.name] == "ini"

    pytester.makepyfile(
        f"import pytest\npytestmark = pytest.mark.saecheck({setting.name}={parsed!r})\n" + SHOW_SETTINGS
    )
    result = pytester.runpytest_inprocess("-s")
    assert _settings(result)[0][setting.name] == parsed
    assert _settings(result)[1][setting.name] == "marker"


def test_precedence_marker_over_command_line_over_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsaecheck_n_tokens = 100\nsaecheck_batch_size = 2\nsaecheck_seed = 3\n")
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(n_tokens=300)
        def test_marker_wins(saecheck_settings):
            assert saecheck_settings.n_tokens == 300
            assert saecheck_settings.sources["n_tokens"] == "marker"
            assert saecheck_settings.batch_size == 5        # command line beats ini
            assert saecheck_settings.sources["batch_size"] == "command line"
            assert saecheck_settings.seed == 3              # ini beats default
            assert saecheck_settings.sources["seed"] == "ini"
        """
    )
    result = pytester.runpytest_inprocess("--saecheck-n-tokens=200", "--saecheck-batch-size=5")
    result.assert_outcomes(passed=1)


def test_closest_marker_wins_per_key_and_outer_markers_fill_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.saecheck(model="module-model", sae="module/sae", n_tokens=111)

        @pytest.mark.saecheck(sae="class/sae", batch_size=4)
        class TestGroup:
            @pytest.mark.saecheck(n_tokens=222)
            def test_method(self, saecheck_settings):
                assert saecheck_settings.model == "module-model"
                assert saecheck_settings.sae == "class/sae"
                assert saecheck_settings.n_tokens == 222
                assert saecheck_settings.batch_size == 4

        @pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.saecheck(sae="param/sae"), id="p")])
        def test_param_marks(saecheck_settings, x):
            assert saecheck_settings.sae == "param/sae"
            assert saecheck_settings.n_tokens == 111

        @pytest.mark.saecheck(model=None)
        def test_none_means_not_set_here(saecheck_settings):
            assert saecheck_settings.model == "module-model"
        """
    )
    pytester.runpytest_inprocess().assert_outcomes(passed=3)


def test_unknown_marker_key_errors_the_test_with_a_suggestion(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(n_token=5)
        def test_typo():
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*ConfigError: unknown key 'n_token' in @pytest.mark.saecheck (did you mean 'n_tokens'?)*"]
    )


def test_positional_marker_arguments_are_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck("demo/good")
        def test_positional():
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*keyword arguments only*"])


def test_malformed_marker_value_errors_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(n_tokens="many")
        def test_bad(saecheck_settings):
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.saecheck: saecheck setting 'n_tokens' must be an integer*"])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--saecheck-n-tokens=lots", "*--saecheck-n-tokens: saecheck setting 'n_tokens' must be an integer*"),
        ("--saecheck-batch-size=0", "*'batch_size' must be at least 1*"),
        ("--saecheck-dtype=int8", "*is not a dtype: 'int8'*"),
        ("--saecheck-device=gpu please", "*is not a device*"),
        ("--saecheck-exclude-bos=maybe", "*must be a boolean*"),
        ("--saecheck-unavailable=ignore", "*must be 'skip' or 'error'*"),
    ],
)
def test_malformed_option_is_a_usage_error(pytester: pytest.Pytester, option: str, message: str) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


@pytest.mark.parametrize("value", ["-4", "1"])  # one token has no next token to predict
def test_malformed_ini_value_is_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    pytester.makeini(f"[pytest]\nsaecheck_context_size = {value}\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*saecheck_context_size: saecheck setting 'context_size' must be at least 2, got {value}*"]
    )


@pytest.mark.parametrize("where", ["option", "ini", "marker"])
def test_a_negative_count_says_at_least_one_everywhere(pytester: pytest.Pytester, where: str) -> None:
    expected = "*saecheck setting 'n_tokens' must be at least 1, got -1*"
    if where == "marker":
        pytester.makepyfile(
            "import pytest\n@pytest.mark.saecheck(n_tokens=-1)\ndef test_a(saecheck_settings):\n    pass\n"
        )
        result = pytester.runpytest_inprocess()
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([expected])
        return
    pytester.makepyfile("def test_nothing(): pass")
    if where == "ini":
        pytester.makeini("[pytest]\nsaecheck_n_tokens = -1\n")
    result = pytester.runpytest_inprocess(*(["--saecheck-n-tokens=-1"] if where == "option" else []))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])
    assert "must be an integer" not in result.stderr.str()


@pytest.fixture
def fake_devices(monkeypatch: pytest.MonkeyPatch):
    """Pretend this machine has ``n`` CUDA devices (0: none); the device check's cache is cleared around it."""
    import torch

    from pytest_saecheck.plugin.settings import _device_problem

    def set_count(n: int) -> None:
        _device_problem.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    yield set_count
    _device_problem.cache_clear()


@pytest.mark.parametrize(
    ("device", "cuda_devices", "message"),
    [
        (
            "gpu",
            1,
            "*--saecheck-device: saecheck setting 'device' is 'gpu': torch knows no device type 'gpu' (did you mean 'cuda'?)*",
        ),
        (
            "cuda",
            0,
            "*saecheck setting 'device' is 'cuda': this machine has no cuda device available to torch*; use 'auto'*",
        ),
        (
            "cuda:3",
            2,
            "*saecheck setting 'device' is 'cuda:3': only 2 cuda devices visible (indices 0 to 1); use 'cuda' or an index below 2*",
        ),
    ],
)
def test_a_device_this_machine_has_not_got_is_a_usage_error(
    pytester: pytest.Pytester, fake_devices, device: str, cuda_devices: int, message: str
) -> None:
    fake_devices(cuda_devices)
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess(f"--saecheck-device={device}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    pytester.makeini(f"[pytest]\nsaecheck_device = {device}\n")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*saecheck_device: saecheck setting 'device' is*"])


def test_devices_this_machine_has_pass(pytester: pytest.Pytester, fake_devices) -> None:
    fake_devices(2)
    pytester.makepyfile("def test_nothing(): pass")
    for device in ("cpu", "auto", "cuda", "cuda:1", "meta"):
        pytester.runpytest_inprocess(f"--saecheck-device={device}").assert_outcomes(passed=1)


def test_a_markers_device_is_checked_when_its_test_starts(pytester: pytest.Pytester, fake_devices) -> None:
    fake_devices(0)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.saecheck(device="cuda")
        def test_on_gpu(saecheck_settings):
            pass

        def test_elsewhere():
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*ConfigError: saecheck setting 'device' is 'cuda': this machine has no cuda device*"]
    )


def test_the_device_check_keeps_the_plugin_import_torch_free() -> None:
    code = (
        "import sys, pytest_saecheck.plugin, pytest_saecheck.plugin.settings as c; "
        "c.SETTINGS_BY_NAME['device'].parse('device', 'gpu'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_usage_error_is_an_saecheck_error() -> None:
    assert issubclass(SettingsUsageError, ConfigError)
    assert issubclass(SettingsUsageError, SAECheckError)
    assert issubclass(SettingsUsageError, pytest.UsageError)


def test_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(n_tokens=64)
        def test_marked():
            pass
        """
    )
    pytester.runpytest_inprocess("--strict-markers").assert_outcomes(passed=1)
    result = pytester.runpytest_inprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.saecheck(model=..., sae=..., tokens=*"])


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_uses(saecheck_settings): pass")
    result = pytester.runpytest_inprocess("-p", "no:saecheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'saecheck_settings' not found*"])


def test_help_lists_every_option_and_ini_key(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--help")
    text = result.stdout.str()
    for setting in SETTINGS:
        assert setting.option in text
        assert setting.ini in text


def test_header_names_device_versions_and_defaults(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess("--saecheck-device=cpu", "--saecheck-n-tokens=4096")
    result.stdout.fnmatch_lines(
        [
            "saecheck: device=cpu (command line); pytest-saecheck *, torch *, transformer-lens *, sae-lens *",
            "saecheck defaults: model=-, sae=-, tokens=SAE's dataset, n_tokens=4096, sequential=false, context_size=from SAE, "
            "batch_size=16, dtype=float32, n_devices=-, backend=auto, device_map=-, max_memory=-, exclude_bos=true, exclude_special_tokens=true, exclude_token_ids=none, "
            "activation_scaler=auto, seed=0, scaling_law=chinchilla (not fitted), splice=separate, release_group_mib=auto, "
            "weight_budget_mib=2048, unavailable=skip, model_from_pretrained_kwargs=-, "
            "hook_name=-, hook_name_override=false, token_groups=-",
        ]
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1_000", 1000), (12, 12), ("  64 ", 64), (3.0, 3)],
)
def test_integer_settings_accept_readable_forms(value, expected) -> None:
    setting = next(s for s in SETTINGS if s.name == "n_tokens")
    assert setting.parse("n_tokens", value) == expected


@pytest.mark.parametrize("value", [True, "1e4", 2.5, "-3", None])
def test_integer_settings_reject_everything_else(value) -> None:
    setting = next(s for s in SETTINGS if s.name == "n_tokens")
    with pytest.raises(ConfigError, match="n_tokens"):
        setting.parse("n_tokens", value)


@pytest.mark.parametrize(
    ("value", "expected"), [("bf16", "bfloat16"), ("torch.float16", "float16"), ("auto", None)]
)
def test_dtype_aliases(value, expected) -> None:
    setting = next(s for s in SETTINGS if s.name == "dtype")
    assert setting.parse("dtype", value) == expected


def test_marker_kwargs_merges_closest_first() -> None:
    near, far = pytest.mark.saecheck(sae="near").mark, pytest.mark.saecheck(sae="far", model="m").mark
    merged, origin = marker_kwargs([near, far])
    assert merged == {"sae": "near", "model": "m"}
    assert origin == {"sae": "marker", "model": "marker"}


def test_settings_are_hashable_and_ignore_sources_in_equality() -> None:
    a = SAECheckSettings(sae="x", sources={"sae": "marker"})
    b = SAECheckSettings(sae="x", sources={"sae": "ini"})
    assert a == b and hash(a) == hash(b)


def test_saecheck_param_runs_one_case_per_sae_with_readable_ids(pytester: pytest.Pytester) -> None:
    (pytester.path / "local_sae").mkdir()
    pytester.makepyfile(
        """
        import pytest
        from pytest_saecheck.plugin.settings import saecheck_param

        @pytest.mark.parametrize(("min_score", "max_delta"), [
            saecheck_param("release/id", 0.9, 0.1),
            saecheck_param("local_sae", 0.5, 0.2, n_tokens=64),
            saecheck_param("demo/dead", 0.1, 0.9, id="dead"),
        ])
        def test_case(saecheck_settings, min_score, max_delta):
            print(f"CASE {saecheck_settings.sae} {saecheck_settings.n_tokens} {min_score} {max_delta}")
        """
    )
    result = pytester.runpytest_inprocess("-s")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*CASE release/id 16384 0.9 0.1",
            f"*CASE {pytester.path / 'local_sae'} 64 0.5 0.2",
            "*CASE demo/dead 16384 0.1 0.9",
        ]
    )
    ids = pytester.runpytest_inprocess("--collect-only", "-q")
    ids.stdout.fnmatch_lines(
        ["*::test_case[[]release/id[]]", "*::test_case[[]local_sae[]]", "*::test_case[[]dead[]]"]
    )


def test_saecheck_param_rejects_bad_keys_at_collection() -> None:
    from pytest_saecheck.plugin.settings import saecheck_param

    assert saecheck_param("demo/good").values == ("demo/good",)  # no thresholds: the value is the spec
    assert saecheck_param("demo/good", 0.9, 0.1).values == (0.9, 0.1)
    with pytest.raises(ConfigError, match="unknown key 'tokenz'"):
        saecheck_param("demo/good", 0.9, tokenz="demo")
    with pytest.raises(ConfigError, match="'n_tokens' must be an integer"):
        saecheck_param("demo/good", 0.9, n_tokens="all")


def test_override_beats_markers_and_a_shadowed_option_warns(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsaecheck_seed = 3\n")
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.saecheck(n_tokens=300, batch_size=4)

        def test_a(saecheck_settings):
            print(f"A {saecheck_settings.n_tokens} {saecheck_settings.batch_size} {saecheck_settings.seed}")
            print("SOURCES", dict(saecheck_settings.sources))

        @pytest.mark.saecheck(batch_size=8)
        def test_b(saecheck_settings):
            print(f"B {saecheck_settings.n_tokens} {saecheck_settings.batch_size} {saecheck_settings.seed}")
        """
    )
    # an option is shadowed by the markers: it has no effect, and the run says so once, naming the fix
    result = pytester.runpytest_inprocess("-s", "--saecheck-n-tokens=200000", "--saecheck-batch-size=4")
    result.assert_outcomes(passed=2, warnings=2)
    result.stdout.fnmatch_lines(["*A 300 4 3", "*B 300 8 3"])
    result.stdout.fnmatch_lines(
        [
            "*test_override_beats_markers_and_a_shadowed_option_warns.py:4: SettingShadowedWarning: "
            "--saecheck-n-tokens=200000 has no effect on 2 tests whose "
            "@pytest.mark.saecheck sets n_tokens (e.g. *::test_a: n_tokens=300 and 1 more): markers take "
            "precedence over options. To force it on every test: --saecheck-override n_tokens=200000",
        ]
    )
    # test_a's marker agrees with the option: only test_b misses it
    result.stdout.fnmatch_lines(
        ["*--saecheck-batch-size=4 has no effect on 1 test whose *(e.g. *::test_b: *"]
    )
    # the override beats every marker, and the ini key and the option still fill in the rest
    result = pytester.runpytest_inprocess(
        "-s", "--saecheck-override", "n_tokens=2_048", "--saecheck-override=batch-size=2", "-W", "error"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*A 2048 2 3", "*'n_tokens': 'override'*'seed': 'ini'*", "*B 2048 2 3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("n_tokens", "*--saecheck-override takes NAME=VALUE, got 'n_tokens'*"),
        ("n_token=5", "*unknown key 'n_token' in --saecheck-override (did you mean 'n_tokens'?)*"),
        (
            "n_tokens=-5",
            "*--saecheck-override n_tokens: saecheck setting 'n_tokens' must be at least 1, got -5*",
        ),
    ],
)
def test_a_malformed_override_is_a_usage_error(
    pytester: pytest.Pytester, override: str, message: str
) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess("--saecheck-override", override)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_the_marker_help_names_every_setting() -> None:
    from pytest_saecheck.plugin import MARKER_HELP
    from pytest_saecheck.plugin.settings import SETTINGS

    for setting in SETTINGS:
        assert f"{setting.name}=..." in MARKER_HELP, setting.name


def test_settings_dataclass_has_one_field_per_setting_with_its_default() -> None:
    """SAECheckSettings restates no default: each field's default is the one in config.SETTINGS."""
    import dataclasses

    from pytest_saecheck.plugin.settings import SETTINGS, SAECheckSettings

    fields = {f.name: f for f in dataclasses.fields(SAECheckSettings) if f.name not in ("sources", "written")}
    assert list(fields) == [setting.name for setting in SETTINGS]
    defaults = SAECheckSettings()
    for setting in SETTINGS:
        assert getattr(defaults, setting.name) is setting.default, setting.name


def test_help_texts_state_the_shared_defaults() -> None:
    """The defaults a help text names are the values used (one source each: pytest_saecheck.defaults, the
    scaling-law presets)."""
    from pytest_saecheck import defaults
    from pytest_saecheck.plugin.settings import SETTINGS_BY_NAME
    from pytest_saecheck.scaling import DEFAULT_LAW, PRESETS

    assert SETTINGS_BY_NAME["n_tokens"].default == defaults.DEFAULT_N_TOKENS
    assert f"(default {defaults.DEFAULT_N_TOKENS})" in SETTINGS_BY_NAME["n_tokens"].help
    assert SETTINGS_BY_NAME["batch_size"].default == defaults.DEFAULT_BATCH_SIZE
    assert f"(default {defaults.DEFAULT_BATCH_SIZE})" in SETTINGS_BY_NAME["batch_size"].help
    assert f"else {defaults.DEFAULT_CONTEXT_SIZE}" in SETTINGS_BY_NAME["context_size"].help
    law = SETTINGS_BY_NAME["scaling_law"]
    assert law.default is DEFAULT_LAW
    assert f'"{DEFAULT_LAW.name}", the default' in law.help
    for name in PRESETS:
        assert f'"{name}"' in law.help
    group = SETTINGS_BY_NAME["release_group_mib"]
    assert group.default is None and "auto (default)" in group.help


def test_demo_name_has_one_home() -> None:
    from pytest_saecheck import demo
    from pytest_saecheck.demo import build, language, tokenizer

    assert (
        demo.MODEL_NAME == build.MODEL_NAME == build.DATASET_PATH == tokenizer.TOKENIZER_NAME == language.NAME
    )
