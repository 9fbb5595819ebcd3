"""The evaluation engine: every behavioural and reconstruction metric of one SAE or a whole release, in one
streaming pass (``run``), over a model reached through one protocol (``cut``), with one dictionary per
``member``, float64 sums (``accumulate``) and results (``result``)."""

from pytest_saecheck.engine.backends import check_model
from pytest_saecheck.engine.finish import unresolved_ratios
from pytest_saecheck.engine.result import Evaluation, EvaluationSet
from pytest_saecheck.engine.run import evaluate
from pytest_saecheck.policy import TokenPolicy

__all__ = ["Evaluation", "EvaluationSet", "TokenPolicy", "check_model", "evaluate", "unresolved_ratios"]
