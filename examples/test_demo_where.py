"""Where the splice hurts: the demo's constructs as token groups, and its capabilities as downstream tasks.

A single average hides where an SAE breaks the model. Here every metric is broken down by the construct each
token belongs to (``token_groups="demo_constructs"``: agreement, brackets, copying, arithmetic), and the model is
probed for four capabilities with prompts built from the demo language (:mod:`pytest_saecheck.demo.tasks`):
number agreement, closing the right bracket, copying the right name (the demo's indirect-object
identification) and the next sum.

The ``good`` SAE keeps every construct and every capability. ``variance_only`` (R² above 0.9) loses the two
that need low-variance directions: copying (its logit difference halves) and arithmetic (half the sums go
wrong), while agreement and brackets survive. Those gates are marked ``xfail(strict=True)``, so the run stays
green and still shows what is lost (``-rxX`` shows the reasons, ``--runxfail`` the failure messages; the HTML
report's "Where it hurts" and "Downstream tasks" tables show the numbers).
"""

import pytest

from pytest_saecheck import assert_ce_recovery, assert_task_preserved
from pytest_saecheck.demo.groups import DEMO_CONSTRUCTS
from pytest_saecheck.demo.tasks import DEMO_TASKS, demo_task

pytestmark = pytest.mark.saecheck(token_groups="demo_constructs")

#: No construct may gain more than this much loss (nats/token, upper bound of the 95% interval).
MAX_GROUP_DELTA_CE = 0.05
LOST = {
    "copying": "variance_only drops low-variance directions the model copies names with: copying's ΔCE and the "
    "name task's logit difference fail",
    "arithmetic": "variance_only drops low-variance directions the model adds with: arithmetic's ΔCE fails and "
    "half the sums go wrong",
}


def _lost(names):
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=LOST[name])) if name in LOST else name
        for name in names
    ]


def _task_gate(saecheck, name):
    assert_task_preserved(
        saecheck, demo_task(name), max_accuracy_drop=0.05, max_logit_diff_drop=1.0, confidence=0.95
    )


@pytest.mark.saecheck(sae="demo/good")
@pytest.mark.parametrize("construct", DEMO_CONSTRUCTS)
def test_good_in_every_construct(saecheck, construct):
    assert_ce_recovery(
        saecheck, metric="delta_ce", max_value=MAX_GROUP_DELTA_CE, confidence=0.95, group=construct
    )


@pytest.mark.saecheck(sae="demo/good")
@pytest.mark.parametrize("task", DEMO_TASKS)
def test_good_keeps_every_capability(saecheck, task):
    _task_gate(saecheck, task)


@pytest.mark.saecheck(sae="demo/variance_only")
@pytest.mark.parametrize("construct", _lost(DEMO_CONSTRUCTS))
def test_variance_only_by_construct(saecheck, construct):
    assert_ce_recovery(
        saecheck, metric="delta_ce", max_value=MAX_GROUP_DELTA_CE, confidence=0.95, group=construct
    )


@pytest.mark.saecheck(sae="demo/variance_only")
@pytest.mark.parametrize("task", _lost(DEMO_TASKS))
def test_variance_only_capabilities(saecheck, task):
    _task_gate(saecheck, task)
