"""Loaders: spec resolution, local SAE and HF model directories, token files, offline failures, hooks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import (
    CORPUS,
    D_MODEL,
    HOOK,
    build_tokenizer,
    make_identity_sae,
    make_tiny_model,
    make_token_ids,
)

from pytest_saecheck import loading
from pytest_saecheck.errors import (
    ConfigError,
    LoadError,
    SAECheckError,
    ShapeMismatchError,
    WeightsUnavailableError,
)

# --------------------------------------------------------------------------------------------------------
# spec resolution


def test_release_specs_split_at_the_first_slash() -> None:
    assert loading.split_release("gpt2-small-res-jb/blocks.8.hook_resid_pre") == (
        "gpt2-small-res-jb",
        "blocks.8.hook_resid_pre",
    )
    assert loading.split_release("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71") == (
        "gemma-scope-2b-pt-res",
        "layer_20/width_16k/average_l0_71",
    )


@pytest.mark.parametrize("spec", ["no-slash", "/leading", "trailing/"])
def test_malformed_release_specs_name_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ConfigError, match="release/id"):
        loading.split_release(spec)


def test_demo_sae_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_saecheck.demo.plugin import sae_name

    assert sae_name("demo/good") == "good"
    assert sae_name("gpt2-small-res-jb/x") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "good").mkdir(parents=True)
    assert sae_name("demo/good") is None, "an existing local path wins over the demo name"


def test_a_local_path_wins_over_a_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_identity_sae().save_model(tmp_path / "my-release" / "my-id")
    sae = loading.builtin_load_sae("my-release/my-id", "cpu", None)
    assert sae.cfg.d_in == D_MODEL


# --------------------------------------------------------------------------------------------------------
# SAEs


def test_local_sae_directory_round_trips(tmp_path: Path) -> None:
    original = make_identity_sae()
    original.save_model(tmp_path / "sae")
    loaded = loading.builtin_load_sae(str(tmp_path / "sae"), "cpu", "float64")
    assert loaded.cfg.metadata.hook_name == HOOK
    assert loaded.W_dec.dtype == torch.float64
    torch.testing.assert_close(loaded.W_enc.float(), original.W_enc)


def test_directory_without_cfg_json_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(LoadError, match=r"no cfg.json in .*weights\); save one with sae.save_model"):
        loading.builtin_load_sae(str(tmp_path / "weights"), "cpu", None)


def test_missing_explicit_path_is_a_load_error() -> None:
    with pytest.raises(LoadError, match=r"SAE directory '\./nowhere/sae' does not exist"):
        loading.builtin_load_sae("./nowhere/sae", "cpu", None)
    with pytest.raises(LoadError, match=r"model directory '\./nowhere' does not exist"):
        loading.builtin_load_model("./nowhere", "cpu", None)


def test_unknown_release_suggests_close_names() -> None:
    with pytest.raises(
        LoadError, match=r"'gpt2-small-res-jbb' is not an SAE Lens release.*gpt2-small-res-jb"
    ):
        loading.builtin_load_sae("gpt2-small-res-jbb/blocks.8.hook_resid_pre", "cpu", None)


def test_a_missing_sae_inside_an_existing_directory_names_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``saes/nope`` where ``saes/`` exists is a missing local SAE, not an unknown release (found by a new user)."""
    (tmp_path / "saes").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        LoadError, match=r"no SAE directory at .*saes/nope \(the directory .*saes exists"
    ) as error:
        loading.builtin_load_sae("saes/nope", "cpu", None)
    assert str(tmp_path / "saes" / "nope") in str(error.value)


def test_unknown_sae_id_in_a_known_release() -> None:
    with pytest.raises(LoadError, match=r"has no SAE id 'blocks.88.hook_resid_pre'.*blocks.8.hook_resid_pre"):
        loading.builtin_load_sae("gpt2-small-res-jb/blocks.88.hook_resid_pre", "cpu", None)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode as huggingface_hub sees it at call time (the env var is only read at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.usefixtures("hub_offline")
def test_release_not_cached_offline_says_what_to_download() -> None:
    with pytest.raises(WeightsUnavailableError) as caught:
        loading.builtin_load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre", "cpu", None)
    message = str(caught.value)
    assert "SAE gpt2-small-res-jb/blocks.8.hook_resid_pre" in message
    assert "jbloom/GPT2-Small-SAEs-Reformatted" in message  # the HF repo behind the release
    assert "SAE.from_pretrained('gpt2-small-res-jb', 'blocks.8.hook_resid_pre')" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message


@pytest.mark.usefixtures("hub_offline")
def test_model_not_cached_offline_says_what_to_download() -> None:
    with pytest.raises(
        WeightsUnavailableError, match=r"model 'gpt2' is not available.*from_pretrained\('gpt2'\)"
    ):
        loading.builtin_load_model("gpt2", "cpu", None)


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(
        LoadError,
        match=r"'gpt3' is neither a local directory \(looked for .*gpt3\) nor a model TransformerLens knows",
    ):
        loading.builtin_load_model("gpt3", "cpu", None)


def test_offline_error_detection_walks_the_exception_chain() -> None:
    try:
        try:
            raise ConnectionError("no route")
        except ConnectionError as inner:
            raise OSError("while loading") from inner
    except OSError as outer:
        assert loading.is_unavailable_error(outer)
    assert not loading.is_unavailable_error(ValueError("bad config"))
    assert issubclass(WeightsUnavailableError, SAECheckError)


# --------------------------------------------------------------------------------------------------------
# a local Hugging Face model directory


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    tokenizer = build_tokenizer(CORPUS * 20)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        n_ctx=64,  # TransformerLens reads n_ctx; GPT-2 checkpoints carry it
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_local_hf_directory_loads_with_identical_logits(hf_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = loading.builtin_load_model(str(hf_model_dir), "cpu", None)
    reference = AutoModelForCausalLM.from_pretrained(hf_model_dir).eval()
    tokens = model.to_tokens(CORPUS[0])
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = reference(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 32
    assert "blocks.1.hook_resid_pre" in model.hook_dict


def test_n_devices_reaches_transformer_lens_placement(hf_model_dir: Path) -> None:
    """``n_devices`` (the setting, or model_from_pretrained_kwargs) goes to TransformerLens' config, which places
    the blocks; with one device the logits are those of the default load."""
    default = loading.builtin_load_model(str(hf_model_dir), "cpu", None)
    spread = loading.builtin_load_model(str(hf_model_dir), "cpu", None, {"n_devices": 1})
    assert spread.cfg.n_devices == 1
    tokens = default.to_tokens(CORPUS[0])
    with torch.no_grad():
        torch.testing.assert_close(spread(tokens), default(tokens), atol=0, rtol=0)


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"no config\.json"):
        loading.builtin_load_model(str(tmp_path), "cpu", None)


# --------------------------------------------------------------------------------------------------------
# token sources


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(CORPUS * 20).save_pretrained(
        directory
    )  # TransformerLens wants a tokenizer loaded from disk
    return make_tiny_model(tokenizer=AutoTokenizer.from_pretrained(directory))


def _check_packed(tokens: torch.Tensor, n_sequences: int, context_size: int, bos: int | None) -> None:
    assert tokens.dtype == torch.long
    assert tuple(tokens.shape) == (n_sequences, context_size)
    if bos is not None:
        assert bool((tokens[:, 0] == bos).all()), "every row starts with BOS"


def _expected_ids(model: Any, texts: list[str]) -> list[int]:
    bos = model.tokenizer.bos_token_id
    ids: list[int] = []
    for text in texts:
        ids += [bos, *model.to_tokens(text, prepend_bos=False)[0].tolist()]
    return ids


def test_text_file_is_tokenised_and_packed_like_sae_lens(tmp_path: Path, text_model: Any) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 10), encoding="utf-8")
    sae = make_identity_sae()
    tokens = loading.load_tokens(str(path), text_model, sae, n_tokens=48, context_size=8, seed=0)
    _check_packed(tokens, 6, 8, text_model.tokenizer.bos_token_id)
    # documents are separated by BOS; each row starts with BOS and continues the stream (SAE Lens convention)
    stream = _expected_ids(text_model, CORPUS * 10)
    assert tokens[0].tolist() == stream[:8]
    assert tokens[1].tolist() == [text_model.tokenizer.bos_token_id, *stream[8:15]]


def test_jsonl_parquet_and_saved_dataset_give_the_same_tokens(tmp_path: Path, text_model: Any) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "text": text} for i, text in enumerate(CORPUS * 10)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    sae = make_identity_sae()
    results = [
        loading.load_tokens(str(tmp_path / name), text_model, sae, n_tokens=64, context_size=16, seed=0)
        for name in ("data.jsonl", "data.parquet", "saved")
    ]
    _check_packed(results[0], 4, 16, text_model.tokenizer.bos_token_id)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_pretokenised_npy_and_pt_files(tmp_path: Path) -> None:
    model = make_tiny_model()
    sae = make_identity_sae()
    rows = make_token_ids(n_sequences=6, seq_len=16)
    np.save(tmp_path / "rows.npy", rows)
    torch.save(torch.as_tensor(rows), tmp_path / "rows.pt")
    torch.save({"input_ids": torch.as_tensor(rows)}, tmp_path / "dict.pt")
    for name in ("rows.npy", "rows.pt", "dict.pt"):
        tokens = loading.load_tokens(str(tmp_path / name), model, sae, n_tokens=64, context_size=16, seed=0)
        assert torch.equal(tokens, torch.as_tensor(rows[:4])), (
            name
        )  # rows of context_size pass through unchanged
    stream = np.arange(1, 40)
    np.save(tmp_path / "stream.npy", stream)
    tokens = loading.load_tokens(
        str(tmp_path / "stream.npy"), model, sae, n_tokens=20, context_size=10, seed=0
    )
    assert tokens.tolist() == [list(range(1, 11)), list(range(11, 21))]  # no tokenizer, so no BOS to add


def test_token_source_shorter_than_asked_warns_and_too_short_errors(tmp_path: Path) -> None:
    model, sae = make_tiny_model(), make_identity_sae()
    # 2 rows of 15 tokens: within the size bound of 2 sequences of 16, but they pack into one.
    np.save(tmp_path / "few.npy", make_token_ids(n_sequences=2, seq_len=15))
    with pytest.warns(UserWarning, match="ran out after 1 sequences"):
        tokens = loading.load_tokens(
            str(tmp_path / "few.npy"), model, sae, n_tokens=32, context_size=16, seed=0
        )
    assert tokens.shape == (1, 16)
    np.save(tmp_path / "tiny.npy", np.arange(1, 5))
    with pytest.raises(
        ConfigError, match=r"n_tokens=16 asks for 16 tokens but token source .*tiny.npy.* at most 6"
    ):
        loading.load_tokens(str(tmp_path / "tiny.npy"), model, sae, n_tokens=16, context_size=16, seed=0)
    np.save(
        tmp_path / "short_rows.npy", np.arange(1, 13).reshape(4, 3)
    )  # 12 ids + separators: not 16 in a row
    with pytest.raises(LoadError, match="fewer than 16 tokens"):
        loading.load_tokens(
            str(tmp_path / "short_rows.npy"), model, sae, n_tokens=16, context_size=16, seed=0
        )


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("floats.npy", np.ones((2, 16)), LoadError, "token ids must be integers"),
        ("cube.npy", np.ones((2, 2, 16), dtype=np.int64), ShapeMismatchError, "must be 1-D"),
        ("notes.csv", "a,b", LoadError, "unknown type '.csv'"),
        ("bad.jsonl", '{"input_ids": [1, 2]}\nnot json', LoadError, "line 2 is not JSON"),
        ("nocolumn.jsonl", '{"n": 1}', LoadError, "no text, token or conversation column"),
    ],
)
def test_bad_token_files_name_the_problem(
    tmp_path: Path, name: str, content: Any, error: type, match: str
) -> None:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
        path = path.with_suffix(".npy")
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match):
        loading.load_tokens(
            str(path), make_tiny_model(), make_identity_sae(), n_tokens=16, context_size=16, seed=0
        )


def test_missing_token_file_names_the_accepted_sources() -> None:
    with pytest.raises(
        LoadError,
        match=r"'missing.txt' is not an existing file or directory \(looked for /\S*missing.txt\); give a .txt",
    ):
        loading.load_tokens("missing.txt", make_tiny_model(), make_identity_sae(), 16, 16, 0)


def test_text_with_a_model_without_tokenizer_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello world", encoding="utf-8")
    with pytest.raises(LoadError, match="the model has no tokenizer"):
        loading.load_tokens(str(tmp_path / "t.txt"), make_tiny_model(), make_identity_sae(), 16, 8, 0)


def test_hf_dataset_offline_and_not_cached_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, hub_offline: None
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as caught:
        loading.load_tokens("hf:NeelNanda/pile-10k", make_tiny_model(), make_identity_sae(), 16, 16, 0)
    message = str(caught.value)
    assert "dataset 'NeelNanda/pile-10k' (split 'train') is not available" in message
    assert "save_to_disk" in message and "HF_DATASETS_OFFLINE=1" in message


def test_hf_spec_options_are_validated() -> None:
    assert loading.tokens._parse_hf_spec("hf:wikitext?name=wikitext-2-raw-v1&split=test") == (
        "wikitext",
        {"name": "wikitext-2-raw-v1", "split": "test"},
    )
    with pytest.raises(ConfigError, match="unknown keys: splt"):
        loading.tokens._parse_hf_spec("hf:wikitext?splt=test")


def test_defaults_come_from_the_sae_config() -> None:
    sae = make_identity_sae(dataset_path="NeelNanda/pile-10k", context_size=64, prepend_bos=False)
    assert loading.default_token_source("some/sae", sae) == "hf:NeelNanda/pile-10k"
    assert loading.default_token_source("demo/good", sae) == "demo"
    assert loading.default_context_size(None, sae) == 64
    assert loading.default_context_size(32, sae) == 32
    assert loading.prepend_bos(sae) is False
    assert loading.default_model_spec("some/sae", sae) == "tiny"
    bare = make_identity_sae(model_name=None, context_size=None)
    with pytest.raises(ConfigError, match="does not name its training dataset"):
        loading.default_token_source("some/sae", bare)
    with pytest.raises(ConfigError, match="does not name its model"):
        loading.default_model_spec("some/sae", bare)
    assert loading.default_context_size(None, bare) == loading.DEFAULT_CONTEXT_SIZE


def test_token_tensors_are_validated() -> None:
    assert loading.as_token_tensor(np.zeros((2, 4), dtype=np.int32), "x").dtype == torch.long
    with pytest.raises(ShapeMismatchError, match=r"expected \[n_sequences, context_size\]"):
        loading.as_token_tensor(torch.zeros(8, dtype=torch.long), "x")
    with pytest.raises(LoadError, match="must be integers"):
        loading.as_token_tensor(torch.zeros(2, 4), "x")


# --------------------------------------------------------------------------------------------------------
# hooks


def test_custom_loaders_through_hooks_take_precedence(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        tiny_pytester.path.joinpath("conftest.py").read_text()
        + """
import torch

def pytest_saecheck_load_sae(spec, device, dtype):
    if spec == "mine/identity":
        from sae_lens import SAE
        return SAE.load_from_disk("sae_identity", device=device)
    return None

def pytest_saecheck_load_tokens(spec, model, sae, n_tokens, context_size, seed):
    if spec == "ones":
        return torch.ones(n_tokens // context_size, context_size, dtype=torch.long)
    return None
"""
    )
    tiny_pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(model="tiny", sae="mine/identity", tokens="ones", n_tokens=64)
        def test_hooks(saecheck, saecheck_tokens):
            assert saecheck_tokens.shape == (4, 16) and int(saecheck_tokens.sum()) == 64
            assert saecheck.metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)

        @pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens=32)
        def test_declined_hooks_fall_back_to_builtin(saecheck_tokens):
            assert saecheck_tokens.shape == (2, 16) and int(saecheck_tokens[0, 0]) == 0
        """
    )
    tiny_pytester.runpytest_inprocess().assert_outcomes(passed=2)


def test_hook_returning_bad_tokens_is_a_shape_error(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        tiny_pytester.path.joinpath("conftest.py").read_text()
        + """
import torch
def pytest_saecheck_load_tokens(spec, model, sae, n_tokens, context_size, seed):
    return torch.ones(n_tokens, dtype=torch.long)
"""
    )
    tiny_pytester.makepyfile(
        """
        import pytest
        @pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="anything", n_tokens=32)
        def test_bad(saecheck_tokens):
            pass
        """
    )
    result = tiny_pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ShapeMismatchError: token source 'anything' gave shape (32,)*"])


def test_hf_source_streams_a_dataset_through_datasets(tmp_path: Path, text_model: Any) -> None:
    """The hf: path for real, offline: datasets streams a local data directory like a hub repository."""
    data = tmp_path / "my_dataset"
    data.mkdir()
    rows = [{"text": text} for text in CORPUS * 10]
    (data / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    (tmp_path / "local.jsonl").write_text((data / "train.jsonl").read_text(), encoding="utf-8")
    sae = make_identity_sae()
    streamed = loading.load_tokens(
        f"hf:{data}?split=train", text_model, sae, n_tokens=64, context_size=16, seed=0
    )
    local = loading.load_tokens(
        str(tmp_path / "local.jsonl"), text_model, sae, n_tokens=64, context_size=16, seed=0
    )
    assert torch.equal(streamed, local)


def test_default_context_size_is_capped_at_the_models_context_and_an_asked_one_is_not(tmp_path: Path) -> None:
    """The built-in default (128) never asks for more than ``n_ctx``; an explicit or SAE-given length above it
    is a ConfigError naming context_size, not a shape error about seq_len later in the engine."""
    model = make_tiny_model()
    n_ctx = model.cfg.n_ctx
    assert n_ctx < loading.DEFAULT_CONTEXT_SIZE
    np.save(tmp_path / "stream.npy", np.arange(1, 4 * n_ctx + 1))
    source = str(tmp_path / "stream.npy")
    tokens = loading.load_tokens(source, model, make_identity_sae(), n_tokens=2 * n_ctx, seed=0)
    assert tokens.shape == (2, n_ctx)
    with pytest.raises(
        ConfigError, match=rf"context_size {n_ctx + 1} exceeds the model's context length n_ctx={n_ctx}"
    ):
        loading.load_tokens(source, model, make_identity_sae(), n_tokens=64, context_size=n_ctx + 1, seed=0)
    with pytest.raises(ConfigError, match=r"the SAE's training context_size .* exceeds"):
        loading.load_tokens(source, model, make_identity_sae(context_size=n_ctx * 2), n_tokens=64, seed=0)
