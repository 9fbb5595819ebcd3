"""Measure the reported-R² fingerprints on real pipelines: SAE Lens ``run_evals`` on SAEs of different quality.

For each SAE (the three demo SAEs, and noised / offset / scaled versions of ``good``) this runs the installed SAE
Lens ``run_evals`` (variance, L2-norm and sparsity metrics) on demo held-out tokens fed through an
activation-store stand-in, and, on the same activations and reconstructions (float64), every formula
:mod:`pytest_saecheck.checks.fingerprints` knows. It prints, per SAE and batch size, the gap ratio
``(R² − legacy) / (1 − legacy)`` of the correct pooled R² and of each wrong formula, and the verdict of
``assert_r2_matches_legacy`` on the real ``run_evals`` output. These numbers set ``LEGACY_GAP_RATIO``.

Run: ``PYTHONPATH=. python benchmarks/r2_fingerprints.py [OUT.json [NAME-FILTER]]`` (CPU, a few minutes); with
another SAE Lens installed (e.g. 6.5.1, whose ``run_evals`` computes the collapsed formula) it measures that
release's output.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from bench_engine import TokenStore  # the activation-store stand-in (this script's folder is on sys.path)

from pytest_saecheck import demo
from pytest_saecheck.checks import fingerprints


def variants(device: str) -> dict[str, Any]:
    """Demo SAEs and derived dictionaries of lower quality (noised decoder, constant offset, shrunk output)."""
    saes: dict[str, Any] = {name: demo.load_sae(name, device=device) for name in demo.SAE_NAMES}
    generator = torch.Generator().manual_seed(0)
    for level in (0.5, 1.0, 2.0):
        sae = demo.load_sae("good", device=device)
        with torch.no_grad():
            noise = torch.randn(sae.W_dec.shape, generator=generator).to(sae.W_dec)
            sae.W_dec.add_(
                level * sae.W_dec.norm(dim=1, keepdim=True).mean() * noise / sae.W_dec.shape[1] ** 0.5
            )
        saes[f"good+noise{level}"] = sae
    offset = demo.load_sae("good", device=device)
    with torch.no_grad():
        offset.b_dec.add_(0.5 * offset.W_dec.norm(dim=1).mean())
    saes["good+offset"] = offset
    shrunk = demo.load_sae("good", device=device)
    with torch.no_grad():
        shrunk.W_dec.mul_(0.6)
    saes["good×0.6"] = shrunk
    return saes


def shifts(model: Any, hook: str, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Constant shifts ``c`` of the hooked activations that put E‖x + c‖² at a share of d² (large-mean data).

    Real LM residual streams have a large mean; the demo's is small. Adding ``c`` to the activations (a
    permanent hook) and to the SAE's ``b_dec`` (applied to its input, so the SAE is shift-equivariant) leaves the
    pooled and legacy R² unchanged and moves every about-zero formula; the share of d² sets where the
    collapsed formula's two terms cancel (1.0) or its variance turns negative (above 1).
    """
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        x = cache[hook].flatten(0, 1).double()
    d = x.shape[1]
    mean, second = x.mean(dim=0), x.pow(2).sum(dim=1).mean()
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direction /= direction.norm()
    out = {}
    for share in (0.1, 0.5, 0.91, 1.2):
        # ‖c‖² + 2 c·μ + E‖x‖² = share × d², c = a × direction
        b, c0 = 2 * float(direction @ mean), float(second) - share * d * d
        a = (-b + (b * b - 4 * c0) ** 0.5) / 2
        out[f"shift{share}d²"] = (a * direction).float()
    return out


def activations(
    model: Any, sae: Any, tokens: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, ...]]:
    """(x, x̂) per run_evals batch, all positions, float64."""
    hook = sae.cfg.metadata.hook_name
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(tokens[start : start + batch_size], names_filter=[hook])
            x = cache[hook].flatten(0, 1)
            out.append((x.double(), sae(x).double()))
    return out


def main() -> None:
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    model = demo.load_model(device=device)
    n_sequences = 64
    tokens = demo.load_tokens(n_sequences=n_sequences, seed=0, device=device)
    import inspect

    import sae_lens

    rows = []
    hook = demo.metadata()["hook_name"]
    subjects: list[tuple[str, Any, torch.Tensor | None]] = [
        (name, sae, None) for name, sae in variants(device).items()
    ]
    for base in ("good", "variance_only"):
        for label, shift in shifts(model, hook, tokens).items():
            sae = demo.load_sae(base, device=device)
            with torch.no_grad():
                sae.b_dec.add_(shift.to(sae.b_dec))
            subjects.append((f"{base}+{label}", sae, shift.to(device)))
    keywords = (
        {"exclude_special_tokens": False}
        if "exclude_special_tokens" in inspect.signature(run_evals).parameters
        else {}
    )
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    for name, sae, shift in subjects:
        if only not in name:
            continue
        model.reset_hooks(including_permanent=True)
        if shift is not None:
            model.add_perma_hook(hook, lambda acts, hook, shift=shift: acts + shift)
        for batch_size in (8, 32):
            n_batches = n_sequences // batch_size
            config = EvalConfig(
                batch_size_prompts=batch_size,
                n_eval_reconstruction_batches=1,
                n_eval_sparsity_variance_batches=n_batches,
                compute_l2_norms=True,
                compute_sparsity_metrics=True,
                compute_variance_metrics=True,
            )
            reported, _ = run_evals(
                sae, TokenStore(tokens, batch_size), model, ActivationScaler(), config, **keywords
            )
            batches = activations(model, sae, tokens, batch_size)
            values = fingerprints.formula_values(batches)
            legacy = reported["reconstruction_quality"]["explained_variance_legacy"]
            ratios = {key: (value - legacy) / (1 - legacy) for key, value in values.items()}
            verdicts = []
            for producer in (None, "sae_lens"):  # the numbers alone; then naming the installed SAE Lens
                try:
                    fingerprints.assert_r2_matches_legacy(reported, producer=producer)
                    verdicts.append("passed")
                except AssertionError as error:
                    verdicts.append(
                        "FAILED: " + str(error).splitlines()[0][len("assert_r2_matches_legacy failed: ") :]
                    )
            verdict = " | producer='sae_lens': ".join(verdicts)
            row = {
                "sae_lens": sae_lens.__version__,
                "sae": name,
                "batch_size": batch_size,
                "run_evals": {k: v for group in reported.values() for k, v in group.items()},
                "formulas": values,
                "gap_ratio": ratios,
                "verdict": verdict,
            }
            rows.append(row)
            print(
                f"{name:16s} bs={batch_size:3d} R²={values['pooled']:.4f} legacy={legacy:.4f} "
                + " ".join(f"r[{k}]={v:.3f}" for k, v in ratios.items())
                + f" ev={reported['reconstruction_quality']['explained_variance']:.4f} | {verdict}",
                flush=True,
            )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
