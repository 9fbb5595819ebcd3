"""R² can look excellent while the model, with the SAE spliced in, has become much worse.

The demo's ``variance_only`` SAE projects the activation on its top 18 principal components: R² above 0.9 and a
``ce_loss_score`` of 0.98, yet the loss the splice adds is about 60 times the good SAE's (0.11 vs 0.002 nats/token). The ΔCE gate that the
good SAE passes (``examples/test_demo_good.py``) catches it;
the failing gate is marked ``xfail(strict=True)`` so the run stays green and still shows the point (run with
``-rxX`` to see the reason, or ``--runxfail`` to see the full failure message).
"""

import pytest

from pytest_saecheck import assert_ce_recovery

pytestmark = pytest.mark.saecheck(sae="demo/variance_only")


def test_r2_looks_excellent(saecheck):
    assert saecheck.metrics["explained_variance"] > 0.9


@pytest.mark.xfail(
    strict=True,
    reason="variance_only keeps the high-variance directions (excellent R²) and drops low-variance ones the model "
    "reads: the spliced model's loss rises far more than with the good SAE, so the ΔCE gate fails",
)
def test_ce_gate_catches_it(saecheck):
    assert_ce_recovery(saecheck, min_score=0.95)  # zero-ablation-normalised score: passes, and misleads
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=0.01, confidence=0.95)  # fails
