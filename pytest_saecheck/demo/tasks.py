"""Downstream tasks built from the demo language, deterministically from a seed (no files shipped).

Each prompt is one sentence of a construct, cut just before the token that needs the construct's context:

``agreement``   (multiple choice) the verb after a subject and its distractor phrases: the form that agrees with
                the subject noun is right, the other number's form of the same verb wrong;
``brackets``    (multiple choice) a closing bracket: the closer of the innermost open bracket is right, the other
                closer wrong;
``copying``     (multiple choice) the recipient in ``when alice and bob went to the park , bob gave a book to``:
                the other name (``alice``) is right, the repeated subject (``bob``) wrong - the demo's
                indirect-object identification;
``arithmetic``  (next token) the sum after ``3 + 4 =``: ``7`` is the one right answer.

:func:`demo_task` returns a :class:`~pytest_saecheck.checks.tasks.Task`; ``Task.to_jsonl()`` writes it in the
JSONL format users write by hand.
"""

from __future__ import annotations

import random

from pytest_saecheck.checks.tasks import Task, TaskItem
from pytest_saecheck.demo import language
from pytest_saecheck.errors import ConfigError

DEMO_TASKS: tuple[str, ...] = ("agreement", "brackets", "copying", "arithmetic")
DEFAULT_PROMPTS = 64


def _sentence(kind: str, rng: random.Random) -> tuple[list[str], dict[str, list[int]]]:
    builder = language._Builder()
    generate = {
        "agreement": language._agreement,
        "brackets": language._brackets,
        "copying": language._names,
        "arithmetic": language._arithmetic,
    }[kind]
    generate(rng, builder)
    return builder.tokens, builder.latents


def _item(kind: str, rng: random.Random) -> TaskItem:
    tokens, latents = _sentence(kind, rng)
    if kind == "agreement":
        cut = len(tokens) - 2  # the verb, before the final "."
        verb = tokens[cut]
        forms = (language.VERBS_SG, language.VERBS_PL)
        singular = verb in language.VERBS_SG
        other = forms[1 if singular else 0][forms[0 if singular else 1].index(verb)]
        return TaskItem(" ".join(tokens[:cut]), verb, (other,))
    if kind == "brackets":
        closers = [i for i, token in enumerate(tokens) if token in language.CLOSERS]
        cut = rng.choice(closers)
        other = language.CLOSERS[1 - language.CLOSERS.index(tokens[cut])]
        return TaskItem(" ".join(tokens[:cut]), tokens[cut], (other,))
    if kind == "copying":
        cut = len(tokens) - 2  # the recipient, before the final "."
        subject = next(i for i, copy in enumerate(latents["copy"]) if copy)
        return TaskItem(" ".join(tokens[:cut]), tokens[cut], (tokens[subject],))
    cut = latents["arith_role"].index(language.ARITH_RESULT)  # the first fact's sum
    return TaskItem(" ".join(tokens[:cut]), tokens[cut])


def demo_task(name: str, n_prompts: int = DEFAULT_PROMPTS, seed: int = 0) -> Task:
    """The demo task ``name`` (one of :data:`DEMO_TASKS`) with ``n_prompts`` prompts, the same for a given seed.

    Prompts come from their own generator namespace (``saecheck-demo-task/<name>/<seed>``), apart from the
    training and held-out text. Raises :class:`ConfigError` for an unknown name or a non-positive count.
    """
    if name not in DEMO_TASKS:
        raise ConfigError(f"unknown demo task {name!r}; the demo tasks are {', '.join(DEMO_TASKS)}")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise ConfigError(f"n_prompts must be a positive integer, got {n_prompts!r}")
    rng = random.Random(f"saecheck-demo-task/{name}/{int(seed)}")
    items = tuple(
        TaskItem(item.prompt, item.answer, item.wrong, line)
        for line, item in enumerate((_item(name, rng) for _ in range(n_prompts)), start=1)
    )
    return Task(name, items, f"demo:{name}")


__all__ = ["DEMO_TASKS", "demo_task"]
