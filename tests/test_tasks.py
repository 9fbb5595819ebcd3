"""Downstream tasks: the JSONL format, accuracy and logit difference of the original and the spliced model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import make_identity_sae, make_random_sae

from pytest_saecheck import Task, assert_task_preserved, demo, load_task, measure_task
from pytest_saecheck.checks.tasks import TaskItem, TaskResult, parse_task
from pytest_saecheck.demo.tasks import DEMO_TASKS, demo_task
from pytest_saecheck.errors import ConfigError, LoadError

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    return demo.load_model("cpu")


def independent_margins(model, sae, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """logit(right) − max logit(wrong) per prompt, original and spliced, by a direct float64 computation."""
    out = {"orig": [], "sae": []}
    for item in task.items:
        tokens = model.to_tokens(item.prompt)
        special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)))
        keep = ~torch.isin(tokens, special)
        keep[:, 0] = False
        with torch.no_grad():
            logits = model(tokens)[0, -1].double()

            def splice(activation, hook, keep=keep):
                return torch.where(keep[..., None], sae.decode(sae.encode(activation)), activation)

            spliced = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, splice)])[0, -1].double()
        right = model.to_single_token(item.answer)
        for name, row in (("orig", logits), ("sae", spliced)):
            if item.wrong:
                wrong = max(float(row[model.to_single_token(text)]) for text in item.wrong)
            else:
                wrong = float(torch.cat([row[:right], row[right + 1 :]]).max())
            out[name].append(float(row[right]) - wrong)
    return np.array(out["orig"]), np.array(out["sae"])


def test_accuracy_and_logit_difference_against_a_direct_computation(model):
    sae = make_random_sae(d_in=128, seed=4)
    for name in ("copying", "arithmetic"):  # multiple choice and next token
        task = demo_task(name, n_prompts=12, seed=1)
        result = measure_task(model, sae, task, batch_size=5)  # several batches of padded prompts
        orig, spliced = independent_margins(model, sae, task)
        np.testing.assert_allclose(result.per_prompt["diff_orig"], orig, atol=1e-4)
        np.testing.assert_allclose(result.per_prompt["diff_sae"], spliced, atol=1e-4)
        values = result.values()
        assert values["accuracy_orig"] == pytest.approx(float(np.mean(orig > 0)))
        assert values["accuracy_sae"] == pytest.approx(float(np.mean(spliced > 0)))
        assert values["logit_diff_drop"] == pytest.approx(float(np.mean(orig) - np.mean(spliced)), abs=1e-4)


def test_a_hand_computed_case():
    # four prompts: the original answers 3 right, the spliced model 1; margins as given
    result = TaskResult(
        "hand",
        "multiple_choice",
        "",
        {
            "correct_orig": np.array([1.0, 1.0, 1.0, 0.0]),
            "correct_sae": np.array([1.0, 0.0, 0.0, 0.0]),
            "diff_orig": np.array([2.0, 1.0, 0.5, -1.0]),
            "diff_sae": np.array([1.0, -0.5, -0.5, -2.0]),
        },
    )
    assert result.values() == {
        "accuracy_orig": 0.75,
        "accuracy_sae": 0.25,
        "logit_diff_orig": 0.625,
        "logit_diff_sae": -0.5,
        "accuracy_drop": 0.5,
        "logit_diff_drop": 1.125,
    }
    low, high = result.intervals(0.95)["accuracy_drop"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0


def test_padding_does_not_change_the_answers(model):
    sae = make_random_sae(d_in=128, seed=4)
    task = demo_task("agreement", n_prompts=10)
    one = measure_task(model, sae, task, batch_size=1)
    many = measure_task(model, sae, task, batch_size=10)
    for key in ("diff_orig", "diff_sae"):
        np.testing.assert_allclose(one.per_prompt[key], many.per_prompt[key], atol=1e-4)


def test_an_identity_sae_loses_nothing(model):
    sae = make_identity_sae(d_in=128)
    for name in DEMO_TASKS:
        result = measure_task(model, sae, demo_task(name, n_prompts=16))
        values = result.values()
        assert values["accuracy_drop"] == 0.0
        assert values["logit_diff_drop"] == pytest.approx(0.0, abs=1e-4)
        assert_task_preserved(
            (model, sae), demo_task(name, n_prompts=16), max_accuracy_drop=0.0, confidence=0.95
        )


def test_a_lost_capability_fails_with_the_numbers(model):
    sae = demo.load_sae("variance_only", "cpu")
    with pytest.raises(AssertionError) as failure:
        assert_task_preserved((model, sae), demo_task("arithmetic"), max_accuracy_drop=0.05, confidence=0.95)
    message = str(failure.value)
    assert (
        "assert_task_preserved failed for SAE at blocks.1.hook_resid_post: task 'arithmetic': the upper bound"
        in message
    )
    assert (
        "accuracy" in message
        and "logit difference = logit(right) − max logit(wrong = every other token)" in message
    )
    assert "task: arithmetic (next token), 64 prompts from demo:arithmetic" in message


def test_demo_tasks_are_deterministic_and_written_as_jsonl(tmp_path):
    assert demo_task("brackets", 8) == demo_task("brackets", 8)
    assert demo_task("brackets", 8, seed=1) != demo_task("brackets", 8)
    assert {demo_task(name, 2).kind for name in DEMO_TASKS} == {"multiple_choice", "next_token"}
    path = tmp_path / "copying.jsonl"
    path.write_text(demo_task("copying", 5).to_jsonl())
    loaded = load_task(path)
    assert loaded.name == "copying" and [i.to_dict() for i in loaded.items] == [
        i.to_dict() for i in demo_task("copying", 5).items
    ]
    with pytest.raises(ConfigError, match="unknown demo task 'ioi'"):
        demo_task("ioi")


GOOD = (
    '{"prompt": "when eve and bob went to the park , bob gave a book to", "answer": "eve", "wrong": ["bob"]}'
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "\n{not json", "line 2: not valid JSON"),
        (GOOD + "\n[1, 2]", "line 2: expected a JSON object, got list"),
        ('\n\n{"prompt": "a", "answr": "b"}', r"line 3: unknown key\(s\) 'answr'"),
        ('{"prompt": "", "answer": "b"}', "line 1: 'prompt' must be a non-empty string"),
        ('{"prompt": "a", "answer": 3}', "line 1: 'answer' must be a non-empty string, got 3"),
        ('{"prompt": "a", "answer": "b", "wrong": "c"}', "line 1: 'wrong' must be a non-empty list"),
        ('{"prompt": "a", "answer": "b", "wrong": ["b"]}', "line 1: the answer 'b' is also listed as wrong"),
        (GOOD + '\n{"prompt": "a", "answer": "b"}', "line 2: mixes next-token and multiple-choice prompts"),
        ("\n  \n", "holds no prompt"),
    ],
)
def test_bad_jsonl_is_refused_with_the_line(text, message):
    with pytest.raises(LoadError, match=message):
        parse_task(text, "bad")


def test_answers_must_be_one_token_of_the_models_tokenizer(model, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text(GOOD + "\n" + json.dumps({"prompt": "3 + 4 =", "answer": "7 .", "wrong": ["8"]}) + "\n")
    with pytest.raises(LoadError, match=r"two.jsonl' line 2: the answer '7 \.' is 2 tokens"):
        measure_task(model, make_identity_sae(d_in=128), path)
    # found by a new user: a word the demo's tokenizer does not know became <unk>, and a task that can never be
    # right passed its accuracy gate (0 -> 0)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "3 + 4 =", "answer": " zebra"}) + "\n")
    with pytest.raises(
        LoadError, match=r"unknown.jsonl' line 1: the answer ' zebra' is not in this model's vocabulary"
    ):
        measure_task(model, make_identity_sae(d_in=128), unknown)
    with pytest.raises(LoadError, match="not found"):
        load_task(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="a pytest_saecheck Task or the path"):
        measure_task(model, make_identity_sae(d_in=128), [TaskItem("a", "b")])


def test_thresholds_are_validated(model):
    pair = (model, make_identity_sae(d_in=128))
    task = demo_task("copying", 4)
    with pytest.raises(ConfigError, match="max_accuracy_drop is a share"):
        assert_task_preserved(pair, task, max_accuracy_drop=5)
    with pytest.raises(ConfigError, match="confidence must lie strictly between 0 and 1"):
        assert_task_preserved(pair, task, max_accuracy_drop=0.1, confidence=95)
    with pytest.raises(ConfigError, match="has 1 prompt"):
        assert_task_preserved(pair, demo_task("copying", 1), max_accuracy_drop=0.1, confidence=0.9)
    with pytest.raises(ConfigError, match="expects the saecheck fixture or a"):
        assert_task_preserved(model, task, max_accuracy_drop=0.1)


def test_a_transcoder_writes_at_its_output_hook(model):
    """The task splice is the engine's: a transcoder reads ln2.hook_normalized and replaces hook_mlp_out."""
    import sae_lens

    cfg = sae_lens.TranscoderConfig(d_in=128, d_sae=64, d_out=128, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
    cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    tc = sae_lens.Transcoder(cfg)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in tc.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    task = demo_task("copying", n_prompts=6)
    result = measure_task(model, tc, task)
    for index, item in enumerate(task.items):
        tokens = model.to_tokens(item.prompt)
        keep = torch.ones_like(tokens, dtype=torch.bool)
        keep[:, 0] = False
        read = {}

        def capture(activation, hook, read=read):
            read["x"] = activation

        def replace(activation, hook, keep=keep, read=read):
            return torch.where(keep[..., None], tc(read["x"]), activation)

        with torch.no_grad():
            logits = model.run_with_hooks(
                tokens,
                fwd_hooks=[("blocks.0.ln2.hook_normalized", capture), ("blocks.0.hook_mlp_out", replace)],
            )[0, -1].double()
        right, wrong = model.to_single_token(item.answer), model.to_single_token(item.wrong[0])
        assert result.per_prompt["diff_sae"][index] == pytest.approx(
            float(logits[right] - logits[wrong]), abs=1e-4
        )


def test_a_relative_task_path_resolves_against_the_test_file(pytester: pytest.Pytester) -> None:
    """Found by a new user: `pytest proj/` looked for proj's task file in the working directory."""
    project = pytester.mkdir("proj")
    (project / "tasks").mkdir()
    (project / "tasks" / "sums.jsonl").write_text(json.dumps({"prompt": "3 + 4 =", "answer": " 7"}) + "\n")
    (project / "test_x.py").write_text(
        "from pytest_saecheck import load_task\n\n"
        "def test_reads_its_own_task():\n"
        "    assert load_task('tasks/sums.jsonl').items[0].answer == ' 7'\n"
    )
    pytester.runpytest_inprocess("proj", "-p", "no:cacheprovider").assert_outcomes(passed=1)
