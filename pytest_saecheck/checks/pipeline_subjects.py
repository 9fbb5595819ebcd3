"""The subjects of the metric-pipeline battery, built offline in code from a plug-in's small model.

The model, its tokens, a ReLU variant of it and a well-trained SAE come from a plug-in
(``pytest_saecheck_pipeline_subjects``, :func:`build_subjects`): the bundled demo's
(:mod:`pytest_saecheck.demo.plugin`). Every subject is a (model, dictionary, tokens) triple whose right metric
values are known exactly, by construction or by a float64 computation on the activations
(:func:`variance_candidates`):

- :func:`identity_sae` reconstructs every activation exactly: ReLU(x) − ReLU(−x) = x with latent pairs
  (e_i, −e_i), for any input scale;
- :func:`mean_sae` predicts the mean activation of the evaluated tokens for every token (pooled R² = 0);
- :func:`projection_sae` reconstructs x̄ + U Uᵀ(x − x̄), U the top principal directions: an R² strictly between
  0 and 1 that tells the explained-variance formulas apart when the activations have a large mean
  (:func:`offset_model` adds one);
- :func:`saturated_model` multiplies the unembedding so that softmax probabilities underflow to exactly 0;
- :attr:`Subjects.relu_model` and :func:`mlp_transcoder`: the model with a ReLU MLP, and a transcoder whose
  weights are that MLP's, so splicing it at its output hook changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

N_SEQUENCES = 16
"""Sequences of the demo's held-out text evaluated by every property (64 tokens each)."""
BATCH_SIZES: tuple[int, int] = (8, 4)
"""Sequences per batch: the battery's usual batch size first, the second batch size of the invariance check."""
ACTIVATION_SCALE = 4.0
"""The activation scale of the normalised SAE (any factor ≠ 1 shows the fault)."""
SATURATION = 50.0
"""The unembedding factor of the saturated model: the demo's logits span about 15 nats, so about 750 after."""
OFFSET_NORM = 5.0
"""The norm of the offset added to the activations, in units of their root-mean-square spread about the mean."""
PROJECTION_RANK = 4
"""Principal directions kept by :func:`projection_sae` (of the demo's 128)."""
TRANSCODER_LAYER = 1
NORMALISED_HOOK = "blocks.1.hook_attn_out"
"""Where the normalised SAE reads and writes. Not a residual-stream hook: a residual activation scaled at a few
positions is undone by the next LayerNorm for every other position, so a wrongly scaled excluded position would
change only its own (excluded, unscored) prediction there and the fault would stay hidden."""


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _standard_sae(d_in: int, d_sae: int, hook_name: str, device: Any, *, b_dec_to_input: bool) -> Any:
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=b_dec_to_input))
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.model_name = "saecheck-demo"
    return sae.to(device)


def identity_sae(d_in: int, hook_name: str, device: Any) -> Any:
    """An SAE Lens ``StandardSAE`` with ``decode(encode(x)) == x`` exactly, at any scale of ``x`` [.., d_in]."""
    import torch

    sae = _standard_sae(d_in, 2 * d_in, hook_name, device, b_dec_to_input=False)
    eye = torch.eye(d_in, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def mean_sae(mean: torch.Tensor, hook_name: str) -> Any:
    """A ``StandardSAE`` whose reconstruction is ``mean`` [d_in] for every input (no latent ever fires)."""
    import torch

    d_in = int(mean.shape[0])
    sae = _standard_sae(d_in, d_in, hook_name, mean.device, b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_enc.zero_()
        sae.b_dec.copy_(mean.to(sae.b_dec.dtype))
    return sae


def projection_sae(mean: torch.Tensor, directions: torch.Tensor, hook_name: str) -> Any:
    """A ``StandardSAE`` reconstructing ``mean + U Uᵀ (x − mean)``, ``U = directions`` [d_in, k] orthonormal."""
    import torch

    d_in, k = (int(n) for n in directions.shape)
    sae = _standard_sae(d_in, 2 * k, hook_name, mean.device, b_dec_to_input=True)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([directions, -directions], dim=1))
        sae.W_dec.copy_(torch.cat([directions.T, -directions.T], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.copy_(mean)
    return sae


def mlp_transcoder(model: Any, layer: int) -> Any:
    """An SAE Lens ``Transcoder`` holding block ``layer``'s MLP weights (the LayerNorm's weight and bias folded
    into the encoder): reads ``blocks.L.ln2.hook_normalized``, writes ``blocks.L.hook_mlp_out``, and equals the
    MLP up to float rounding when the model's MLP uses ReLU and an ``LN`` LayerNorm.

    Raises:
        ImportError: the installed SAE Lens has no ``Transcoder``.
    """
    import torch
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    mlp = model.blocks[layer].mlp
    d_model, d_mlp = (int(n) for n in mlp.W_in.shape)
    transcoder = Transcoder(
        TranscoderConfig(d_in=d_model, d_sae=d_mlp, d_out=d_model, apply_b_dec_to_input=False)
    )
    transcoder.cfg.metadata.hook_name = f"blocks.{layer}.ln2.hook_normalized"
    transcoder.cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
    transcoder.cfg.metadata.model_name = "saecheck-demo"
    transcoder = transcoder.to(_device(model))
    ln2 = model.blocks[layer].ln2
    with torch.no_grad():
        if _hook_normalized_before_affine(ln2):
            # TransformerLens 3: hook_normalized is the LayerNorm's output before its weight and bias: fold them
            # into the encoder.
            transcoder.W_enc.copy_(ln2.w[:, None] * mlp.W_in)
            transcoder.b_enc.copy_(mlp.b_in + ln2.b @ mlp.W_in)
        else:  # TransformerLens 2: hook_normalized is the LayerNorm's output, weight and bias applied
            transcoder.W_enc.copy_(mlp.W_in)
            transcoder.b_enc.copy_(mlp.b_in)
        transcoder.W_dec.copy_(mlp.W_out)
        transcoder.b_dec.copy_(mlp.b_out)
    return transcoder


def _hook_normalized_before_affine(ln: Any) -> bool:
    """Whether a TransformerLens ``LayerNorm``'s ``hook_normalized`` sees its input normalised but before its weight
    and bias (TransformerLens 3) or its output (TransformerLens 2): decided by running it on one vector."""
    import torch

    seen: list[torch.Tensor] = []
    handle = ln.hook_normalized.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            x = torch.linspace(-1.0, 2.0, int(ln.w.shape[0]), device=ln.w.device, dtype=ln.w.dtype)[
                None, None
            ]
            out = ln(x)
    finally:
        handle.remove()
    return not torch.allclose(seen[0], out)


EXACT_SUBJECT_RTOL = 1e-5
"""The largest relative gap (to the largest |activation|) at which a subject built to copy the model counts as
exact. Measured for the transcoder subject on the battery's tokens: 2.9e-7 with TransformerLens 3.9 (float32
rounding). Before the subject read where ``hook_normalized`` sits (before the LayerNorm's weight and bias in
TransformerLens 3, after them in 2), it was 2.3e-2 off with TransformerLens 2.18."""


def transcoder_gap(model: Any, transcoder: Any, tokens: torch.Tensor) -> float:
    """How far ``transcoder`` is from the MLP it copies on ``tokens``: ``max |T(x_in) − x_out| / max |x_out|`` at
    its read and write hooks (0 when exact). A subject that does not reproduce the model on this stack (another
    TransformerLens's hook semantics) cannot tell a faithful splice from a faulty one."""
    import torch

    metadata = transcoder.cfg.metadata
    x_in = activations(model, tokens, metadata.hook_name)
    x_out = activations(model, tokens, metadata.hook_name_out)
    with torch.inference_mode():
        device = next(transcoder.parameters()).device
        recon = transcoder.decode(transcoder.encode(x_in.to(device))).to(x_out.device)
    scale = float(x_out.abs().max())
    return float((recon - x_out).abs().max()) / scale if scale > 0 else float((recon - x_out).abs().max())


def saturated_model(model: Any, factor: float = SATURATION) -> Any:
    """A copy of ``model`` with its unembedding multiplied by ``factor``: most probabilities are exactly 0."""
    import torch

    saturated = copy.deepcopy(model)
    with torch.no_grad():
        saturated.unembed.W_U.mul_(factor)
        saturated.unembed.b_U.mul_(factor)
    return saturated


def offset_model(model: Any, layer: int, offset: torch.Tensor) -> Any:
    """A copy of ``model`` whose block ``layer`` attention output bias is shifted by ``offset`` [d_model]: every
    activation of ``blocks.L.hook_resid_post`` moves by the same vector."""
    import torch

    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.blocks[layer].attn.b_O.add_(offset.to(shifted.blocks[layer].attn.b_O.dtype))
    return shifted


def activations(model: Any, tokens: torch.Tensor, hook_name: str) -> torch.Tensor:
    """The activations of ``hook_name`` on ``tokens``, ``[n_sequences, seq_len, d]``, in the model's dtype."""
    import torch

    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens.to(_device(model)), names_filter=[hook_name])
    return cache[hook_name].detach().clone()


def variance_candidates(x: torch.Tensor, x_hat: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Every explained-variance formula in use, in float64, on ``x``, ``x_hat`` ``[n_sequences, seq_len, d]``.

    ``pooled`` 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (the definition; SAE Lens ≥ 6.45.1's ``ExplainedVarianceCalculator``);
    ``about_zero`` 1 − Σ‖x − x̂‖² / Σ‖x‖²; ``mean_square_per_dimension`` 1 − E‖x − x̂‖² / (E‖x‖² − (mean_d E[x_d²])²)
    (SAEBench 0.6.0 and SAE Lens ≤ 6.45.0: the per-dimension means collapsed to one number and E[x_d²] taken for
    E[x_d]); ``legacy`` mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_batch‖², x̄_batch the mean of the tokens of
    that token's batch of ``batch_size`` sequences (SAE Lens' ``explained_variance_legacy``).
    """
    import torch

    x64 = x.to(torch.float64)
    err = (x64 - x_hat.to(torch.float64)).pow(2).sum(-1)  # [n, s]
    flat = x64.reshape(-1, x64.shape[-1])
    sse = float(err.sum())
    sst = float((flat - flat.mean(0)).pow(2).sum())
    mean_sq_norm = float(flat.pow(2).sum(-1).mean())
    per_dimension = float(flat.pow(2).mean(0).mean())
    legacy = []
    for start in range(0, x64.shape[0], batch_size):
        batch = x64[start : start + batch_size].reshape(-1, x64.shape[-1])
        spread = (batch - batch.mean(0)).pow(2).sum(-1)
        legacy.append(1.0 - err[start : start + batch_size].reshape(-1) / spread)
    return {
        "pooled": 1.0 - sse / sst,
        "about_zero": 1.0 - sse / float(flat.pow(2).sum()),
        "mean_square_per_dimension": 1.0 - (sse / flat.shape[0]) / (mean_sq_norm - per_dimension**2),
        "legacy": float(torch.cat(legacy).mean()),
    }


@dataclass
class Subjects:
    """The battery's subjects (built once, lazily per property by :func:`build_subjects`' callers).

    ``model``: a TransformerLens model (float32) with at least :data:`TRANSCODER_LAYER` + 1 blocks and a
    ``blocks.1.hook_attn_out``; ``tokens``: :data:`N_SEQUENCES` held-out sequences ``[N_SEQUENCES, seq_len]`` (CPU);
    ``hook_name``: where the SAEs read; ``special_token_ids``: the BOS and EOS ids (the excluded ids of the
    normalised-SAE property); ``relu_model(device)``: the same weights with a ReLU MLP (a different, still fixed,
    model); ``trained_sae(device)``: a well-trained SAE on ``hook_name``; ``description``: the model and SAE in
    words, for the agreement property's note.
    """

    model: Any
    tokens: torch.Tensor
    hook_name: str
    special_token_ids: Sequence[int]
    relu_model: Callable[[Any], Any]
    trained_sae: Callable[[Any], Any]
    description: str


def build_subjects(device: Any = None) -> Subjects:
    """The plug-in's subjects (``pytest_saecheck_pipeline_subjects``) on ``device`` (default CUDA when available).

    Raises :class:`~pytest_saecheck.errors.ConfigError` when no plug-in gives them (the bundled demo's plug-in
    is not installed).
    """
    from pytest_saecheck import extensions
    from pytest_saecheck.errors import ConfigError

    subjects = extensions.relay().pytest_saecheck_pipeline_subjects(device=device)
    if subjects is None:
        raise ConfigError(
            "no plug-in gives the metric-pipeline battery's subjects (pytest_saecheck_pipeline_subjects); "
            "reinstall pytest-saecheck so that its bundled demo plug-in (entry point 'saecheck-demo') is registered"
        )
    if not isinstance(subjects, Subjects):
        raise ConfigError(
            f"pytest_saecheck_pipeline_subjects returned {type(subjects).__name__}, not "
            "pytest_saecheck.checks.pipeline_subjects.Subjects"
        )
    return subjects


__all__ = [
    "ACTIVATION_SCALE",
    "BATCH_SIZES",
    "EXACT_SUBJECT_RTOL",
    "N_SEQUENCES",
    "Subjects",
    "activations",
    "build_subjects",
    "identity_sae",
    "mean_sae",
    "mlp_transcoder",
    "offset_model",
    "projection_sae",
    "saturated_model",
    "transcoder_gap",
    "variance_candidates",
]
