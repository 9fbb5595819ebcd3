"""Checks: the assertion helpers and the one workflow they share.

Every assertion follows the same steps: validate its arguments (:mod:`.workflow` argument helpers), measure,
build a :class:`~pytest_saecheck.checks.workflow.CheckOutcome`, and hand it to
:func:`~pytest_saecheck.checks.workflow.conclude`, which records it on the running test's report and raises a
plain ``AssertionError`` when it failed. Messages (numbers, tables, failure headers) are formatted by
:mod:`.messages` only.
"""
