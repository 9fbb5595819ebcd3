"""A small synthetic language with known latent structure, generated deterministically from a seed.

A *document* is one to four sentences followed by ``<eos>``. Every sentence is one of four constructs, each of
which a next-token predictor can only model well by using context:

``agreement``
    ``the big dog near the cats quickly runs .`` - the verb's number (``runs`` / ``run``) agrees with the subject
    noun, across zero to two prepositional phrases whose nouns (distractors) have a random number.
``brackets``
    ``( x [ y ( z ) w ] ) .`` - nested round and square brackets, at most :data:`MAX_DEPTH` deep; which closer
    comes next depends on the innermost open bracket, and the sentence may only end at depth 0.
``names``
    ``when alice and bob went to the park , bob gave a book to alice .`` - two names are introduced; the second
    clause repeats one of them as its subject and the *other* one as the recipient (copying from context).
``arithmetic``
    ``3 + 4 = 7 , 7 + 2 = 9 .`` - addition facts over 0-9 operands; a chained fact starts by copying the previous
    result.

Ground truth per token (every list has one entry per token, document ``<eos>`` included; see :data:`LATENTS`):

``construct``  :data:`CONSTRUCTS` index: 0 for ``<eos>`` / ``<bos>``, 1 agreement, 2 brackets, 3 names, 4 arithmetic.
``depth``      open brackets after the token (``(`` -> depth incl. itself, ``)`` -> depth after closing).
``number``     0 outside an agreement span; 1 singular, 2 plural: the subject's number, from the subject noun
               through the agreeing verb (inclusive) - the state a model must carry to pick the verb form.
``copy``       1 where the token is a name repeated from earlier in the same sentence, else 0.
``copy_src``   index (within the document) of the earlier occurrence that ``copy`` repeats, else -1.
``arith_role`` 0 outside arithmetic; 1 first operand, 2 ``+``, 3 second operand, 4 ``=``, 5 result.

Everything uses :class:`random.Random` (stable across platforms and Python versions for a given seed); string
seeds are hashed by SHA-512 inside :mod:`random`, so they do not depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

NAME = "saecheck-demo"
"""The demo's name: its model's ``model_name``, its SAEs' ``dataset_path`` and its tokenizer's name."""

# ----------------------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------------------

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

PUNCT: tuple[str, ...] = (".", ",")
OPENERS: tuple[str, ...] = ("(", "[")
CLOSERS: tuple[str, ...] = (")", "]")
BRACKET_ITEMS: tuple[str, ...] = ("x", "y", "z", "w", "v", "u")
MAX_DEPTH = 4

NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(19))  # operands 0-9, sums 0-18
ARITH_OPS: tuple[str, ...] = ("+", "=")

DETERMINERS: tuple[str, ...] = ("the",)
ADJECTIVES: tuple[str, ...] = ("big", "small", "red", "old", "happy", "quiet")
NOUNS_SG: tuple[str, ...] = ("dog", "cat", "bird", "fox", "horse", "mouse", "wolf", "bear")
NOUNS_PL: tuple[str, ...] = ("dogs", "cats", "birds", "foxes", "horses", "mice", "wolves", "bears")
PREPOSITIONS: tuple[str, ...] = ("near", "with", "behind")
ADVERBS: tuple[str, ...] = ("quickly", "often", "rarely")
VERBS_SG: tuple[str, ...] = ("runs", "sleeps", "jumps", "sings", "eats", "hides")
VERBS_PL: tuple[str, ...] = ("run", "sleep", "jump", "sing", "eat", "hide")

NAMES: tuple[str, ...] = ("alice", "bob", "carol", "dave", "eve", "frank", "grace", "heidi")
PLACES: tuple[str, ...] = ("store", "park", "school", "river")
OBJECTS: tuple[str, ...] = ("book", "drink", "gift", "letter")
NAME_FILLER: tuple[str, ...] = ("when", "and", "went", "to", "gave", "a")

_ALL_WORDS: tuple[str, ...] = (
    SPECIAL_TOKENS
    + PUNCT
    + OPENERS
    + CLOSERS
    + BRACKET_ITEMS
    + NUMBERS
    + ARITH_OPS
    + DETERMINERS
    + ADJECTIVES
    + NOUNS_SG
    + NOUNS_PL
    + PREPOSITIONS
    + ADVERBS
    + VERBS_SG
    + VERBS_PL
    + NAMES
    + PLACES
    + OBJECTS
    + NAME_FILLER
)
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(_ALL_WORDS))  # order-preserving de-duplication
"""The fixed vocabulary; a token's id is its index here."""
if len(VOCAB) != len(_ALL_WORDS):  # pragma: no cover - guards the word lists above
    raise RuntimeError("duplicate word in the demo vocabulary")
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
assert TOKEN_TO_ID[PAD] == PAD_ID and TOKEN_TO_ID[BOS] == BOS_ID and TOKEN_TO_ID[EOS] == EOS_ID

CONSTRUCTS: tuple[str, ...] = ("none", "agreement", "brackets", "names", "arithmetic")
"""Values of the ``construct`` latent, by index."""
LATENTS: tuple[str, ...] = ("construct", "depth", "number", "copy", "copy_src", "arith_role")
"""Names of the ground-truth latent variables returned with every document."""
NUMBER_NONE, NUMBER_SG, NUMBER_PL = 0, 1, 2
ARITH_NONE, ARITH_A, ARITH_PLUS, ARITH_B, ARITH_EQ, ARITH_RESULT = range(6)

# mixing weights of the four constructs (agreement, brackets, names, arithmetic)
_CONSTRUCT_WEIGHTS = (0.3, 0.25, 0.2, 0.25)


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Builder:
    tokens: list[str] = field(default_factory=list)
    latents: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in LATENTS})

    def add(self, token: str, construct: int, **values: int) -> int:
        """Append one token with its latents (unnamed latents default to 0, ``copy_src`` to -1)."""
        if token not in TOKEN_TO_ID:  # pragma: no cover - internal consistency
            raise KeyError(token)
        self.tokens.append(token)
        self.latents["construct"].append(construct)
        for name in LATENTS[1:]:
            self.latents[name].append(values.get(name, -1 if name == "copy_src" else 0))
        return len(self.tokens) - 1


def _agreement(rng: random.Random, b: _Builder) -> None:
    c = 1
    plural = rng.random() < 0.5
    num = NUMBER_PL if plural else NUMBER_SG
    b.add("the", c)
    if rng.random() < 0.5:
        b.add(rng.choice(ADJECTIVES), c)
    b.add(rng.choice(NOUNS_PL if plural else NOUNS_SG), c, number=num)
    for _ in range(rng.choice((0, 1, 1, 2))):  # distractor phrases with a random number
        b.add(rng.choice(PREPOSITIONS), c, number=num)
        b.add("the", c, number=num)
        if rng.random() < 0.3:
            b.add(rng.choice(ADJECTIVES), c, number=num)
        b.add(rng.choice(NOUNS_PL if rng.random() < 0.5 else NOUNS_SG), c, number=num)
    if rng.random() < 0.3:
        b.add(rng.choice(ADVERBS), c, number=num)
    b.add(rng.choice(VERBS_PL if plural else VERBS_SG), c, number=num)
    b.add(".", c)


def _brackets(rng: random.Random, b: _Builder) -> None:
    c = 2

    def group(depth: int) -> None:  # depth: brackets open before this group's opener
        kind = rng.randrange(2)
        b.add(OPENERS[kind], c, depth=depth + 1)
        for _ in range(rng.randint(1, 3)):
            if depth + 1 < MAX_DEPTH and rng.random() < 0.4:
                group(depth + 1)
            else:
                b.add(rng.choice(BRACKET_ITEMS), c, depth=depth + 1)
        b.add(CLOSERS[kind], c, depth=depth)

    for _ in range(rng.randint(1, 2)):
        group(0)
    b.add(".", c)


def _names(rng: random.Random, b: _Builder) -> None:
    c = 3
    first, second = rng.sample(NAMES, 2)
    b.add("when", c)
    pos = {first: b.add(first, c)}
    b.add("and", c)
    pos[second] = b.add(second, c)
    for word in ("went", "to", "the"):
        b.add(word, c)
    b.add(rng.choice(PLACES), c)
    b.add(",", c)
    subject = rng.choice((first, second))
    receiver = second if subject == first else first
    b.add(subject, c, copy=1, copy_src=pos[subject])
    b.add("gave", c)
    b.add("a", c)
    b.add(rng.choice(OBJECTS), c)
    b.add("to", c)
    b.add(receiver, c, copy=1, copy_src=pos[receiver])
    b.add(".", c)


def _arithmetic(rng: random.Random, b: _Builder) -> None:
    c = 4
    x = rng.randint(0, 9)
    prev_result: int | None = None
    for i in range(rng.choice((1, 1, 2))):
        if i > 0:
            b.add(",", c)
            assert prev_result is not None
            x = prev_result  # a chained fact starts from the previous result
        y = rng.randint(0, min(9, 18 - x))
        b.add(str(x), c, arith_role=ARITH_A)
        b.add("+", c, arith_role=ARITH_PLUS)
        b.add(str(y), c, arith_role=ARITH_B)
        b.add("=", c, arith_role=ARITH_EQ)
        b.add(str(x + y), c, arith_role=ARITH_RESULT)
        prev_result = x + y
    b.add(".", c)


_GENERATORS = (_agreement, _brackets, _names, _arithmetic)


def generate_document(rng: random.Random) -> tuple[list[str], dict[str, list[int]]]:
    """One document (1-4 sentences, then ``<eos>``) and its per-token ground-truth latents.

    Returns ``(tokens, latents)``; ``latents[name]`` has ``len(tokens)`` entries for every name in
    :data:`LATENTS`. ``copy_src`` indexes into this document's ``tokens``.
    """
    b = _Builder()
    for _ in range(rng.randint(1, 4)):
        (gen,) = rng.choices(_GENERATORS, weights=_CONSTRUCT_WEIGHTS)
        gen(rng, b)
    b.add(EOS, 0)
    return b.tokens, b.latents


@dataclass(frozen=True)
class Document:
    tokens: list[str]
    latents: dict[str, list[int]]

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    @property
    def ids(self) -> list[int]:
        return [TOKEN_TO_ID[t] for t in self.tokens]


def _rng(split: str, seed: int) -> random.Random:
    return random.Random(f"saecheck-demo/{split}/{int(seed)}")


SPLITS: tuple[str, ...] = ("train", "heldout")
"""Corpus splits; each draws from its own seed namespace, so held-out text never shares a generator stream with
training text."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        from pytest_saecheck.errors import ConfigError

        raise ConfigError(f"unknown demo corpus split {split!r}; allowed: {', '.join(SPLITS)}")


def iter_documents(seed: int = 0, split: str = "train") -> Iterator[Document]:
    """An endless, deterministic stream of documents for ``(split, seed)``."""
    _check_split(split)
    rng = _rng(split, seed)
    while True:
        tokens, latents = generate_document(rng)
        yield Document(tokens, latents)


def generate_corpus(n_documents: int, seed: int = 0, split: str = "train") -> list[Document]:
    """The first ``n_documents`` documents of the stream for ``(split, seed)``."""
    if n_documents < 0:
        from pytest_saecheck.errors import ConfigError

        raise ConfigError(f"n_documents must be >= 0, got {n_documents}")
    docs = iter_documents(seed, split)
    return [next(docs) for _ in range(n_documents)]


def iter_sequences(
    seq_len: int, seed: int = 0, split: str = "train", *, latents: bool = True
) -> Iterator[tuple[list[int], dict[str, list[int]]]]:
    """An endless stream of packed sequences ``(ids [seq_len], latents name -> [seq_len])`` (see
    :func:`make_sequences` for the packing); ``latents=False`` yields empty latents and skips their work."""
    if seq_len < 2:
        from pytest_saecheck.errors import ConfigError

        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    docs = iter_documents(seed, split)
    while True:
        ids = [BOS_ID]
        lat: dict[str, list[int]] = (
            {name: [-1 if name == "copy_src" else 0] for name in LATENTS} if latents else {}
        )
        while len(ids) < seq_len:
            doc = next(docs)
            offset = len(ids)
            take = min(len(doc.tokens), seq_len - len(ids))
            ids.extend(TOKEN_TO_ID[t] for t in doc.tokens[:take])
            for name in lat:
                vals = doc.latents[name][:take]
                if name == "copy_src":
                    vals = [v + offset if v >= 0 else -1 for v in vals]
                lat[name].extend(vals)
        yield ids, lat


def make_sequences(
    n_sequences: int, seq_len: int, seed: int = 0, split: str = "train"
) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """Token ids ``[n_sequences][seq_len]`` and the matching latents, packed from the document stream.

    Every sequence is ``<bos>`` followed by whole documents (each ending in ``<eos>``) back to back; the last
    document of a sequence is cut at ``seq_len`` and the next sequence starts with a fresh document. The latents
    of ``<bos>`` are 0 (``copy_src`` -1); ``copy_src`` is re-based to the position within the sequence (or -1 if
    the source was cut away, which cannot happen because sources precede their copies).
    """
    ids_out: list[list[int]] = []
    lat_out: dict[str, list[list[int]]] = {name: [] for name in LATENTS}
    for ids, lat in itertools.islice(iter_sequences(seq_len, seed, split), n_sequences):
        ids_out.append(ids)
        for name in LATENTS:
            lat_out[name].append(lat[name])
    return ids_out, lat_out


def unigram_entropy(counts: dict[int, int] | list[int]) -> float:
    """Entropy in nats of the empirical distribution given by token counts."""
    import math

    values = list(counts.values()) if isinstance(counts, dict) else list(counts)
    total = sum(values)
    return -sum(c / total * math.log(c / total) for c in values if c > 0)


__all__ = [
    "BOS",
    "BOS_ID",
    "CONSTRUCTS",
    "EOS",
    "EOS_ID",
    "LATENTS",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TOKEN_TO_ID",
    "UNK",
    "UNK_ID",
    "VOCAB",
    "Document",
    "generate_corpus",
    "generate_document",
    "iter_documents",
    "iter_sequences",
    "make_sequences",
    "unigram_entropy",
]
