"""The demo's synthetic language and tokenizer: determinism, ground truth consistent with the text."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from pytest_saecheck.demo import language as lang
from pytest_saecheck.errors import ConfigError


def _docs(seed: int, n: int = 200, split: str = "train") -> list[lang.Document]:
    return lang.generate_corpus(n, seed=seed, split=split)


def test_same_seed_same_text_different_seed_different_text():
    a = [d.text for d in _docs(0)]
    assert a == [d.text for d in _docs(0)]
    assert a != [d.text for d in _docs(1)]
    assert a != [d.text for d in _docs(0, split="heldout")]
    # the RNG-level API is deterministic too
    t1, l1 = lang.generate_document(random.Random(123))
    t2, l2 = lang.generate_document(random.Random(123))
    assert (t1, l1) == (t2, l2)


def test_text_does_not_depend_on_hash_seed():
    code = "from pytest_saecheck.demo.language import generate_corpus; print(generate_corpus(3)[2].text)"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": h, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == _docs(0, 3)[2].text


def test_vocabulary_and_special_ids():
    assert 50 <= len(lang.VOCAB) <= 200
    assert len(set(lang.VOCAB)) == len(lang.VOCAB)
    assert lang.VOCAB[lang.PAD_ID] == "<pad>"
    assert lang.VOCAB[lang.BOS_ID] == "<bos>"
    assert lang.VOCAB[lang.EOS_ID] == "<eos>"
    for doc in _docs(0, 50):
        assert all(t in lang.TOKEN_TO_ID for t in doc.tokens)
        assert doc.tokens[-1] == "<eos>" and "<eos>" not in doc.tokens[:-1]
        assert "<bos>" not in doc.tokens and "<pad>" not in doc.tokens
        assert set(doc.latents) == set(lang.LATENTS)
        assert all(len(v) == len(doc.tokens) for v in doc.latents.values())


def test_all_constructs_occur():
    seen = {c for d in _docs(0, 100) for c in d.latents["construct"]}
    assert seen == set(range(len(lang.CONSTRUCTS)))


def test_bracket_depth_matches_the_text():
    n_checked = 0
    for doc in _docs(0):
        depth, stack = 0, []
        for tok, d, c in zip(doc.tokens, doc.latents["depth"], doc.latents["construct"], strict=True):
            if tok in lang.OPENERS:
                depth += 1
                stack.append(lang.OPENERS.index(tok))
            elif tok in lang.CLOSERS:
                assert stack.pop() == lang.CLOSERS.index(tok), "closer must match the innermost opener"
                depth -= 1
            assert d == depth
            assert 0 <= depth <= lang.MAX_DEPTH
            if d > 0:
                assert lang.CONSTRUCTS[c] == "brackets"
                n_checked += 1
        assert depth == 0 and not stack
    assert n_checked > 100


def test_agreement_latent_matches_the_verb_form():
    n_verbs = 0
    for doc in _docs(0):
        for i, (tok, num) in enumerate(zip(doc.tokens, doc.latents["number"], strict=True)):
            if tok in lang.VERBS_SG or tok in lang.VERBS_PL:
                n_verbs += 1
                assert num == (lang.NUMBER_SG if tok in lang.VERBS_SG else lang.NUMBER_PL)
                # the subject is the first noun of the span; the verb agrees with it, not with distractors
                j = i
                while j > 0 and doc.latents["number"][j - 1] != lang.NUMBER_NONE:
                    j -= 1
                subject = doc.tokens[j]
                assert subject in (lang.NOUNS_SG if num == lang.NUMBER_SG else lang.NOUNS_PL)
    assert n_verbs > 50


def test_copy_latent_points_at_an_earlier_identical_name():
    n_copies = 0
    for doc in _docs(0):
        for i, (tok, cp, src) in enumerate(
            zip(doc.tokens, doc.latents["copy"], doc.latents["copy_src"], strict=True)
        ):
            if cp:
                n_copies += 1
                assert tok in lang.NAMES and 0 <= src < i and doc.tokens[src] == tok
            else:
                assert src == -1
        # the recipient is the name that was introduced but is not the second clause's subject
        for i, tok in enumerate(doc.tokens):
            if tok == "gave":
                subject = doc.tokens[i - 1]
                recipient = doc.tokens[i + 4]
                introduced = {doc.tokens[i - 9], doc.tokens[i - 7]}
                assert introduced == {subject, recipient}
    assert n_copies > 50


def test_arithmetic_results_are_sums():
    n_facts = 0
    for doc in _docs(0):
        roles = doc.latents["arith_role"]
        for i, role in enumerate(roles):
            if role == lang.ARITH_RESULT:
                n_facts += 1
                assert roles[i - 4 : i] == [lang.ARITH_A, lang.ARITH_PLUS, lang.ARITH_B, lang.ARITH_EQ]
                assert int(doc.tokens[i]) == int(doc.tokens[i - 4]) + int(doc.tokens[i - 2])
    assert n_facts > 50


def test_make_sequences_packs_documents_after_bos():
    ids, lat = lang.make_sequences(8, 40, seed=3, split="heldout")
    assert len(ids) == 8 and all(len(s) == 40 for s in ids)
    assert all(s[0] == lang.BOS_ID for s in ids)
    assert all(lang.BOS_ID not in s[1:] and lang.PAD_ID not in s for s in ids)
    assert all(len(v) == 8 and all(len(r) == 40 for r in v) for v in lat.values())
    # sequences begin with a fresh document: the stream's first document is at position 1
    first = lang.generate_corpus(1, seed=3, split="heldout")[0]
    n = min(len(first.tokens), 39)
    assert ids[0][1 : 1 + n] == first.ids[:n]
    for s, src in zip(ids, lat["copy_src"], strict=True):
        for i, j in enumerate(src):
            if j >= 0:
                assert s[i] == s[j]
    with pytest.raises(ConfigError, match="seq_len"):
        lang.make_sequences(1, 1)
    with pytest.raises(ConfigError, match="heldout"):
        lang.make_sequences(1, 8, split="test")


def test_unigram_entropy():
    assert lang.unigram_entropy([5, 5]) == pytest.approx(0.6931471805599453)
    assert lang.unigram_entropy({0: 7}) == 0.0


def test_tokenizer_round_trip():
    from pytest_saecheck.demo import BOS_ID, EOS_ID, PAD_ID, get_tokenizer

    tok = get_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert len(tok) == len(lang.VOCAB)
    for doc in _docs(0, 30):
        ids = tok(doc.text)["input_ids"]
        assert ids == [BOS_ID, *doc.ids]
        assert tok.decode(ids, skip_special_tokens=False) == "<bos> " + doc.text
        assert tok.convert_ids_to_tokens(ids[1:]) == doc.tokens
    assert tok("alice zebra")["input_ids"] == [BOS_ID, lang.TOKEN_TO_ID["alice"], lang.UNK_ID]
