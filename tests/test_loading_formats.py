"""Loaders: local model directories as trained, SAE formats (nested metadata, sparsify, dictionary_learning),
relative paths, token rows, and the public loaders."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import (
    CORPUS,
    D_MODEL,
    HOOK,
    TESTS_DIR,
    build_tokenizer,
    make_identity_sae,
    make_sparse_coder,
    make_tiny_model,
)

import pytest_saecheck
from pytest_saecheck import loading
from pytest_saecheck.errors import ConfigError, LoadError
from pytest_saecheck.loading.tokens import token_capacity

# --------------------------------------------------------------------------------------------------------
# local Hugging Face directories: no processing unless asked, n_ctx, tokenizers


def save_gpt2(directory: Path, *, tokenizer: bool = True, shift: float = 0.5) -> Path:
    """A tiny GPT-2 saved by transformers 5 as it is (config.json without n_ctx), embeddings shifted so that
    centring the writing weights changes the residual stream."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer(CORPUS * 20)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=48, vocab_size=len(tok), bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.add_(shift)
    model.save_pretrained(directory)
    if tokenizer:
        tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


def test_gpt2_saved_by_transformers_5_loads_with_n_ctx_from_n_positions(gpt2_dir: Path) -> None:
    assert "n_ctx" not in json.loads((gpt2_dir / "config.json").read_text())
    model = loading.builtin_load_model(str(gpt2_dir), "cpu", None)
    assert model.cfg.n_ctx == 48
    assert model.cfg.model_name == "tiny-gpt2"


def test_a_missing_config_field_is_named_not_blamed_on_the_architecture(
    gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading.models, "_LEGACY_CONFIG_FIELDS", {})  # as if nothing filled n_ctx in
    with pytest.raises(LoadError, match=r"has no field 'n_ctx'.*add it to config.json") as caught:
        loading.builtin_load_model(str(gpt2_dir), "cpu", None)
    assert "not supported" not in str(caught.value)


def test_local_directory_is_loaded_without_processing_by_default(gpt2_dir: Path) -> None:
    """Unprocessed: TransformerLens' residual stream equals the HF model's hidden states exactly."""
    from transformers import AutoModelForCausalLM

    model, how = loading.builtin_load_model_recorded(str(gpt2_dir), "cpu", None)
    assert how.loader == loading.HF_DIRECTORY_LOADER
    assert how.to_dict()["kwargs"] == {**dict.fromkeys(loading.PROCESSING_FLAGS, False), "dtype": "float32"}
    tokens = model.to_tokens(CORPUS[1])
    reference = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        hidden = reference(tokens, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hidden[1], atol=1e-5, rtol=1e-5)


def test_local_directory_honours_processing_kwargs(gpt2_dir: Path) -> None:
    plain = loading.builtin_load_model(str(gpt2_dir), "cpu", None)
    kwargs = {
        "fold_ln": True,
        "center_writing_weights": True,
        "center_unembed": True,
        "fold_value_biases": True,
    }
    processed, how = loading.builtin_load_model_recorded(str(gpt2_dir), "cpu", None, kwargs)
    assert {key: how.kwargs[key] for key in kwargs} == kwargs
    tokens = plain.to_tokens(CORPUS[2])
    with torch.no_grad():
        resid_plain = plain.run_with_cache(tokens)[1]["blocks.1.hook_resid_pre"]
        resid_processed = processed.run_with_cache(tokens)[1]["blocks.1.hook_resid_pre"]
        log_plain, log_processed = plain(tokens).log_softmax(-1), processed(tokens).log_softmax(-1)
    # the same function, a different residual stream: centring removed the mean along the all-ones direction
    torch.testing.assert_close(log_plain, log_processed, atol=1e-4, rtol=1e-4)
    assert resid_plain.mean(-1).abs().mean() > 0.3
    assert resid_processed.mean(-1).abs().max() < 1e-4
    # and other kwargs go where from_pretrained puts them
    short = loading.builtin_load_model(str(gpt2_dir), "cpu", "float64", {"n_ctx": 16, "dtype": "float32"})
    assert short.cfg.n_ctx == 16 and short.cfg.dtype == torch.float64  # the dtype setting wins


def test_model_loader_kwargs() -> None:
    assert loading.model_loader_kwargs(None, None) == {"dtype": "float32"}
    assert loading.model_loader_kwargs({"torch_dtype": "bfloat16", "device": "cuda"}, None) == {
        "torch_dtype": "bfloat16"
    }
    assert loading.model_loader_kwargs({"torch_dtype": "bfloat16"}, "float64") == {"dtype": "float64"}


def test_directory_without_tokenizer_files_says_so(tmp_path: Path) -> None:
    directory = save_gpt2(tmp_path / "no-tokenizer", tokenizer=False)
    with pytest.warns(UserWarning, match=r"no tokenizer in .*no-tokenizer"):
        model = loading.builtin_load_model(str(directory), "cpu", None)
    assert loading.usable_tokenizer(model) is None
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS * 50))
    with pytest.raises(LoadError, match=r"holds text but the model has no tokenizer \(none, or an empty one"):
        loading.load_tokens(str(tmp_path / "corpus.txt"), model, None, n_tokens=64, context_size=16)


def test_an_empty_tokenizer_on_a_model_is_not_used(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    directory = save_gpt2(tmp_path / "m", tokenizer=False)
    empty = AutoTokenizer.from_pretrained(directory)  # transformers 5: an empty tokenizer, no error
    model = make_tiny_model()
    model.tokenizer = empty
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS * 50))
    with pytest.raises(LoadError, match="no tokenizer"):
        loading.load_tokens(str(tmp_path / "corpus.txt"), model, None, n_tokens=64, context_size=16)


def test_hook_loaders_receive_the_kwargs(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        textwrap.dedent(
            f"""
            import sys

            sys.path.insert(0, {str(TESTS_DIR)!r})
            from factories import make_tiny_model

            SEEN = []

            def pytest_saecheck_load_model(spec, device, model_from_pretrained_kwargs):
                SEEN.append(dict(model_from_pretrained_kwargs))
                return make_tiny_model(device)
            """
        )
    )
    tiny_pytester.makepyfile(
        test_hook=textwrap.dedent(
            """
            import pytest
            from conftest import SEEN

            @pytest.mark.saecheck(sae="sae_identity", model="anything", model_from_pretrained_kwargs={"fold_ln": False})
            def test_kwargs(saecheck):
                saecheck.model
                assert SEEN == [{"fold_ln": False}]
                assert saecheck.model_loading.loader == "pytest_saecheck_load_model hook"
            """
        ),
    )
    tiny_pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


# --------------------------------------------------------------------------------------------------------
# SAE formats


@pytest.mark.filterwarnings("ignore:\\s*This SAE has non-empty model_from_pretrained_kwargs")
def test_nested_metadata_without_a_version_keeps_its_hook(tmp_path: Path) -> None:
    make_identity_sae(model_from_pretrained_kwargs={"center_writing_weights": False}).save_model(
        tmp_path / "sae"
    )
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["metadata"]["sae_lens_version"]  # what SAE Lens' own converters return
    cfg.pop("sae_lens_version", None)
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    sae = loading.builtin_load_sae(str(tmp_path / "sae"), "cpu", None)
    assert sae.cfg.metadata.hook_name == HOOK
    assert sae.cfg.metadata.model_name == "tiny"
    assert sae.cfg.metadata.model_from_pretrained_kwargs == {"center_writing_weights": False}


def test_sparsify_directory_is_converted_faithfully(tmp_path: Path) -> None:
    coder = make_sparse_coder()
    coder.save_to_disk(tmp_path / "run" / "layers.1")
    sae = loading.builtin_load_sae(str(tmp_path / "run" / "layers.1"), "cpu", None)
    assert type(sae).__name__ == "TopKSAE"
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata.model_name is None  # no run config.json beside it: unknown, not guessed
    x = torch.randn(50, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), coder(x).sae_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"contradicts the SAE's own record.*hook_name_override=True"):
        loading.builtin_load_sae(str(tmp_path / "run" / "layers.1"), "cpu", None, "blocks.1.hook_resid_pre")
    same = loading.builtin_load_sae(
        str(tmp_path / "run" / "layers.1"), "cpu", None, "blocks.2.hook_resid_pre"
    )
    assert (
        same.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    )  # the same tensor, named from the next block
    overridden = loading.builtin_load_sae(
        str(tmp_path / "run" / "layers.1"), "cpu", None, "blocks.1.hook_resid_pre", hook_name_override=True
    )
    assert overridden.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    assert overridden.cfg.metadata.hook_name_override is True


def test_sparsify_folder_that_is_not_a_layer_keeps_its_module_path(tmp_path: Path) -> None:
    coder = make_sparse_coder()
    coder.save_to_disk(tmp_path / "run" / "h.1")
    (tmp_path / "run" / "config.json").write_text(
        json.dumps({"model": "gpt2", "dataset": "x", "ctx_len": 64})
    )
    placed_later = loading.builtin_load_sae(str(tmp_path / "run" / "h.1"), "cpu", None)
    assert placed_later.cfg.metadata.hook_name == "h.1"  # sparsify's hookpoint: resolved at the model
    sae = loading.builtin_load_sae(str(tmp_path / "run" / "h.1"), "cpu", None, "blocks.1.hook_resid_post")
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata.model_name == "gpt2" and sae.cfg.metadata.context_size == 64
    x = torch.randn(20, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), coder(x).sae_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [({"transcode": True}, "transcoder"), ({"skip_connection": True}, "skip connection")],
)
def test_sparsify_directories_that_would_convert_wrongly_are_refused(
    tmp_path: Path, cfg: dict[str, Any], message: str
) -> None:
    make_sparse_coder(**cfg).save_to_disk(tmp_path / "layers.0")
    with pytest.raises(
        LoadError, match=rf"EleutherAI sparsify directory.*{message}.*SparseCoder.load_from_disk"
    ):
        loading.builtin_load_sae(str(tmp_path / "layers.0"), "cpu", None)


def test_sparsify_sae_is_evaluated_through_the_plugin(tiny_pytester: pytest.Pytester) -> None:
    make_sparse_coder().save_to_disk(tiny_pytester.path / "run" / "layers.0")
    tiny_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.saecheck(sae="run/layers.0", model="tiny", tokens="tokens.npy", n_tokens=128, context_size=16,
                              hook_name="blocks.1.hook_resid_pre")
        def test_sparsify(saecheck):
            assert saecheck.sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
            assert 0 < saecheck.metrics["l0"] <= 6
        """
    )
    tiny_pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_dictionary_learning_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    directory = tmp_path / "trainer_0"
    directory.mkdir()
    torch.save({"encoder.weight": torch.zeros(8, 4)}, directory / "ae.pt")
    (directory / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    with pytest.raises(
        LoadError, match=r"is a dictionary_learning checkpoint.*only from the Hugging Face Hub"
    ):
        loading.builtin_load_sae(str(directory), "cpu", None)


# --------------------------------------------------------------------------------------------------------
# token rows


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"text": None}, r"'text' is null, not text"),
        ({"text": 17}, r"'text' is a int \(17\), not text"),
        ({"text": [1, 2, 3]}, r"'text' is a list \(\[1, 2, 3\]\), not text"),
        ({"input_ids": [1, 2.5]}, r"'input_ids' holds 2.5, not an integer token id"),
        ({"input_ids": None}, r"'input_ids' is null; expected a list of integer token ids"),
    ],
)
def test_jsonl_rows_name_the_file_line_and_problem(tmp_path: Path, row: dict[str, Any], problem: str) -> None:
    path = tmp_path / "data.jsonl"
    first = {"input_ids": [1, 2, 3]} if "input_ids" in row else {"text": CORPUS[0]}
    path.write_text(json.dumps(first) + "\n\n" + json.dumps(row) + "\n")
    model = make_tiny_model(tokenizer=_tokenizer(tmp_path))
    capacity = token_capacity(path)  # as many tokens as the file can hold: every row is read
    assert capacity is not None
    with pytest.raises(LoadError, match=rf"data.jsonl', line 3: {problem}"):
        loading.load_tokens(str(path), model, None, n_tokens=capacity // 4 * 4, context_size=4)


def _tokenizer(tmp_path: Path) -> Any:
    from transformers import AutoTokenizer

    build_tokenizer(CORPUS * 20).save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


# --------------------------------------------------------------------------------------------------------
# relative paths


SHOW = """
import json

def test_show(saecheck_settings):
    print("SETTINGS " + json.dumps({k: saecheck_settings.to_dict()[k] for k in ("sae", "tokens", "model")}))
"""


def _shown(result: pytest.RunResult) -> dict[str, Any]:
    line = next(line for line in result.outlines if "SETTINGS " in line)
    return json.loads(line.split("SETTINGS ", 1)[1])


def test_relative_paths_resolve_against_where_they_were_written(pytester: pytest.Pytester) -> None:
    project = pytester.path / "proj"
    (project / "tests" / "saes" / "mine").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "data" / "tokens.npy").write_bytes(b"")
    (project / "pytest.ini").write_text(
        "[pytest]\nsaecheck_tokens = data/tokens.npy\nsaecheck_model = ./models/m\n"
    )
    (project / "tests" / "test_paths.py").write_text(
        'import pytest\npytestmark = pytest.mark.saecheck(sae="saes/mine")\n' + SHOW
    )
    result = pytester.runpytest_inprocess("proj", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert _shown(result) == {
        "sae": str(project / "tests" / "saes" / "mine"),  # marker: the test file's directory, no ./ needed
        "tokens": str(project / "data" / "tokens.npy"),  # ini: the ini file's directory
        "model": str(project / "models" / "m"),  # written as a path: absolute even though missing
    }
    result = pytester.runpytest_inprocess("proj", "-s", "-p", "no:cacheprovider", "--saecheck-model=gpt2")
    assert _shown(result)["model"] == "gpt2"  # a name, not a path


def test_a_missing_relative_path_names_the_absolute_path_tried(pytester: pytest.Pytester) -> None:
    (pytester.path / "sub").mkdir()
    (pytester.path / "sub" / "test_missing.py").write_text(
        "import pytest\n\n"
        '@pytest.mark.saecheck(sae="./nowhere", model="demo", tokens="demo")\n'
        "def test_it(saecheck):\n    saecheck.sae\n"
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"*SAE directory * does not exist (looked for {pytester.path / 'sub' / 'nowhere'})*"]
    )


def test_resolve_path_spec() -> None:
    from pytest_saecheck.plugin.settings import resolve_path_spec

    base = Path(__file__).parent
    assert resolve_path_spec("conftest.py", base) == str(base / "conftest.py")
    assert resolve_path_spec("gpt2-small-res-jb/blocks.8.hook_resid_pre", base) == (
        "gpt2-small-res-jb/blocks.8.hook_resid_pre"
    )
    assert resolve_path_spec("hf:owner/data", base) == "hf:owner/data"
    assert resolve_path_spec("../x", base) == str(base.parent / "x")
    assert resolve_path_spec("demo/good", base) == "demo/good"


# --------------------------------------------------------------------------------------------------------
# public loaders


def test_loaders_are_exported_and_readme_example_runs() -> None:
    assert pytest_saecheck.load_model is loading.load_model
    assert pytest_saecheck.load_sae is loading.load_sae
    assert pytest_saecheck.load_tokens is loading.load_tokens
    readme = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "evaluate.md").read_text()
    start = readme.index("<!-- evaluate-without-pytest -->")
    code = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), namespace)
    evaluation = namespace["evaluation"]
    assert 0.5 < evaluation.metrics["explained_variance"] <= 1
    assert isinstance(namespace["tokens"], torch.Tensor) and np.ndim(namespace["tokens"]) == 2
