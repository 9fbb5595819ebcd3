"""Built-in token groupings: token class, position buckets and the demo's constructs."""

from __future__ import annotations

import pytest
import torch
from factories import CORPUS, build_tokenizer

from pytest_saecheck import groups
from pytest_saecheck.demo import get_tokenizer
from pytest_saecheck.demo.groups import demo_constructs
from pytest_saecheck.demo.language import TOKEN_TO_ID, make_sequences
from pytest_saecheck.errors import ConfigError


def test_demo_constructs_recover_the_generators_ground_truth():
    ids, latents = make_sequences(40, 64, seed=3, split="heldout")
    labels = demo_constructs()(torch.tensor(ids))
    truth = torch.tensor(latents["construct"]) - 1  # construct 0 (none: <bos>, <eos>) is "no group"
    assert torch.equal(labels, truth)
    assert demo_constructs().names == ("agreement", "brackets", "copying", "arithmetic")
    assert set(labels.unique().tolist()) == {-1, 0, 1, 2, 3}


@pytest.mark.parametrize(
    ("text", "raw", "special", "markers", "expected"),
    [
        ("<bos>", "<bos>", True, False, "special"),
        (" ", "Ġ", False, True, "whitespace"),
        ("\n", "Ċ", False, True, "whitespace"),
        (" 42", "Ġ42", False, True, "digits"),
        (",", ",", False, True, "punctuation"),
        (" (", "Ġ(", False, True, "punctuation"),
        (" dog", "Ġdog", False, True, "word start"),
        ("dog", "▁dog", False, True, "word start"),
        ("gy", "gy", False, True, "word continuation"),
        ("ing", "##ing", False, False, "word continuation"),
        ("dog", "dog", False, False, "word start"),  # a word-level tokenizer: every word token starts a word
    ],
)
def test_token_classes(text, raw, special, markers, expected):
    assert groups.classify_token(text, raw, special, markers) == expected


def test_token_class_of_a_byte_level_tokenizer_and_the_demo_tokenizer():
    tokenizer = build_tokenizer([*CORPUS, "1, 2; 3 + 42 (x)"], vocab_size=400)
    grouping = groups.token_class(tokenizer)
    ids = list(range(len(tokenizer)))
    labels = grouping(torch.tensor([ids]))[0].tolist()
    seen = set()
    for index, label in zip(ids, labels, strict=True):
        text, name = tokenizer.decode([index]), grouping.names[label]
        seen.add(name)
        if index in tokenizer.all_special_ids:
            assert name == "special"
        elif text.strip() == "":
            assert name == "whitespace"
        elif text.strip().isdigit():
            assert name == "digits"
        elif text.strip() in {",", ";", "+", "(", ")"}:
            assert name == "punctuation"
        elif text.strip().isalpha():
            assert name == ("word start" if text.startswith(" ") else "word continuation"), text
    assert seen == set(groups.TOKEN_CLASSES)
    demo = groups.token_class(get_tokenizer())
    labels = demo(torch.tensor([[TOKEN_TO_ID[w] for w in ("<bos>", "the", "dog", "(", "7", ".")]]))
    assert [demo.names[k] for k in labels[0].tolist()] == [
        "special",
        "word start",
        "word start",
        "punctuation",
        "digits",
        "punctuation",
    ]
    with pytest.raises(ConfigError, match="no tokenizer"):
        groups.token_class(None)


def test_position_buckets():
    grouping = groups.position_buckets(10)
    assert grouping.names == ("0", "1", "2-3", "4-7", "8-9")
    labels = grouping(torch.zeros(2, 10, dtype=torch.long))
    assert labels[1].tolist() == [0, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    assert groups.position_buckets(6, edges=[0, 3]).names == ("0-2", "3-5")
    with pytest.raises(ConfigError, match="start at 0"):
        groups.position_buckets(6, edges=[1, 3])
    with pytest.raises(ConfigError, match="built for 10 positions"):
        grouping(torch.zeros(2, 8, dtype=torch.long))


PARITY = groups.Grouping("parity", ("even", "odd"), lambda tokens: tokens % 2)


def parity_of(tokens, model):
    return PARITY


def test_resolve_a_setting():
    tokens = torch.zeros(2, 5, dtype=torch.long)
    assert groups.resolve("position", None, tokens).names == ("0", "1", "2-3", "4")
    assert groups.resolve("demo_constructs", None, tokens).kind == "demo_constructs"
    assert groups.resolve("test_groups:PARITY", None, tokens) is PARITY
    assert groups.resolve("test_groups:parity_of", None, tokens) is PARITY
    with pytest.raises(ConfigError, match="cannot be imported"):
        groups.resolve("test_groups:missing", None, tokens)
    with pytest.raises(ConfigError, match=r"must name a pytest_saecheck\.groups\.Grouping"):
        groups.resolve("test_groups:CORPUS", None, tokens)
    # found by a new user: a function of another signature gave a raw TypeError from deep in the plugin
    with pytest.raises(ConfigError, match=r"was called as join\(tokens, model\) and raised TypeError"):
        groups.resolve("os.path:join", None, tokens)
    with pytest.raises(ConfigError, match="one of token_class, position, demo_constructs"):
        groups.check_spec("by vibes")
