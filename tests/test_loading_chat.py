"""Chat-formatted token sources: conversations rendered with the model's own chat template."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import CORPUS, N_CTX, TESTS_DIR, build_tokenizer, make_identity_sae, make_tiny_model

from pytest_saecheck import loading
from pytest_saecheck.errors import ConfigError, LoadError
from pytest_saecheck.loading import chat
from pytest_saecheck.loading.tokens import token_capacity

# A Gemma-style template: BOS once, then each turn between <start_of_turn> and <end_of_turn>.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
)
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]

CONVERSATIONS = [
    [{"role": "user", "content": CORPUS[0]}, {"role": "assistant", "content": CORPUS[1]}],
    [{"role": "user", "content": CORPUS[2]}],
    [{"role": "user", "content": CORPUS[1]}, {"role": "assistant", "content": CORPUS[0] + " " + CORPUS[2]}],
] * 4


def save_chat_tokenizer(directory: Path, template: str | None = TEMPLATE) -> Path:
    tokenizer = build_tokenizer(CORPUS * 20)
    tokenizer.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    directory = save_chat_tokenizer(tmp_path_factory.mktemp("chat_tokenizer"))
    return make_tiny_model(tokenizer=AutoTokenizer.from_pretrained(directory))


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import datasets

    directory = tmp_path_factory.mktemp("chat_data") / "conversations"
    datasets.Dataset.from_dict({"messages": CONVERSATIONS}).save_to_disk(str(directory))
    return directory


def expected_rows(tokenizer: Any, conversations: list[Any], context_size: int) -> torch.Tensor:
    """The rows, computed independently: each conversation written out by hand in the template's format, encoded
    as text, concatenated; every row starts with BOS (added unless the row already starts with one)."""
    bos = tokenizer.bos_token
    stream: list[int] = []
    for conversation in conversations:
        text = bos + "".join(
            f"<start_of_turn>{m['role']}\n{m['content']}<end_of_turn>\n" for m in conversation
        )
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    rows, offset = [], 0
    while True:
        head = [] if stream[offset : offset + 1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id]
        body = stream[offset : offset + context_size - len(head)]
        if len(head) + len(body) < context_size:
            break
        rows.append(head + body)
        offset += len(body)
    return torch.tensor(rows)


def test_a_saved_chat_dataset_is_rendered_with_the_template(chat_model: Any, chat_dataset: Path) -> None:
    expected = expected_rows(chat_model.tokenizer, CONVERSATIONS, N_CTX)
    n = expected.shape[0]
    tokens = loading.load_tokens(str(chat_dataset), chat_model, make_identity_sae(), n * N_CTX, N_CTX, 0)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    # the prefix says the same, and the turn markers are there as single special tokens
    prefixed = loading.load_tokens(
        "chat:" + str(chat_dataset), chat_model, make_identity_sae(), n * N_CTX, N_CTX, 0
    )
    torch.testing.assert_close(prefixed, expected, rtol=0, atol=0)
    turn_ids = chat_model.tokenizer.convert_tokens_to_ids(TURN_TOKENS)
    assert chat.template_token_ids(chat_model.tokenizer) == tuple(sorted(turn_ids))
    assert int(torch.isin(tokens, torch.tensor(turn_ids)).sum()) > 0


def test_chat_prefix_wraps_text_as_one_user_message(chat_model: Any, tmp_path: Path) -> None:
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": c[0]["content"]}) + "\n" for c in CONVERSATIONS))
    wrapped = [[{"role": "user", "content": c[0]["content"]}] for c in CONVERSATIONS]
    expected = expected_rows(chat_model.tokenizer, wrapped, N_CTX)
    n = expected.shape[0]
    tokens = loading.load_tokens("chat:" + str(path), chat_model, make_identity_sae(), n * N_CTX, N_CTX, 0)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path: Path, chat_dataset: Path) -> None:
    from transformers import AutoTokenizer

    directory = save_chat_tokenizer(tmp_path / "plain", template=None)
    model = make_tiny_model(tokenizer=AutoTokenizer.from_pretrained(directory))
    with pytest.raises(LoadError, match="has no chat template"):
        loading.load_tokens(str(chat_dataset), model, make_identity_sae(), 64, N_CTX, 0)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ([{"role": "user"}], "message 0: content must be text"),
        ([{"role": "user", "content": "hi"}, "hello"], "message 1: 'hello' is not a"),
        ([], "a conversation must be a non-empty list"),
        ({"role": "user", "content": "hi"}, "a conversation must be a non-empty list"),
    ],
)
def test_a_malformed_conversation_is_named_by_its_row(
    chat_model: Any, tmp_path: Path, row: Any, problem: str
) -> None:
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path.write_text(f"{good}\n{good}\n{json.dumps({'messages': row})}\n")
    with pytest.raises(LoadError, match=f"line 3[:,] {problem}"):
        # as many tokens as the file can hold: the rows are read up to the malformed one
        capacity = token_capacity(path)
        assert capacity is not None
        loading.load_tokens(str(path), chat_model, make_identity_sae(), capacity // N_CTX * N_CTX, N_CTX, 0)


def test_token_ids_and_the_demo_cannot_be_chat_formatted(chat_model: Any, tmp_path: Path) -> None:
    path = tmp_path / "ids.npy"
    import numpy as np

    np.save(path, np.arange(40).reshape(2, 20))
    with pytest.raises(LoadError, match="token ids cannot be rendered with a chat template"):
        loading.load_tokens("chat:" + str(path), chat_model, make_identity_sae(), 32, N_CTX, 0)
    with pytest.raises(LoadError, match="demo corpus has no conversations"):
        loading.load_tokens("chat:demo", chat_model, make_identity_sae(), 32, N_CTX, 0)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"dataset_path": "lmsys/lmsys-chat-1m"}, "chat:hf:lmsys/lmsys-chat-1m"),
        (
            {"dataset_path": "HuggingFaceH4/ultrachat_200k", "use_chat_formatting": True},
            "chat:hf:HuggingFaceH4/ultrachat_200k",
        ),
        ({"dataset_path": "monology/pile-uncopyrighted"}, "hf:monology/pile-uncopyrighted"),
    ],
)
def test_the_default_source_of_a_chat_trained_sae_is_chat_formatted(
    metadata: dict[str, Any], expected: str
) -> None:
    from factories import with_plugin_metadata

    sae = with_plugin_metadata(make_identity_sae(), **metadata)
    assert loading.default_token_source("rel/id", sae) == expected


def test_an_sae_without_a_dataset_says_the_gate_brings_its_own_tokens() -> None:
    from factories import with_plugin_metadata

    sae = with_plugin_metadata(make_identity_sae(), dataset_path=None)
    with pytest.raises(ConfigError, match="must bring its own tokens"):
        loading.default_token_source("qwen-scope/layer_12", sae)


CHAT_CONFTEST = textwrap.dedent(
    f"""
    import sys

    sys.path.insert(0, {str(TESTS_DIR)!r})
    from factories import make_tiny_model
    from transformers import AutoTokenizer

    def pytest_saecheck_load_model(spec, device, dtype):
        if spec != "tinychat":
            return None
        return make_tiny_model(device, tokenizer=AutoTokenizer.from_pretrained({{tokenizer!r}}))
    """
)


def test_a_chat_dataset_evaluates_and_the_record_reports_template_tokens(
    pytester: pytest.Pytester, tmp_path: Path, chat_dataset: Path
) -> None:
    tokenizer_dir = save_chat_tokenizer(tmp_path / "tokenizer")
    make_identity_sae().save_model(tmp_path / "sae")
    pytester.makeconftest(CHAT_CONFTEST.format(tokenizer=str(tokenizer_dir)))
    pytester.makepyfile(
        f"""
        import pytest
        from pytest_saecheck import assert_ce_recovery

        pytestmark = pytest.mark.saecheck(
            model="tinychat", sae={str(tmp_path / "sae")!r}, tokens={"chat:" + str(chat_dataset)!r},
            n_tokens=64, context_size={N_CTX},
        )

        def test_identity(saecheck):
            assert_ce_recovery(saecheck, metric="delta_ce", max_value=1e-4)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--saecheck-json", "out.json")
    result.assert_outcomes(passed=1)
    document = json.loads((pytester.path / "out.json").read_text())
    (sae,) = document["saes"]
    summary = sae["token_policy"]["chat_template"]
    assert set(summary["template_tokens"]) == set(TURN_TOKENS)
    assert 0 < summary["template_positions"] <= summary["kept_positions"]


def test_a_gate_without_tokens_says_so_before_loading_the_model(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Qwen Scope records dataset_path None (its data is not public): the test must bring its own tokens."""
    make_identity_sae(dataset_path=None).save_model(tmp_path / "sae")
    pytester.makeconftest(
        """
        def pytest_saecheck_load_model(spec, device, dtype):
            raise AssertionError("the model was loaded before the missing tokens were reported")
        """
    )
    pytester.makepyfile(
        f"""
        import pytest
        from pytest_saecheck import assert_ce_recovery

        pytestmark = pytest.mark.saecheck(model="tiny", sae={str(tmp_path / "sae")!r})

        def test_gate(saecheck):
            assert_ce_recovery(saecheck, metric="delta_ce", max_value=0.1)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*does not name its training dataset*must bring its own tokens*"])
    result.stdout.no_fnmatch_line("*the model was loaded*")
