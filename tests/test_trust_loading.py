"""Trust in loading: nothing an artefact, a typo or a loader fault can do fools the gate.

Artefacts run no code (model kwargs through an allow-list, torch.load only where it defaults to weights_only);
SAE configs are validated at load with the file and key named; what SAE Lens loads is checked against the
artefact's own record (shapes, orientation, dtypes, architecture, L0 against k); token files and baselines that
cannot be read end in the product's own errors; a checkpoint carries its activation scaler; a task the original
model cannot do is undefined; a transcoder's R² from run_evals is named for what it is.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import D_MODEL, HOOK, make_identity_sae, make_tiny_model, make_tokens, random_sae

import pytest_saecheck
from pytest_saecheck import loading, validate
from pytest_saecheck.checks import baselines
from pytest_saecheck.errors import ConfigError, LoadError, SAECheckWarning

# ---------------------------------------------------------------------------------------------------------
# helpers


def _set(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        mapping = mapping.setdefault(part, {})
    if value is _DELETE:
        mapping.pop(last, None)
    else:
        mapping[last] = value


_DELETE = object()


def edit_json(path: Path, **changes: Any) -> Path:
    """Rewrite the JSON file ``path`` with dotted-key ``changes`` (``metadata__prepend_bos`` for
    ``metadata.prepend_bos``)."""
    document = json.loads(path.read_text())
    for key, value in changes.items():
        _set(document, key.replace("__", "."), value)
    path.write_text(json.dumps(document))
    return path


def saved(sae: Any, directory: Path) -> Path:
    sae.save_model(directory)
    return directory


def topk_sae(k: int = 4, d_sae: int = 64) -> Any:
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=D_MODEL, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = HOOK
    return TopKSAE(cfg)


# ---------------------------------------------------------------------------------------------------------
# the battery: bad configs, token files and baselines, each the product's own error naming the file and key

BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("standard", {"metadata__prepend_bos": "false"}, "metadata.prepend_bos"),
    ("topk", {"k": -5}, "k"),
    ("topk", {"k": 100000}, "k"),
    ("topk", {"k": 16.5}, "k"),
    ("standard", {"d_sae": 0}, "d_sae"),
    ("standard", {"d_in": "32"}, "d_in"),
    ("standard", {"dtype": "float33"}, "dtype"),
    ("standard", {"normalize_activations": "sometimes"}, "normalize_activations"),
    ("standard", {"apply_b_dec_to_input": "no"}, "apply_b_dec_to_input"),
    ("standard", {"metadata__hook_head_index": -1}, "metadata.hook_head_index"),
    ("standard", {"metadata__hook_head_index": "2"}, "metadata.hook_head_index"),
    ("standard", {"metadata__context_size": 0}, "metadata.context_size"),
    ("standard", {"metadata__hook_name": 8}, "metadata.hook_name"),
    ("standard", {"metadata__model_from_pretrained_kwargs": [1]}, "metadata.model_from_pretrained_kwargs"),
    ("topk", {"architecture": "standard", "metadata__training_architecture": "topk"}, "architecture"),
    ("standard", {"metadata": "blocks.1"}, "metadata"),
]


@pytest.mark.parametrize(("kind", "changes", "key"), BAD_CONFIGS, ids=[f"{k}:{c}" for k, c, _ in BAD_CONFIGS])
def test_a_bad_sae_config_is_refused_at_load_naming_the_file_and_the_key(
    tmp_path: Path, kind: str, changes: dict[str, Any], key: str
) -> None:
    directory = saved(make_identity_sae() if kind == "standard" else topk_sae(), tmp_path / "sae")
    edit_json(directory / "cfg.json", **changes)
    with pytest.raises(ConfigError) as caught:
        loading.load_sae(str(directory), "cpu")
    message = str(caught.value)
    assert str(directory / "cfg.json") in message
    assert repr(key) in message


def test_the_unedited_configs_of_the_battery_load(tmp_path: Path) -> None:
    """The control: the same directories without the edits load (so each refusal is the edit's)."""
    for name, sae in (("standard", make_identity_sae()), ("topk", topk_sae())):
        loaded = loading.load_sae(str(saved(sae, tmp_path / name)), "cpu")
        assert loaded.cfg.d_sae == sae.cfg.d_sae


def _token_file(tmp_path: Path, kind: str) -> Path:
    if kind == "binary.txt":
        path = tmp_path / "tokens.txt"
        path.write_bytes(bytes(range(128, 256)) * 8)
    elif kind == "random_bytes.npy":
        path = tmp_path / "tokens.npy"
        path.write_bytes(np.random.default_rng(0).bytes(512))
    elif kind == "object_array.npy":
        path = tmp_path / "tokens.npy"
        np.save(path, np.array([[1, 2], [3, "x"]], dtype=object), allow_pickle=True)
    elif kind == "strings.npy":
        path = tmp_path / "tokens.npy"
        np.save(path, np.array([["a", "b"], ["c", "d"]]))
    elif kind == "broken.pt":
        path = tmp_path / "tokens.pt"
        path.write_bytes(b"not a zip file")
    elif kind == "broken.jsonl":
        path = tmp_path / "tokens.jsonl"
        path.write_text('{"text": "fine"}\n{"text": \n')
    return path


TOKEN_FILES = [
    "binary.txt",
    "random_bytes.npy",
    "object_array.npy",
    "strings.npy",
    "broken.pt",
    "broken.jsonl",
]


@pytest.mark.parametrize("kind", TOKEN_FILES)
def test_an_unreadable_token_file_is_a_load_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = _token_file(tmp_path, kind)
    with pytest.raises(LoadError) as caught:
        # few enough tokens for every file to pass the size bound (loading.tokens.token_capacity): the read fails
        loading.load_tokens(str(path), make_tiny_model(), n_tokens=8, context_size=4)
    message = str(caught.value)
    assert str(path) in message
    assert "allow_pickle=True" not in message  # numpy's own message invites unpickling: never passed on


@pytest.mark.parametrize("n_tokens", [0, -5, 2.5, True])
def test_load_tokens_refuses_a_token_count_that_is_not_positive(tmp_path: Path, n_tokens: Any) -> None:
    path = tmp_path / "tokens.npy"
    np.save(path, make_tokens().numpy())
    with pytest.raises(ConfigError, match="n_tokens must be a positive integer"):
        loading.load_tokens(str(path), make_tiny_model(), n_tokens=n_tokens, context_size=16)


def _baseline(n: int = 3) -> dict[str, Any]:
    return {
        "format": baselines.FORMAT,
        "format_version": baselines.FORMAT_VERSION,
        "key": "k",
        "tokens": {"ids_sha256": "a" * 64, "policy_sha256": "b" * 64, "n_sequences": n},
        "metrics": {"delta_ce": 0.1},
        "per_sequence": {name: [1.0] * n for name in baselines.REQUIRED_SUMS},
    }


BAD_BASELINES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no_n_ce", lambda d: d["per_sequence"].pop("n_ce"), "per_sequence.n_ce"),
    (
        "short_array",
        lambda d: d["per_sequence"].__setitem__("ce_sum_sae", [1.0, 2.0]),
        "per_sequence.ce_sum_sae",
    ),
    ("text_in_array", lambda d: d["per_sequence"].__setitem__("n_kl", [1, "x", 2]), "per_sequence.n_kl"),
    ("no_tokens", lambda d: d.pop("tokens"), "tokens"),
    ("no_ids", lambda d: d["tokens"].pop("ids_sha256"), "tokens.ids_sha256"),
    ("bad_n_sequences", lambda d: d["tokens"].__setitem__("n_sequences", "3"), "tokens.n_sequences"),
    ("metrics_text", lambda d: d["metrics"].__setitem__("delta_ce", "0.1"), "metrics"),
]


@pytest.mark.parametrize(("name", "edit", "key"), BAD_BASELINES, ids=[name for name, _, _ in BAD_BASELINES])
def test_a_malformed_baseline_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, name: str, edit: Callable[[dict[str, Any]], None], key: str
) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(_baseline()))
    assert baselines.load(path)["key"] == "k"  # the control loads
    document = _baseline()
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(baselines.BaselineError) as caught:
        baselines.load(path)
    assert str(path) in str(caught.value)
    assert f"'{key}'" in str(caught.value) or key in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# 1. artefacts run no code and fetch nothing


@pytest.mark.parametrize(
    "key",
    ["trust_remote_code", "revision", "code_revision", "cache_dir", "token", "checkpoint_index", "n_devices"],
)
def test_model_kwargs_from_an_artefact_outside_the_allow_list_are_refused(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate.artefact_model_kwargs({"center_writing_weights": False, key: True}, "the SAE 'x'")
    message = str(caught.value)
    assert repr(key) in message and "the SAE 'x'" in message
    assert "model_from_pretrained_kwargs" in message  # the explicit opt-in


def test_model_kwargs_that_shape_the_computation_pass_and_are_type_checked() -> None:
    kwargs = {
        "fold_ln": True,
        "n_ctx": 64,
        "first_n_layers": 2,
        "default_prepend_bos": False,
        "dtype": "bfloat16",
    }
    assert validate.artefact_model_kwargs(kwargs, "x") == kwargs
    assert validate.artefact_model_kwargs(None, "x") == {}
    for bad in ({"fold_ln": "true"}, {"n_ctx": 0}, {"dtype": "float8"}):
        with pytest.raises(ConfigError, match="model_from_pretrained_kwargs"):
            validate.artefact_model_kwargs(bad, "x")


REMOTE_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import GPT2LMHeadModel as EvilModel
"""


def test_an_sae_naming_a_model_with_remote_code_runs_nothing(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """The SAE names a model folder shipped with it, whose config.json maps AutoModel to a Python
    file there, and asks for trust_remote_code: the test errors with the refused key; nothing is imported."""
    marker = tmp_path / "remote_code_ran"
    model_dir = pytester.path / "evil_model"
    model_dir.mkdir()
    (model_dir / "modeling_evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["EvilModel"],
                "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"},
                "n_layer": 2,
                "n_embd": 32,
                "n_head": 4,
            }
        )
    )
    sae = make_identity_sae(
        model_name=str(model_dir), model_from_pretrained_kwargs={"trust_remote_code": True}
    )
    sae.save_model(pytester.path / "sae")
    np.save(pytester.path / "tokens.npy", make_tokens().numpy())
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.saecheck(sae="sae", tokens="tokens.npy", n_tokens=64, device="cpu")

        def test_gate(saecheck):
            saecheck.model
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*'trust_remote_code'*which an artefact may not choose*"])
    assert not marker.exists()


def test_a_model_path_chosen_by_the_sae_is_printed(tmp_path: Path) -> None:
    sae = make_identity_sae(model_name=str(tmp_path))
    with pytest.warns(SAECheckWarning, match=r"a local directory chosen by the SAE 'my-sae'"):
        assert loading.default_model_spec("my-sae", sae) == str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loading.default_model_spec("my-sae", make_identity_sae(model_name="gpt2")) == "gpt2"


def test_sae_lens_releases_are_refused_on_a_torch_that_unpickles_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(LoadError, match=r"torch\.load without weights_only.*2\.6 or later"):
        loading.load_sae_release("gpt2-small-res-jb", "blocks.8.hook_resid_pre", "cpu", None)


def test_pyproject_requires_a_torch_whose_load_defaults_to_weights_only() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in text


# ---------------------------------------------------------------------------------------------------------
# 3. what SAE Lens loads is checked, not trusted


def skip_transcoder(d: int = D_MODEL, d_sae: int = 48, seed: int = 0) -> Any:
    from sae_lens import SkipTranscoder, SkipTranscoderConfig

    cfg = SkipTranscoderConfig(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
    cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    tc = SkipTranscoder(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tc.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return tc


def _buggy_load_from_disk(monkeypatch: pytest.MonkeyPatch, corrupt: Callable[[Any], None]) -> None:
    """SAE Lens' disk loader with a planted fault (what a released loader bug does to the loaded object)."""
    import sae_lens

    original = sae_lens.SAE.load_from_disk.__func__  # type: ignore[attr-defined]

    def load(cls: Any, *args: Any, **kwargs: Any) -> Any:
        sae = original(cls, *args, **kwargs)
        corrupt(sae)
        return sae

    monkeypatch.setattr(sae_lens.SAE, "load_from_disk", classmethod(load))


def test_a_square_weight_loaded_transposed_is_refused_and_the_buggy_release_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sae_lens

    directory = saved(skip_transcoder(), tmp_path / "tc")
    assert loading.load_sae(str(directory), "cpu").W_skip.shape == (D_MODEL, D_MODEL)  # the control loads

    def transpose(sae: Any) -> None:
        sae.W_skip.data = sae.W_skip.data.T.contiguous()

    _buggy_load_from_disk(monkeypatch, transpose)
    monkeypatch.setattr(sae_lens, "__version__", "6.54.1")
    with pytest.raises(LoadError) as caught:
        loading.load_sae(str(directory), "cpu")
    message = str(caught.value)
    assert "W_skip was loaded transposed" in message
    assert "SAE Lens 6.54.1 (installed) has a known loader bug for affine (skip) transcoders" in message


def test_a_weight_whose_shape_contradicts_the_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = saved(make_identity_sae(), tmp_path / "sae")

    def transpose(sae: Any) -> None:
        sae.W_dec.data = sae.W_dec.data.T.contiguous()

    _buggy_load_from_disk(monkeypatch, transpose)
    with pytest.raises(
        LoadError, match=r"W_dec has shape \(32, 64\) \(transposed\), the config implies \(64, 32\)"
    ):
        loading.load_sae(str(directory), "cpu")


def test_weights_in_several_dtypes_are_refused_naming_them() -> None:
    tc = skip_transcoder().to(torch.bfloat16)
    tc.W_skip.data = tc.W_skip.data.float()
    with pytest.raises(LoadError, match=r"several dtypes \(bfloat16: .*; float32: W_skip\)"):
        validate.check_loaded(tc, "release 'r', id 'i'")


def test_a_release_loader_error_becomes_a_load_error_naming_release_id_and_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sae_lens

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Error(s) in loading state_dict for TopKSAE: Unexpected key(s): 'threshold'")

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", fails)
    with pytest.raises(LoadError) as caught:
        loading.load_sae_release("gpt2-small-res-jb", "blocks.8.hook_resid_pre", "cpu", None)
    message = str(caught.value)
    assert "'gpt2-small-res-jb'" in message and "'blocks.8.hook_resid_pre'" in message
    assert f"SAE Lens {sae_lens.__version__}" in message
    assert "Unexpected key(s): 'threshold'" in message


def _jumprelu_as_trained(threshold: float, k: int, saved_by: str) -> Any:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    cfg = JumpReLUSAEConfig(d_in=D_MODEL, d_sae=64)
    cfg.metadata.hook_name = HOOK
    cfg.metadata.training_architecture = "batchtopk"
    cfg.metadata.training_architecture_details = {"k": k}
    cfg.metadata.sae_lens_training_version = saved_by
    sae = JumpReLUSAE(cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=generator) / D_MODEL**0.5)
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=generator) * 0.1)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(threshold)
    return sae


def test_a_batchtopk_sae_whose_l0_contradicts_its_k_is_refused_naming_the_saving_bug() -> None:
    model, tokens = make_tiny_model(), make_tokens(8)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, D_MODEL)
    k = 8
    probe = _jumprelu_as_trained(0.0, k, "6.54.8")
    pre = (x - probe.b_dec) @ probe.W_enc + probe.b_enc
    # keeps k of 64 latents per token on average
    right = float(torch.quantile(pre.detach().flatten(), 1 - k / 64))
    good = pytest_saecheck.evaluate(model, _jumprelu_as_trained(right, k, "6.54.8"), tokens)
    assert good.metrics["l0"] == pytest.approx(k, rel=0.2)
    pytest_saecheck.assert_ce_recovery(good, metric="delta_ce", max_value=100.0)  # the control passes
    bad = pytest_saecheck.evaluate(model, _jumprelu_as_trained(right / 4, k, "6.54.8"), tokens)
    assert bad.metrics["l0"] > 2 * k
    with pytest.raises(LoadError) as caught:
        pytest_saecheck.assert_ce_recovery(bad, metric="delta_ce", max_value=100.0)
    message = str(caught.value)
    assert "trained as batchtopk with k = 8" in message
    assert "SAE Lens 6.54.8 (that saved this artefact) has a known loader bug" in message


def test_a_topk_sae_can_never_exceed_its_k() -> None:
    assert validate.check_sparsity({"k": 4, "architecture": "topk"}, 4.0) is None
    assert "more than the k = 4" in (validate.check_sparsity({"k": 4, "architecture": "topk"}, 4.5) or "")


def test_the_known_bug_table_covers_exactly_its_releases() -> None:
    bug = validate.KNOWN_LOADER_BUGS["w_skip_transposed"]
    assert [bug.covers(v) for v in ("6.23.9", "6.24.0", "6.54.1", "6.54.2", None, "dev")] == [
        False,
        True,
        True,
        False,
        False,
        False,
    ]


# ---------------------------------------------------------------------------------------------------------
# 4. configs read as written


def test_an_in_memory_sae_with_a_bad_k_is_refused_before_evaluation() -> None:
    sae = topk_sae(k=4)
    sae.cfg.k = 100000
    with pytest.raises(ConfigError, match=r"key 'k' must be an integer from 1 to d_sae \(64\)"):
        pytest_saecheck.evaluate(make_tiny_model(), sae, make_tokens(4))


def test_a_head_index_beyond_the_models_heads_is_refused_naming_the_key() -> None:
    sae = random_sae("blocks.0.attn.hook_z", head=99)
    with pytest.raises(
        ConfigError, match=r"metadata.hook_head_index is 99, but the model's attention layers have 4"
    ):
        pytest_saecheck.evaluate(make_tiny_model(), sae, make_tokens(4))


def test_prepend_bos_must_be_a_boolean_wherever_the_sae_came_from() -> None:
    sae = make_identity_sae(prepend_bos="false")
    with pytest.raises(ConfigError, match=r"metadata\.prepend_bos must be true or false"):
        loading.prepend_bos(sae)


# ---------------------------------------------------------------------------------------------------------
# 12. a checkpoint carries its activation scaler


def test_load_sae_of_a_checkpoint_carries_its_activation_scaler(tmp_path: Path) -> None:
    sae = random_sae(HOOK, d_in=D_MODEL, d_sae=64, seed=2)
    sae.cfg.normalize_activations = "expected_average_only_in"
    directory = saved(sae, tmp_path / "checkpoint")
    (directory / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37}))
    model, tokens = make_tiny_model(), make_tokens(6)
    loaded = loading.load_sae(str(directory), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        notebook = pytest_saecheck.evaluate(model, loaded, tokens)
        plugin = pytest_saecheck.evaluate(model, sae, tokens, activation_scaler=str(directory))
        estimated = pytest_saecheck.evaluate(model, sae, tokens)
    assert notebook.normalisation["source"] == "activation_scaler.json"
    assert notebook.metrics["delta_ce"] == plugin.metrics["delta_ce"]
    assert notebook.metrics["delta_ce"] != estimated.metrics["delta_ce"]


# ---------------------------------------------------------------------------------------------------------
# 13. a task the original model cannot do


def test_a_task_the_original_model_cannot_do_is_undefined_not_passed() -> None:
    from pytest_saecheck import demo
    from pytest_saecheck.checks.tasks import Task, TaskItem
    from pytest_saecheck.demo.tasks import demo_task

    model = demo.load_model("cpu")
    sae = demo.load_sae("good", device="cpu")
    task = demo_task("copying", n_prompts=8, seed=1)
    swapped = Task(
        "copying_swapped",
        tuple(TaskItem(item.prompt, item.wrong[0], (item.answer,)) for item in task.items),
    )
    pytest_saecheck.assert_task_preserved((model, sae), task, max_accuracy_drop=0.5)  # the model can copy
    with pytest.raises(AssertionError) as caught:
        pytest_saecheck.assert_task_preserved((model, sae), swapped, max_accuracy_drop=0.5)
    assert "accuracy_drop is undefined: the original model does no better than chance" in str(caught.value)
    assert "chance 0.5" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# 14. a transcoder's R² from run_evals


def test_a_transcoders_input_hook_r2_is_named_as_the_known_fault() -> None:
    from factories import mlp_transcoder, relu_model

    model = relu_model()
    evaluation = pytest_saecheck.evaluate(model, mlp_transcoder(model, 1), make_tokens(6))
    assert evaluation.metrics["explained_variance"] > 0.99
    with pytest.raises(AssertionError) as caught:
        pytest_saecheck.assert_r2_matches_legacy(evaluation, reported=0.088)
    message = str(caught.value)
    assert "the SAE is a transcoder (blocks.1.ln2.hook_normalized → blocks.1.hook_mlp_out)" in message
    assert (
        "run_evals measures every dictionary's reconstruction against the activation at its input hook"
        in message
    )


@pytest.mark.parametrize(
    ("release", "sae_id", "version", "named"),
    [
        (
            "sae_bench_gemma-2-2b_topk_width-2pow12_date-1109",
            "blocks.12.hook_resid_post__trainer_0",
            "6.51.7",
            "dictionary_learning TopK checkpoints",
        ),
        (
            "gemma-scope-2-4b-pt-transcoders-all",
            "layer_0_width_16k_l0_big_affine",
            "6.49.1",
            "skip transcoders in half precision",
        ),
    ],
)
def test_a_release_loader_error_names_the_known_bug_of_the_installed_sae_lens(
    monkeypatch: pytest.MonkeyPatch, release: str, sae_id: str, version: str, named: str
) -> None:
    import sae_lens

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Error(s) in loading state_dict")

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", fails)
    monkeypatch.setattr(sae_lens, "__version__", version)
    with pytest.raises(
        LoadError, match=f"SAE Lens {version} \\(installed\\) has a known loader bug for {named}"
    ):
        loading.load_sae_release(release, sae_id, "cpu", None)


def test_a_release_skip_transcoder_on_a_transposing_sae_lens_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sae_lens

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", lambda *args, **kwargs: skip_transcoder())
    release, sae_id = "gemma-scope-2-4b-pt-transcoders-all", "layer_0_width_16k_l0_big_affine"
    assert loading.load_sae_release(release, sae_id, "cpu", None).W_skip.shape == (D_MODEL, D_MODEL)
    monkeypatch.setattr(sae_lens, "__version__", "6.30.0")
    with pytest.raises(
        LoadError, match=r"is a skip transcoder, and SAE Lens 6\.30\.0 \(installed\) has a known"
    ):
        loading.load_sae_release(release, sae_id, "cpu", None)


def test_a_config_saved_before_sae_lens_6_still_loads(tmp_path: Path) -> None:
    """The flat layout (hook_point, hook_point_head_index, a boolean normalize_activations) is not refused."""
    directory = saved(make_identity_sae(), tmp_path / "old")
    (directory / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": D_MODEL,
                "d_sae": 2 * D_MODEL,
                "dtype": "float32",
                "device": "cpu",
                "hook_point": HOOK,
                "hook_point_layer": 1,
                "hook_point_head_index": None,
                "model_name": "tiny",
                "context_size": 16,
                "prepend_bos": True,
                "apply_b_dec_to_input": False,
                "normalize_activations": False,
                "activation_fn_str": "relu",
                "dataset_path": "tokens",
                "finetuning_scaling_factor": False,
            }
        )
    )
    sae = loading.load_sae(str(directory), "cpu")
    assert sae.cfg.metadata.hook_name == HOOK
    x = torch.randn(3, D_MODEL)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x)
