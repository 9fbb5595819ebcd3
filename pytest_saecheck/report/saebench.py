"""SAEBench-format results: each SAE's core-evaluation numbers in SAEBench's core result format.

SAEBench's core eval (``sae_bench/evals/core``, ``CoreEvalOutput`` in ``eval_output.py``, release 0.6.0) writes one
JSON file per SAE: ``eval_type_id`` ``"core"``, ``eval_config`` (``CoreEvalConfig``), ``eval_id``,
``datetime_epoch_millis``, ``eval_result_metrics`` in seven categories (model behaviour and performance
preservation, reconstruction quality, shrinkage, sparsity, token statistics, miscellaneous), feature-wise
``eval_result_details``, ``sae_bench_commit_hash``, ``sae_lens_id``, ``sae_lens_release_id``, ``sae_lens_version``,
``sae_cfg_dict`` and ``eval_result_unstructured``. Neuronpedia and SAEBench's plotting tools read these files.
:func:`core_result` maps one SAE of pytest-saecheck's result document onto that format, with this product's own
definitions where they differ from SAEBench's; the file says which (``eval_result_unstructured["saecheck"]``):

- ``explained_variance`` is the pooled R² about the mean over all evaluated tokens (SAEBench 0.4.1–0.6.0 writes
  the collapsed formula, see :mod:`pytest_saecheck.checks.fingerprints`);
- ``mse`` is the mean over tokens of ‖x − x̂‖² (summed over the hidden dimension);
- ``relative_reconstruction_bias`` is pooled over all tokens (SAEBench averages a per-batch ratio);
- the token policy is this product's (BOS/EOS/PAD left out of the splice, the ablation and the averages);
- ``ce_loss_with_ablation`` and ``kl_div_with_ablation`` are the zero ablation of the kept positions only;
- ``sae_bench_commit_hash`` names pytest-saecheck, not a SAEBench commit: these numbers were not made by SAEBench.

The miscellaneous density statistics are SAEBench's definitions (``calculate_misc_metrics``) on the latent
firing densities of the evaluated tokens (:func:`density_statistics`); the encoder/decoder cosine statistics are
computed from the weights when the SAEBench export is asked for (:func:`max_cosine_statistics`), and are
``null`` for a dictionary without ``W_enc``/``W_dec`` (listed in ``not_measured``). Feature-wise details are not
written (``eval_result_details`` is empty, as SAEBench writes it without ``compute_featurewise_*``).

Writers: ``--saecheck-saebench-json DIR`` (the report plugin) and ``python -m pytest_saecheck.report
export-saebench RESULT.json DIR``; both call :func:`write_core_results`. Imports no torch at import time.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pytest_saecheck.errors import ConfigError

EVAL_TYPE_ID = "core"
FILE_SUFFIX = "_eval_results.json"
"""SAEBench names each core result ``<release>_<sae id>_eval_results.json``; here ``<label>`` replaces the pair."""

DENSITY_THRESHOLDS: tuple[tuple[float, str], ...] = ((0.01, "1_percent"), (0.1, "10_percent"))

#: Our metric name for each SAEBench core metric, by category (``None``: computed here from other fields).
CORE_METRICS: dict[str, dict[str, str | None]] = {
    "model_behavior_preservation": {
        "kl_div_score": "kl_div_score",
        "kl_div_with_ablation": "kl_zero",
        "kl_div_with_sae": "kl_sae",
    },
    "model_performance_preservation": {
        "ce_loss_score": "ce_loss_score",
        "ce_loss_with_ablation": "ce_zero",
        "ce_loss_with_sae": "ce_sae",
        "ce_loss_without_sae": "ce_orig",
    },
    "reconstruction_quality": {
        "explained_variance": "explained_variance",
        "explained_variance_legacy": "explained_variance_legacy",
        "mse": "mse",
        "cossim": "cosine_sim",
    },
    "shrinkage": {
        "l2_norm_in": "l2_norm_in",
        "l2_norm_out": "l2_norm_out",
        "l2_ratio": "l2_ratio",
        "relative_reconstruction_bias": "relative_reconstruction_bias",
    },
    "sparsity": {"l0": "l0", "l1": "l1"},
    "token_stats": {"total_tokens_eval_reconstruction": None, "total_tokens_eval_sparsity_variance": None},
    "misc_metrics": {
        "freq_over_1_percent": None,
        "freq_over_10_percent": None,
        "normalized_freq_over_1_percent": None,
        "normalized_freq_over_10_percent": None,
        "average_max_encoder_cosine_sim": None,
        "average_max_decoder_cosine_sim": None,
        "frac_alive": "alive_fraction",
    },
}

DIFFERENCES: dict[str, str] = {
    "explained_variance": "pooled R² about the mean over all evaluated tokens, 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²",
    "mse": "mean over tokens of ‖x − x̂‖², summed over the hidden dimension",
    "relative_reconstruction_bias": "Σ‖x̂‖² / Σ x·x̂ pooled over all evaluated tokens (SAEBench: mean of per-batch ratios)",
    "ce_loss_with_ablation": "zero ablation of the kept positions only (the token policy)",
    "kl_div_with_ablation": "zero ablation of the kept positions only (the token policy)",
    "token policy": "BOS/EOS/PAD (and exclude_token_ids) are left out of the splice, the ablations and the averages",
    "sae_bench_commit_hash": "names pytest-saecheck: SAEBench did not compute these numbers",
}


def density_statistics(density: Sequence[float]) -> dict[str, float]:
    """SAEBench's density statistics (``calculate_misc_metrics`` of its core eval) of per-latent firing densities
    ``density`` (fractions of evaluated tokens, one per latent): ``frac_alive`` (share with density > 0),
    ``freq_over_{1,10}_percent`` (share above 0.01 / 0.1) and ``normalized_freq_over_{1,10}_percent`` (their share
    of the total density, 0 when nothing fires).

    Raises :class:`ConfigError` for an empty or non-finite ``density``.
    """
    values = [float(value) for value in density]
    if not values or not all(math.isfinite(value) for value in values):
        raise ConfigError("latent densities must be a non-empty list of finite numbers")
    total = sum(values)
    out = {"frac_alive": sum(value > 0 for value in values) / len(values)}
    for threshold, name in DENSITY_THRESHOLDS:
        above = [value for value in values if value > threshold]
        out[f"freq_over_{name}"] = len(above) / len(values)
        out[f"normalized_freq_over_{name}"] = sum(above) / total if total > 0 else 0.0
    return out


def max_cosine_statistics(sae: Any, chunk: int = 4096) -> dict[str, float] | None:
    """The mean over latents of the largest cosine similarity with any other latent's encoder direction
    (``average_max_encoder_cosine_sim``) and decoder direction (``average_max_decoder_cosine_sim``), SAEBench's
    weight-based statistics. ``sae.W_enc`` is ``[d_in, d_sae]`` and ``sae.W_dec`` ``[d_sae, d_in]`` (SAE Lens'
    layout); computed in float32 on the weights' device, ``chunk`` latents at a time (cost O(d_sae² · d_in)).

    None for a dictionary without both matrices, or with fewer than two latents.
    """
    import torch

    enc, dec = getattr(sae, "W_enc", None), getattr(sae, "W_dec", None)
    if (
        not isinstance(enc, torch.Tensor)
        or not isinstance(dec, torch.Tensor)
        or enc.ndim != 2
        or dec.ndim != 2
    ):
        return None
    if dec.shape[0] < 2:
        return None

    def average_max(directions: Any) -> float:  # directions [d_sae, d]
        unit = torch.nn.functional.normalize(directions.detach().float(), dim=-1)
        best = []
        for start in range(0, unit.shape[0], chunk):
            sims = unit[start : start + chunk] @ unit.T  # [chunk, d_sae]
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = -math.inf  # not itself
            best.append(sims.max(dim=-1).values.double().cpu())
        return float(torch.cat(best).mean())

    with torch.no_grad():
        return {
            "average_max_encoder_cosine_sim": average_max(enc.T),
            "average_max_decoder_cosine_sim": average_max(dec),
        }


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _epoch_millis(created: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(created)).timestamp() * 1000)
    except ValueError:
        return 0


def core_result(entry: Mapping[str, Any], document: Mapping[str, Any]) -> dict[str, Any]:
    """One SAE of a result ``document`` (``entry``: an element of ``document["saes"]``) as an SAEBench core result.

    Numbers the evaluation did not produce (an undefined ratio, a joint splice's reconstruction) are ``null`` and
    listed with their reason in ``eval_result_unstructured["saecheck"]["not_measured"]`` (``"name: reason"``).

    Raises :class:`ConfigError` for an entry that was not evaluated.
    """
    label = str(entry.get("label"))
    metrics = entry.get("metrics") or {}
    if not entry.get("evaluated") or not metrics:
        raise ConfigError(f"SAE {label!r} was not evaluated in this result: no core numbers to export")
    undefined = dict(entry.get("undefined") or {})
    histogram = entry.get("latent_density_histogram") or {}
    dictionary = entry.get("dictionary") or {}
    tokens = entry.get("tokens") or {}
    computed: dict[str, Any] = {
        **(histogram.get("saebench") or {}),
        **(dictionary.get("max_cosine") or {}),
        "total_tokens_eval_reconstruction": tokens.get("n_tokens"),
        "total_tokens_eval_sparsity_variance": tokens.get("n_tokens"),
    }
    not_measured: dict[str, str] = {}
    categories: dict[str, dict[str, Any]] = {}
    for category, fields in CORE_METRICS.items():
        values: dict[str, Any] = {}
        for field, ours in fields.items():
            value = metrics.get(ours) if ours is not None else None
            if value is None and field in computed:
                value = computed[field]
            value = value if isinstance(value, int) and not isinstance(value, bool) else _finite(value)
            if value is None:
                not_measured[field] = undefined.get(ours or field, "not computed by this evaluation")
            values[field] = value
        categories[category] = values
    settings = entry.get("settings") or {}
    policy = entry.get("token_policy") or {}
    batch_size = entry.get("batch_size") or settings.get("batch_size") or 1
    n_sequences = tokens.get("n_sequences") or 0
    batches = math.ceil(n_sequences / batch_size) if n_sequences else 0
    release, _, sae_id = label.partition("/")
    generator = document.get("generator") or {}
    version = f"{generator.get('name', 'pytest-saecheck')} {generator.get('version', '')}".strip()
    model = entry.get("model") or {}
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": {
            "model_name": str(model.get("resolved") or model.get("spec") or ""),
            "llm_dtype": str(entry.get("dtype") or ""),
            "batch_size_prompts": int(batch_size),
            "n_eval_reconstruction_batches": batches,
            "n_eval_sparsity_variance_batches": batches,
            "dataset": str(tokens.get("source") or tokens.get("spec") or ""),
            "context_size": int(tokens.get("seq_len") or tokens.get("context_size") or 0),
            "compute_kl": True,
            "compute_ce_loss": True,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": False,
            "compute_featurewise_weight_based_metrics": False,
            "exclude_special_tokens_from_reconstruction": bool(policy.get("exclude_special_tokens", True)),
            "verbose": False,
        },
        "eval_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"pytest-saecheck:{document.get('created')}:{label}")),
        "datetime_epoch_millis": _epoch_millis(document.get("created")),
        "eval_result_metrics": categories,
        "eval_result_details": [],
        "sae_bench_commit_hash": f"not SAEBench: {version}",
        "sae_lens_id": sae_id or None,
        "sae_lens_release_id": release if sae_id else None,
        "sae_lens_version": (document.get("environment") or {}).get("packages", {}).get("sae-lens"),
        "sae_cfg_dict": dict(dictionary) or None,
        "eval_result_unstructured": {
            "saecheck": {
                "saecheck_version": generator.get("version"),
                "label": label,
                # "name: text" lines rather than a mapping, so no reader takes a text for a metric's value
                "definitions": [f"{name}: {text}" for name, text in DIFFERENCES.items()],
                "not_measured": [f"{name}: {reason}" for name, reason in not_measured.items()],
                "token_policy": policy,
            }
        },
    }


def file_name(label: str) -> str:
    """The file of one SAE's core result: its label with every character outside ``[A-Za-z0-9._-]`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", label).strip("_") + FILE_SUFFIX


def write_core_results(document: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Write :func:`core_result` of every evaluated SAE of ``document`` into ``directory`` (created if missing),
    one file each (:func:`file_name`); returns the paths. SAEs that were not evaluated are skipped."""
    from pytest_saecheck.files import write_atomic
    from pytest_saecheck.report.files import dumps

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    names: set[str] = set()
    for entry in document.get("saes") or ():
        if not entry.get("evaluated") or not entry.get("metrics"):
            continue
        name = file_name(str(entry.get("label")))
        if name in names:  # two evaluations of one SAE (other settings): keep them apart
            name = name.removesuffix(FILE_SUFFIX) + f"_{entry.get('id')}" + FILE_SUFFIX
        names.add(name)
        written.append(write_atomic(folder / name, dumps(core_result(entry, document))))
    return written
