"""assert_metric_pipeline: our engine passes every property; a small independent pipeline written here passes
every property, and each planted bug (one per bug class) breaks its property."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from pytest_saecheck import ConfigError, assert_metric_pipeline, demo
from pytest_saecheck.checks import pipeline as battery
from pytest_saecheck.checks import pipeline_adapters as adapters
from pytest_saecheck.checks import pipeline_subjects as subjects

PROPERTY_BUGS = {
    "identity": "shifted_splice",
    "mean_predictor": "r2_about_zero",
    "batch_size_invariance": "mse_per_batch_tokens",
    "saturated_logits": "kl_log_of_softmax",
    "normalised_excluded_tokens": "scaled_excluded_positions",
    "explained_variance": "r2_mean_square_per_dimension",
    "explained_variance_half_precision": "r2_sums_in_model_dtype",
    "identity_half_precision": "original_in_float32",
    "mean_predictor_half_precision": "r2_sums_in_model_dtype",
    "transcoder_splice": "transcoder_at_input_hook",
    "agreement": "l2_ratio_of_means",
}
"""Each property and the bug planted to break it (one bug class each)."""


def reference_pipeline(
    model: Any,
    sae: Any,
    tokens: torch.Tensor,
    *,
    batch_size: int,
    exclude_token_ids: Sequence[int] = (),
    activation_scale: float | None = None,
    bugs: frozenset[str] = frozenset(),
) -> dict[str, dict[str, float]]:
    """A plain float32 metric pipeline written for these tests (run_evals-shaped output), with switchable bugs."""
    read = sae.cfg.metadata.hook_name
    write = getattr(sae.cfg.metadata, "hook_name_out", None) or read
    if "transcoder_at_input_hook" in bugs:
        write = read
    scale = activation_scale or 1.0
    excluded = torch.tensor(list(exclude_token_ids), dtype=tokens.dtype)
    ce: dict[str, list[torch.Tensor]] = {"orig": [], "sae": [], "zero": []}
    kl: dict[str, list[torch.Tensor]] = {"sae": [], "zero": []}
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in ("sse", "cos", "ratio", "l0", "l1", "nx", "nxh")}
    xs, xs_native = [], []
    # the original model's logits from a float32 copy, the spliced ones from the model as given (half precision)
    original = copy.deepcopy(model).float() if "original_in_float32" in bugs else model

    def kl_of(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        if "kl_log_of_softmax" in bugs:
            p = torch.softmax(p_logits, -1)
            return (p * (torch.log(p) - torch.log(torch.softmax(q_logits, -1)))).sum(-1)
        log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def ce_of(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits[:, :-1], -1)
        return -log_probs.gather(-1, batch[:, 1:, None])[..., 0]

    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size]
            keep = ~torch.isin(batch, excluded.to(batch.device))
            logits, cache = model.run_with_cache(batch, names_filter=[read, write])
            if original is not model:
                logits = original(batch).to(logits.dtype)
            x_in, target = cache[read], cache[write]
            latents = sae.encode(x_in * scale)
            x_hat = sae.decode(latents) / scale
            spliced = x_hat.roll(1, dims=1) if "shifted_splice" in bugs else x_hat

            def splice(
                act: torch.Tensor, hook: Any, spliced: torch.Tensor = spliced, keep: Any = keep
            ) -> Any:
                kept = act * scale if "scaled_excluded_positions" in bugs else act
                return torch.where(keep[..., None], spliced, kept)

            logits_sae = model.run_with_hooks(batch, fwd_hooks=[(write, splice)])
            logits_zero = model.run_with_hooks(
                batch, fwd_hooks=[(write, lambda act, hook: torch.zeros_like(act))]
            )
            for name, out in (("orig", logits), ("sae", logits_sae), ("zero", logits_zero)):
                ce[name].append(ce_of(out, batch)[keep[:, :-1]])
            kl["sae"].append(kl_of(logits, logits_sae)[keep])
            kl["zero"].append(kl_of(logits, logits_zero)[keep])
            x, xh, z = target[keep], x_hat[keep], latents[keep]
            sse = (x - xh).pow(2).sum(-1)
            rec["sse"].append(sse / x.shape[0] if "mse_per_batch_tokens" in bugs else sse)
            rec["cos"].append(torch.cosine_similarity(x, xh, dim=-1))
            rec["ratio"].append(xh.norm(dim=-1) / x.norm(dim=-1))
            rec["nx"].append(x.norm(dim=-1))
            rec["nxh"].append(xh.norm(dim=-1))
            rec["l0"].append((z != 0).sum(-1).float())
            rec["l1"].append(z.abs().sum(-1))
            xs.append(x.double())
            xs_native.append(x)
    mean = {key: float(torch.cat(values).double().mean()) for key, values in {**rec}.items()}
    ce_mean = {key: float(torch.cat(values).double().mean()) for key, values in ce.items()}
    kl_mean = {key: float(torch.cat(values).double().mean()) for key, values in kl.items()}
    flat = torch.cat(xs)
    sse = float(torch.cat(rec["sse"]).double().sum())
    if "r2_sums_in_model_dtype" in bugs:  # SAE Lens 6.45.1–6.51.3: sums in bfloat16/float16
        native = torch.cat(xs_native)
        sse = float(torch.cat(rec["sse"]).sum())
        variance = float((native - native.mean(0)).pow(2).sum())
    elif "r2_about_zero" in bugs:
        variance = float(flat.pow(2).sum())
    elif "r2_mean_square_per_dimension" in bugs:
        variance = (float(flat.pow(2).sum(-1).mean()) - float(flat.pow(2).mean(0).mean()) ** 2) * flat.shape[
            0
        ]
    else:
        variance = float((flat - flat.mean(0)).pow(2).sum())
    l2_ratio = mean["nxh"] / mean["nx"] if "l2_ratio_of_means" in bugs else mean["ratio"]
    return {
        "model_performance_preservation": {
            "ce_loss_without_sae": ce_mean["orig"],
            "ce_loss_with_sae": ce_mean["sae"],
            "ce_loss_with_ablation": ce_mean["zero"],
            "ce_loss_score": (ce_mean["zero"] - ce_mean["sae"]) / (ce_mean["zero"] - ce_mean["orig"]),
        },
        "model_behavior_preservation": {
            "kl_div_with_sae": kl_mean["sae"],
            "kl_div_with_ablation": kl_mean["zero"],
            "kl_div_score": (kl_mean["zero"] - kl_mean["sae"]) / kl_mean["zero"],
        },
        "reconstruction_quality": {
            "explained_variance": 1.0 - sse / variance,
            "mse": mean["sse"],
            "cossim": mean["cos"],
        },
        "shrinkage": {"l2_ratio": l2_ratio},
        "sparsity": {"l0": mean["l0"], "l1": mean["l1"]},
    }


def planted(*bugs: str) -> Any:
    def pipeline(
        model: Any,
        sae: Any,
        tokens: torch.Tensor,
        *,
        batch_size: int,
        exclude_token_ids: Sequence[int] = (),
        activation_scale: float | None = None,
    ) -> dict[str, dict[str, float]]:
        return reference_pipeline(
            model,
            sae,
            tokens,
            batch_size=batch_size,
            exclude_token_ids=exclude_token_ids,
            activation_scale=activation_scale,
            bugs=frozenset(bugs),
        )

    pipeline.__name__ = "planted_" + "_".join(bugs) if bugs else "reference_pipeline"
    return pipeline


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_our_engine_passes_every_property() -> None:
    name, results = battery.run_battery("saecheck", device="cpu")
    assert name == "saecheck"
    assert [r.name for r in results] == list(battery.PROPERTIES)
    for result in results:
        assert result.not_checked is None, result
        assert result.findings and not result.broken, result
    assert_metric_pipeline("saecheck", checks=["identity", "mean_predictor"], device="cpu")


@pytest.mark.parametrize("prop", list(PROPERTY_BUGS))
def test_reference_pipeline_passes_and_its_planted_bug_breaks_the_property(prop: str) -> None:
    assert_metric_pipeline(planted(), checks=[prop], device="cpu")
    bug = PROPERTY_BUGS[prop]
    with pytest.raises(AssertionError) as failure:
        assert_metric_pipeline(planted(bug), checks=[prop], device="cpu")
    message = str(failure.value)
    assert message.startswith(f"assert_metric_pipeline failed for pipeline planted_{bug}: {prop} broken")
    assert battery.cause(prop) in message


def test_every_broken_property_is_listed_with_both_numbers_and_the_formula_it_matched() -> None:
    bugs = ("mse_per_batch_tokens", "r2_mean_square_per_dimension", "kl_log_of_softmax")
    checks = ["batch_size_invariance", "explained_variance", "saturated_logits", "identity"]
    with pytest.raises(AssertionError) as failure:
        assert_metric_pipeline(planted(*bugs), checks=checks, device="cpu")
    message = str(failure.value)
    header = message.splitlines()[0]
    assert "batch_size_invariance broken" in header
    assert "explained_variance broken" in header
    assert "saturated_logits broken" in header
    assert "identity" not in header
    assert "E‖x‖² − (mean_d E[x_d²])²" in message  # the formula the planted R² matched
    assert "nan" in message  # the planted KL on saturated logits
    assert "passed: identity" in message
    _, results = battery.run_battery(planted(*bugs), checks=["batch_size_invariance"], device="cpu")
    (mse,) = [f for f in results[0].broken]
    assert mse.metric == "mse"


def test_the_explained_variance_subject_separates_the_formulas() -> None:
    """On the offset subject the four formulas differ by far more than the tolerance (float64, computed here)."""
    _, results = battery.run_battery("saecheck", checks=["explained_variance"], device="cpu")
    note = results[0].note or ""
    assert "matched the pooled definition" in note
    values = [
        float(part.split()[-1]) for part in note.split("(formulas on this subject: ")[1][:-1].split(", ")
    ]
    assert len(values) == 4
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :]) > 100 * battery.DEFAULT_TOL


def test_exact_dictionaries_are_exact() -> None:
    model = demo.relu_model("cpu")
    tokens = demo.load_tokens(2, device="cpu")
    transcoder = subjects.mlp_transcoder(model, 1)
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        out = transcoder(cache["blocks.1.ln2.hook_normalized"])
    torch.testing.assert_close(out, cache["blocks.1.hook_mlp_out"], rtol=1e-5, atol=1e-5)
    x = cache["blocks.1.hook_resid_post"] * subjects.ACTIVATION_SCALE
    identity = subjects.identity_sae(x.shape[-1], "blocks.1.hook_resid_post", x.device)
    with torch.no_grad():
        assert torch.equal(identity.decode(identity.encode(x)), x)
        mean = x.reshape(-1, x.shape[-1]).mean(0)
        assert torch.equal(
            subjects.mean_sae(mean, "h").decode(subjects.mean_sae(mean, "h").encode(x))[0, 0], mean
        )


class _HookedLayerNorm(torch.nn.Module):
    """A LayerNorm whose ``hook_normalized`` sees its normalised input before the weight and bias (TransformerLens
    3) or its output (``after_affine``, TransformerLens 2)."""

    def __init__(self, ln: Any, *, after_affine: bool) -> None:
        from transformer_lens.hook_points import HookPoint

        super().__init__()
        self.w, self.b, self.hook_normalized, self.after_affine = ln.w, ln.b, HookPoint(), after_affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        if self.after_affine:
            return self.hook_normalized(x * self.w + self.b)
        return self.hook_normalized(x) * self.w + self.b


@pytest.mark.parametrize("after_affine", [False, True])
def test_the_transcoder_subject_reads_where_hook_normalized_sits(after_affine: bool) -> None:
    """The subject folds the LayerNorm's weight and bias into the encoder only where ``hook_normalized`` sees the
    input before them; either way (and with the installed TransformerLens's own LayerNorm) it copies the MLP."""
    model = demo.relu_model("cpu")
    tokens = subjects.build_subjects("cpu").tokens
    assert (
        subjects.transcoder_gap(model, subjects.mlp_transcoder(model, 1), tokens)
        <= subjects.EXACT_SUBJECT_RTOL
    )
    ln2 = model.blocks[1].ln2
    assert not torch.allclose(ln2.w, torch.ones_like(ln2.w))  # a trained LayerNorm: the two cases differ
    model.blocks[1].ln2 = _HookedLayerNorm(ln2, after_affine=after_affine)
    model.setup()  # register the new hook point under its name
    assert subjects._hook_normalized_before_affine(model.blocks[1].ln2) is not after_affine
    transcoder = subjects.mlp_transcoder(model, 1)
    assert torch.equal(transcoder.W_enc, model.blocks[1].mlp.W_in) is after_affine  # folded or not
    assert subjects.transcoder_gap(model, transcoder, tokens) <= subjects.EXACT_SUBJECT_RTOL


def test_a_subject_that_does_not_copy_the_model_leaves_its_property_not_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(subjects, "transcoder_gap", lambda model, transcoder, tokens: 0.023)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, results = battery.run_battery(
            adapters.saecheck_pipeline, device="cpu", checks=["transcoder_splice"]
        )
    (result,) = [r for r in results if r.name == "transcoder_splice"]
    assert not result.broken
    assert "does not reproduce this model's MLP" in result.not_checked and "0.023" in result.not_checked


def test_variance_candidates_against_numpy() -> None:
    import numpy as np

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64) + 7.0
    x_hat = x + 0.3 * torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)
    got = subjects.variance_candidates(x, x_hat, batch_size=2)
    a, b = x.reshape(-1, 3).numpy(), x_hat.reshape(-1, 3).numpy()
    sse = ((a - b) ** 2).sum()
    assert math.isclose(got["pooled"], 1 - sse / ((a - a.mean(0)) ** 2).sum(), rel_tol=1e-12)
    assert math.isclose(got["about_zero"], 1 - sse / (a**2).sum(), rel_tol=1e-12)
    denominator = (a**2).sum(1).mean() - (a**2).mean(0).mean() ** 2
    assert math.isclose(got["mean_square_per_dimension"], 1 - sse / len(a) / denominator, rel_tol=1e-12)
    legacy = []
    for start in (0, 2):
        xa = x[start : start + 2].reshape(-1, 3).numpy()
        xb = x_hat[start : start + 2].reshape(-1, 3).numpy()
        legacy += list(1 - ((xa - xb) ** 2).sum(1) / ((xa - xa.mean(0)) ** 2).sum(1))
    assert math.isclose(got["legacy"], float(np.mean(legacy)), rel_tol=1e-12)


def test_flatten_reads_nested_flat_and_run_evals_tuples() -> None:
    nested = {"reconstruction_quality": {"mse": 1.5, "explained_variance": 0.9}, "token_stats": {"x": 3}}
    assert adapters.flatten_metrics(nested, "p") == {"mse": 1.5, "explained_variance": 0.9}
    assert adapters.flatten_metrics((nested, {"feature_density": [0.1]}), "p")["mse"] == 1.5
    assert adapters.flatten_metrics({"reconstruction_quality/mse": 2, "other": "x"}, "p") == {"mse": 2.0}
    assert math.isnan(adapters.flatten_metrics({"mse": float("nan")}, "p")["mse"])
    with pytest.raises(ConfigError, match="returned list"):
        adapters.flatten_metrics([1.0], "p")
    with pytest.raises(ConfigError, match="twice with different values"):
        adapters.flatten_metrics({"a": {"mse": 1.0}, "b": {"mse": 2.0}}, "p")
    with pytest.raises(ConfigError, match="not a number"):
        adapters.flatten_metrics({"mse": "high"}, "p")


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown or no properties.*choose from identity"):
        assert_metric_pipeline("saecheck", checks=["identiy"])
    with pytest.raises(ConfigError, match="unknown metric pipeline 'sae-lens'"):
        assert_metric_pipeline("sae-lens", checks=["identity"])
    with pytest.raises(ConfigError, match="pipeline must be a callable"):
        assert_metric_pipeline(3, checks=["identity"])

    def wrong_signature(model, sae):  # found by a new user: it was reported as "identity broken"
        return {}

    with pytest.raises(
        ConfigError, match=r"'wrong_signature' cannot be called as \(model, sae, tokens, \*, batch_size\)"
    ):
        assert_metric_pipeline(wrong_signature, checks=["identity"])
    with pytest.raises(ConfigError, match="tol must be positive"):
        assert_metric_pipeline("saecheck", checks=["identity"], tol=0)
    with pytest.raises(ConfigError, match="returned str"):
        assert_metric_pipeline(
            lambda model, sae, tokens, *, batch_size: "0.9", checks=["identity"], device="cpu"
        )


def test_sae_bench_missing_is_a_clear_error() -> None:
    try:
        import sae_bench  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install sae-bench"):
            assert_metric_pipeline("sae_bench", checks=["identity"], device="cpu")
    else:
        pytest.skip("SAEBench is installed here")


def test_a_selected_property_the_pipeline_cannot_run_fails_and_unselected_ones_are_listed() -> None:
    def no_options(model: Any, sae: Any, tokens: torch.Tensor, *, batch_size: int) -> Any:
        return reference_pipeline(model, sae, tokens, batch_size=batch_size)

    with pytest.raises(
        AssertionError, match=r"normalised_excluded_tokens could not be checked.*exclude_token_ids"
    ):
        assert_metric_pipeline(no_options, checks=["normalised_excluded_tokens"], device="cpu")
    _, results = battery.run_battery(
        no_options, checks=["normalised_excluded_tokens", "identity"], device="cpu"
    )
    assert results[0].not_checked and not results[1].broken


def test_a_pipeline_that_raises_breaks_the_property() -> None:
    def crashes(model: Any, sae: Any, tokens: torch.Tensor, *, batch_size: int) -> Any:
        raise RuntimeError("out of tokens")

    with pytest.raises(AssertionError, match=r"identity broken[\s\S]*RuntimeError: out of tokens"):
        assert_metric_pipeline(crashes, checks=["identity"], device="cpu")


def test_the_table_reads_release_ranges() -> None:
    assert battery.sae_lens_expected_broken("6.54.12") == {"transcoder_splice"}
    assert battery.sae_lens_expected_broken("6.5.1") == set(battery.PROPERTIES) - {"identity"}
    assert battery.sae_lens_expected_broken("6.45.1") == {
        "batch_size_invariance",
        "normalised_excluded_tokens",
        "explained_variance_half_precision",
        "mean_predictor_half_precision",
        "transcoder_splice",
        "agreement",
    }
    # the half-precision sums of 6.45.1–6.51.3 (measured on both sides: 6.51.3 breaks it, 6.51.4 holds)
    assert "explained_variance_half_precision" in battery.sae_lens_expected_broken("6.51.3")  # type: ignore[operator]
    assert "explained_variance_half_precision" not in battery.sae_lens_expected_broken("6.51.4")  # type: ignore[operator]
    assert battery.sae_lens_expected_broken("5.11.0") is None
