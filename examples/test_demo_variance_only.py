"""R² can look excellent while the model, with the SAE spliced in, has become much worse.

The demo's ``variance_only`` SAE projects the activation on its top 18 principal components: R² above 0.9 and a
``ce_loss_score`` of 0.98, yet the loss the splice adds is about 60 times the good SAE's (0.11 vs 0.002 nats/token). The ΔCE gate that the
good SAE passes (``examples/test_demo_good.py``) catches it;
the failing gate is marked ``xfail(strict=True)`` so the run stays green and still shows the point (run with
``-rxX`` to see the reason, or ``--runxfail`` to see the full failure message).

Read as training compute (``compute_fraction``, on the scaling law the demo build fitted for the demo's model
family), the spliced model is as good as the family would be with about a quarter of the model's training
compute (``good`` keeps about 97%): the compute gate that ``good`` passes fails here.
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


@pytest.mark.xfail(
    strict=True,
    reason="variance_only's spliced model is as good as the demo family with about a quarter of the model's "
    "training compute, while its R² and zero-ablation score look excellent: the compute gate fails",
)
def test_compute_fraction_shows_it(saecheck):
    assert saecheck.metrics["explained_variance"] > 0.9  # looks excellent...
    assert_ce_recovery(saecheck, min_score=0.95)  # ...and so does the zero-ablation score
    # the gate examples/test_demo_good.py passes: at least 80% of the training compute kept
    assert_ce_recovery(saecheck, metric="compute_fraction", min_score=0.8)
