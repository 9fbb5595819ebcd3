"""Report polish, each a whole kind of fault: the effective-compute chart's legend and colours, short
names of joint rows, progress bars outside a terminal, and built-in token groupings without empty groups."""

from __future__ import annotations

import re
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from pytest_saecheck import groups
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.report.charts import CHAR_WIDTH, compute_curve
from pytest_saecheck.report.display import short_labels
from pytest_saecheck.scaling import fit_scaling_law


def test_six_saes_get_six_colours_and_no_legend_line_is_clipped() -> None:
    compute = np.logspace(12, 15, 6)
    law = fit_scaling_law(compute, 1.2 + 50 * compute**-0.2, n_bootstrap=0)
    orig = float(law.loss_at(1e15))
    labels = [f"/very/long/checkpoint/directory/of/release-2026/layer-{k}-width-65536" for k in range(6)]
    marks = [(label, orig, float(law.loss_at(10 ** (14 + k / 10)))) for k, label in enumerate(labels)]
    root = ElementTree.fromstring(str(compute_curve(law, marks)))
    namespace = "{http://www.w3.org/2000/svg}"
    width = float(root.get("width"))
    legend = [t for t in root.iter(f"{namespace}text") if (t.text or "").startswith(tuple(labels))]
    assert len(legend) == 6
    for text in legend:
        assert float(text.get("x")) + CHAR_WIDTH * len(text.text) <= width, text.text
    markers = [c.get("fill") for c in root.iter(f"{namespace}circle") if c.get("r") == "4"]
    sae_colours = {fill for fill in markers if fill != "#222"}
    assert len(sae_colours) == 6


def test_joint_rows_show_short_names() -> None:
    sae = "/data/runs/layer-4 + /data/runs/layer-8"
    rows = [(f"{sae} (joint)", sae, None), (f"{sae} (joint) @ /models/gpt2-ft", sae, "/models/gpt2-ft")]
    assert short_labels(rows) == ["layer-4 + layer-8 (joint)", "layer-4 + layer-8 (joint) @ gpt2-ft"]


@pytest.mark.parametrize(("progress", "disable"), [(None, None), (True, False), (False, True)])
def test_the_progress_bar_follows_the_terminal(
    monkeypatch: pytest.MonkeyPatch, progress: Any, disable: Any
) -> None:
    """``progress=None`` leaves the choice to tqdm's rule (no bar unless stderr is a terminal), so pytest's
    captured output and CI logs never hold a bar."""
    import tqdm.auto

    from pytest_saecheck import demo, evaluate

    seen: list[Any] = []
    real = tqdm.auto.tqdm

    class Recording(real):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.append(kwargs.get("disable"))
            super().__init__(*args, **kwargs)

    model, sae, tokens = demo.load_model(), demo.load_sae("good"), demo.load_tokens(n_sequences=2)
    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)  # the evaluation's bar (token loading has its own)
    evaluate(model, sae, tokens, progress=progress)
    assert seen == [disable]


def test_tqdm_draws_no_bar_into_a_stream_that_is_not_a_terminal() -> None:
    import io

    from tqdm.auto import tqdm

    stream = io.StringIO()
    for _ in tqdm(range(3), disable=None, file=stream):
        pass
    assert stream.getvalue() == ""


def test_builtin_groupings_leave_out_groups_no_kept_position_falls_in() -> None:
    from pytest_saecheck import demo

    model = demo.load_model()
    tokens = demo.load_tokens(n_sequences=4)
    kept = TokenPolicy().resolved_for(model).kept_mask(tokens)
    position = groups.resolve("position", model, tokens, kept)
    assert "0" not in position.names and position.names[0] == "1"
    token_class = groups.resolve("token_class", model, tokens, kept)
    assert "special" not in token_class.names
    for grouping in (position, token_class, groups.resolve("demo_constructs", model, tokens, kept)):
        labels = grouping(tokens)
        counts = torch.bincount(labels[kept & (labels >= 0)], minlength=len(grouping.names))
        assert len(counts) == len(grouping.names) and bool((counts > 0).all()), grouping.kind
        assert int(labels.max()) < len(grouping.names)
    # without the policy, the grouping is the full one
    assert groups.resolve("position", model, tokens).names[0] == "0"
    assert re.fullmatch(r"\d+(-\d+)?", position.names[-1])
