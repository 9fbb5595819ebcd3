"""Rebuild the demo assets from seeds: corpus -> model -> SAEs -> metadata.

Usage::

    python -m pytest_saecheck.demo.build                 # write into pytest_saecheck/demo/assets/
    python -m pytest_saecheck.demo.build --out DIR       # write elsewhere
    python -m pytest_saecheck.demo.build --check         # rebuild in a temp dir, compare with the shipped metadata

Everything is seeded (Python's ``random`` for the text, ``torch.manual_seed`` for weights and batches) and runs
on CPU with a fixed number of threads, so a rebuild on the same machine reproduces the same numbers. Float
reductions differ between CPUs and BLAS builds, so ``--check`` compares metrics within :data:`CHECK_TOLERANCE`
instead of bitwise.

Evaluation policy used for every number in ``metadata.json``: position 0 (``<bos>``) is neither spliced nor
ablated nor scored; cross-entropy is the mean next-token loss of the predictions made at positions 1..n-2;
explained variance is ``1 - sum|x - x_hat|^2 / sum|x - mean|^2`` over positions >= 1, accumulated in float64.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_saecheck.demo.language import NAME, VOCAB, make_sequences, unigram_entropy
from pytest_saecheck.demo.model import ASSETS_DIR, MODEL_WEIGHTS_FILENAME, make_model

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

METADATA_FILENAME = "metadata.json"
SAES_DIRNAME = "saes"
MODEL_NAME = NAME
DATASET_PATH = NAME

CHECK_TOLERANCE: dict[str, float] = {
    "nats": 0.02,  # absolute, for every cross-entropy and delta_ce
    "fraction": 0.01,  # absolute, for ce_loss_score and explained_variance
    "l0_relative": 0.05,  # relative, for l0
    "alive_fraction": 0.05,  # absolute, for n_alive / d_sae
    "law_relative": 0.1,  # relative, for the scaling-law fit's E, A and gamma
}
"""Tolerances of ``build --check`` (rebuilt vs. shipped metadata)."""


@dataclass(frozen=True)
class FamilyMember:
    """One smaller model of the demo's model family, trained like the demo model on a prefix of its text.

    ``n_layers``, ``d_model``, ``n_heads``: its shape (``d_head = d_model / n_heads``, ``d_mlp = 4 d_model``);
    ``steps`` x ``batch`` sequences of ``n_ctx`` tokens: its token budget D (one epoch, in order).
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    steps: int
    batch: int


DEMO_FAMILY: tuple[FamilyMember, ...] = (
    # The demo model's depth (3 layers: shallower models lack the two-layer circuits the language's copies need,
    # a capability jump rather than a point on a smooth curve), narrower, on fewer tokens: width and token
    # budget grow together, from about C/100 to C/4 of the demo model's compute C. The demo model itself is
    # the largest member.
    FamilyMember("l3-d32", 3, 32, 1, 150, 64),
    FamilyMember("l3-d48", 3, 48, 3, 225, 64),
    FamilyMember("l3-d64", 3, 64, 2, 300, 64),
    FamilyMember("l3-d96", 3, 96, 3, 400, 64),
)
"""The demo model's smaller siblings for the scaling-law fit (:func:`fit_demo_family`)."""


@dataclass(frozen=True)
class BuildConfig:
    """Every knob of the build. The defaults produce the shipped assets."""

    seed: int = 0
    threads: int = 1
    # model
    n_layers: int = 3
    d_model: int = 128
    n_heads: int = 4
    n_ctx: int = 64
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    hook_name: str = "blocks.1.hook_resid_post"
    # model training
    model_steps: int = 600
    model_batch: int = 64
    model_lr: float = 2e-3
    model_warmup: int = 50
    model_weight_decay: float = 0.01
    n_eval_sequences: int = 256  # held-out sequences (split "heldout", seed `seed`) for every metric
    # SAE training data: activations of training-distribution text from a seed the model never saw
    sae_n_sequences: int = 3000
    sae_batch: int = 1024
    # good: TopK with AuxK
    good_d_sae: int = 512
    good_k: int = 16
    good_steps: int = 1500
    good_lr: float = 2e-3
    # variance_only: projection on the top principal components (R^2 just above 0.9, delta_ce far above good's)
    variance_only_components: int = 18
    # dead: TopK without AuxK at a high learning rate
    dead_d_sae: int = 1024
    dead_k: int = 16
    dead_steps: int = 400
    dead_lr: float = 3e-2
    dead_feature_window: int = 200
    # the model family of the scaling-law fit (the demo model is its largest member)
    family: tuple[FamilyMember, ...] = DEMO_FAMILY
    family_seed: int = 10  # member i initialises its weights from torch seed seed + family_seed + i
    family_bootstrap: int = 200

    def model_config_dict(self) -> dict[str, Any]:
        return {
            "model_name": MODEL_NAME,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_head": self.d_model // self.n_heads,
            "d_mlp": 4 * self.d_model,
            "n_ctx": self.n_ctx,
            "d_vocab": len(VOCAB),
            "act_fn": self.act_fn,
            "normalization_type": self.normalization_type,
            "positional_embedding_type": "standard",
            "default_prepend_bos": True,
            "seed": self.seed,
        }


SAE_NAMES: tuple[str, ...] = ("good", "variance_only", "dead")


# ----------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _sequences_tensor(n: int, seq_len: int, seed: int, split: str) -> torch.Tensor:
    import torch

    ids, _ = make_sequences(n, seq_len, seed=seed, split=split)
    return torch.tensor(ids, dtype=torch.long)


def train_model(cfg: BuildConfig, log: Any = print) -> tuple[HookedTransformer, dict[str, float]]:
    """Train the demo transformer on ``model_steps * model_batch`` fresh training sequences (one epoch)."""
    import torch

    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model_config_dict())
    n_seq = cfg.model_steps * cfg.model_batch
    data = _sequences_tensor(n_seq, cfg.n_ctx, cfg.seed, "train")
    _train_lm(
        model, data, cfg, steps=cfg.model_steps, batch=cfg.model_batch, warmup=cfg.model_warmup, log=log
    )
    # unigram entropy of the training text, over the scored targets (positions >= 2: predictions from >= 1)
    counts = torch.bincount(data[:, 2:].reshape(-1), minlength=len(VOCAB)).tolist()
    stats = {
        "unigram_entropy": unigram_entropy(counts),
        "train_tokens": int(data.numel()),
        "train_ce": model_ce(model, data[-cfg.n_eval_sequences :]),
    }
    return model, stats


def _train_lm(
    model: HookedTransformer,
    data: torch.Tensor,
    cfg: BuildConfig,
    *,
    steps: int,
    batch: int,
    warmup: int,
    log: Any = print,
    label: str = "model",
) -> None:
    """One epoch of ``data`` ``[steps * batch, n_ctx]`` in order: AdamW at ``cfg.model_lr``, linear warmup over
    ``warmup`` steps then cosine decay to a tenth, gradients clipped at norm 1; leaves ``model`` in eval mode."""
    import torch

    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.model_lr, betas=(0.9, 0.98), weight_decay=cfg.model_weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps))
    model.train()
    recent: list[float] = []
    for step in range(steps):
        tokens = data[step * batch : (step + 1) * batch]
        loss = model(tokens, return_type="loss", loss_per_token=True)[:, 1:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent.append(loss.item())
        if (step + 1) % 100 == 0 or step == steps - 1:
            log(f"  {label} step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f}")
            recent = []
    model.eval()


def _batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


def model_ce(model: HookedTransformer, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) of predictions at positions >= 1."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(tokens, batch_size):
            loss = model(batch.to(model.cfg.device), return_type="loss", loss_per_token=True)[:, 1:]
            total += loss.double().sum().item()
            count += loss.numel()
    return total / count


# ----------------------------------------------------------------------------------------------------------
# activations and SAEs
# ----------------------------------------------------------------------------------------------------------


def collect_activations(model: HookedTransformer, tokens: torch.Tensor, hook_name: str) -> torch.Tensor:
    """Activations at ``hook_name`` for positions >= 1, flattened to ``[n_tokens, d]``."""
    import torch

    layer = int(hook_name.split(".")[1])
    out = []
    with torch.no_grad():
        for batch in _batches(tokens, 128):
            _, cache = model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=layer + 1)
            out.append(cache[hook_name][:, 1:].reshape(-1, model.cfg.d_model))
    return torch.cat(out)


def sae_metadata(cfg: BuildConfig) -> dict[str, Any]:
    return {
        "model_name": MODEL_NAME,
        "hook_name": cfg.hook_name,
        "hook_head_index": None,
        "context_size": cfg.n_ctx,
        "prepend_bos": True,
        "dataset_path": DATASET_PATH,
        "seqpos_slice": [1, None],
        "model_from_pretrained_kwargs": {},
    }


def _track_dead(since_fired: torch.Tensor, feature_acts: torch.Tensor) -> None:
    since_fired += 1
    since_fired[(feature_acts > 0).any(dim=0)] = 0


def train_topk_sae(
    cfg: BuildConfig, acts: torch.Tensor, *, d_sae: int, k: int, steps: int, lr: float, log: Any = print
) -> Any:
    """Train a TopK SAE with SAE Lens' ``TopKTrainingSAE.training_forward_pass`` (MSE + AuxK) and Adam."""
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(cfg.seed + 1)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=d_sae,
        k=k,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        aux_loss_coefficient=1.0,
        rescale_acts_by_decoder_norm=True,
        metadata=SAEMetadata(**sae_metadata(cfg)),
    )
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    return _train_loop(sae, acts, steps=steps, lr=lr, batch=cfg.sae_batch, seed=cfg.seed, window=200, log=log)


def _train_loop(
    sae: Any,
    acts: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    window: int,
    coefficients: dict[str, float] | None = None,
    log: Any = print,
) -> Any:
    import torch
    from sae_lens.saes.sae import TrainStepInput

    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(100, steps // 10 + 1), steps))
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    sae.train()
    perm = torch.randperm(acts.shape[0], generator=gen)
    pos = 0
    recent: list[float] = []
    for step in range(steps):
        if pos + batch > perm.numel():
            perm, pos = torch.randperm(acts.shape[0], generator=gen), 0
        x = acts[perm[pos : pos + batch]]
        pos += batch
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=coefficients or {},
                dead_neuron_mask=(since_fired > window),
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            _track_dead(since_fired, out.feature_acts)
        recent.append(out.losses["mse_loss"].item())
        if (step + 1) % 250 == 0 or step == steps - 1:
            log(
                f"  sae step {step + 1}/{steps}: mse {sum(recent) / len(recent):.4f}, "
                f"dead {(since_fired > window).sum().item()}"
            )
            recent = []
    sae.eval()
    return sae


def train_dead_sae(cfg: BuildConfig, acts: torch.Tensor, log: Any = print) -> Any:
    """A TopK SAE trained *without* the AuxK loss at a high learning rate: many latents die (a visible defect).

    Its reconstruction and spliced loss stay good - only the latent-usage metrics (``alive_fraction``) show it.
    """
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(cfg.seed + 3)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=cfg.dead_d_sae,
        k=cfg.dead_k,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        aux_loss_coefficient=0.0,  # the defect: no AuxK, so latents that stop firing never recover
        decoder_init_norm=None,
        rescale_acts_by_decoder_norm=True,
        metadata=SAEMetadata(**sae_metadata(cfg)),
    )
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    return _train_loop(
        sae,
        acts,
        steps=cfg.dead_steps,
        lr=cfg.dead_lr,
        batch=cfg.sae_batch,
        seed=cfg.seed + 3,
        window=cfg.dead_feature_window,
        log=log,
    )


def pca_sae(cfg: BuildConfig, acts: torch.Tensor, n_components: int) -> SAE:
    """Projection on the top ``n_components`` principal components, as an exact SAE Lens ``standard`` SAE.

    Latent pairs ``(v, -v)`` with ReLU give ``relu(v.(x - b)) v - relu(-v.(x - b)) v = (v.(x - b)) v``, so the
    reconstruction is exactly ``mean + V V^T (x - mean)``: the best rank-``n_components`` reconstruction in
    explained variance, with no regard for what the model downstream reads.
    """
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    x = acts.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / x.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = torch.argsort(eigvals, descending=True)
    vecs = eigvecs[:, order[:n_components]]  # [d_in, m]
    # fix the sign of each component deterministically (largest-magnitude entry positive)
    signs = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
    vecs = (vecs * signs).float()
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=acts.shape[1],
            d_sae=2 * n_components,
            dtype="float32",
            device="cpu",
            apply_b_dec_to_input=True,
            metadata=SAEMetadata(**sae_metadata(cfg), construction="pca", n_components=n_components),
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([vecs, -vecs], dim=1))
        sae.W_dec.copy_(torch.cat([vecs.T, -vecs.T], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.copy_(mean.float())
    return sae


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------


def evaluate_sae(
    model: HookedTransformer, sae: Any, tokens: torch.Tensor, hook_name: str, batch_size: int = 64
) -> dict[str, float]:
    """Spliced / zero-ablated cross-entropy, explained variance, L0 and alive latents (positions >= 1)."""
    import torch

    sums = {"orig": 0.0, "sae": 0.0, "zero": 0.0}
    n_ce = 0
    sq_err = 0.0
    x_sum = None
    x_sq = 0.0
    n_x = 0
    l0_sum = 0.0
    fired = None
    device = model.cfg.device
    with torch.no_grad():
        for batch in _batches(tokens.to(device), batch_size):
            store: dict[str, torch.Tensor] = {}

            def keep(act: torch.Tensor, hook: Any, store: dict[str, torch.Tensor] = store) -> torch.Tensor:
                store["x"] = act
                return act

            loss = model.run_with_hooks(
                batch, return_type="loss", loss_per_token=True, fwd_hooks=[(hook_name, keep)]
            )
            sums["orig"] += loss[:, 1:].double().sum().item()
            n_ce += loss[:, 1:].numel()
            x = store["x"][:, 1:].to(sae.dtype)
            feats = sae.encode(x)
            x_hat = sae.decode(feats)
            x64, xh64 = x.double(), x_hat.double()
            sq_err += (x64 - xh64).pow(2).sum().item()
            x_sum = x64.sum((0, 1)) if x_sum is None else x_sum + x64.sum((0, 1))
            x_sq += x64.pow(2).sum().item()
            n_x += x.shape[0] * x.shape[1]
            l0_sum += (feats != 0).sum().item()
            f = (feats != 0).flatten(0, 1).any(0)
            fired = f if fired is None else fired | f

            def splice(
                act: torch.Tensor, hook: Any, x_hat: torch.Tensor = x_hat
            ) -> torch.Tensor:  # position 0 untouched
                return torch.cat([act[:, :1], x_hat.to(act.dtype)], dim=1)

            def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
                return torch.cat([act[:, :1], torch.zeros_like(act[:, 1:])], dim=1)

            for name, fn in (("sae", splice), ("zero", zero)):
                loss = model.run_with_hooks(
                    batch, return_type="loss", loss_per_token=True, fwd_hooks=[(hook_name, fn)]
                )
                sums[name] += loss[:, 1:].double().sum().item()
    assert x_sum is not None and fired is not None
    ce = {k: v / n_ce for k, v in sums.items()}
    total_var = x_sq - x_sum.pow(2).sum().item() / n_x
    return {
        "ce_orig": ce["orig"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "delta_ce": ce["sae"] - ce["orig"],
        "ce_loss_score": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["orig"]),
        "explained_variance": 1.0 - sq_err / total_var,
        "l0": l0_sum / n_x,
        "n_alive": int(fired.sum().item()),
        "d_sae": int(sae.cfg.d_sae),
        "alive_fraction": fired.float().mean().item(),
        "n_tokens": n_x,
    }


# ----------------------------------------------------------------------------------------------------------
# the model family and its scaling law
# ----------------------------------------------------------------------------------------------------------

FAMILY_CORPUS = (
    "the demo's synthetic language (pytest_saecheck.demo.language), held-out split, seed 0: 256 sequences of "
    "64 tokens; the demo's word-level tokenizer (100 tokens)"
)
"""The ``corpus`` recorded with the demo's scaling-law fit: what each member's loss was measured on."""


def _family_point(
    name: str, model: HookedTransformer, shape: dict[str, int], train_tokens: int, eval_tokens: torch.Tensor
) -> dict[str, Any]:
    """A member's record: shape, N (every parameter, embeddings included), D, compute 6ND (FLOPs) and its
    held-out loss measured as an evaluation measures ``ce_orig`` (:func:`pytest_saecheck.family.model_loss`
    with the default token policy)."""
    from pytest_saecheck.family import model_loss

    n_params = int(sum(p.numel() for p in model.parameters()))
    return {
        "name": name,
        **shape,
        "n_params": n_params,
        "train_tokens": int(train_tokens),
        "compute": 6.0 * n_params * train_tokens,
        "loss": model_loss(model, eval_tokens, batch_size=64),
    }


def fit_demo_family(
    cfg: BuildConfig,
    model: HookedTransformer,
    eval_tokens: torch.Tensor,
    log: Any = print,
) -> dict[str, Any]:
    """Train :attr:`BuildConfig.family`, fit ``L(C) = E + A C^-gamma`` over it and the demo model ``model``.

    Each member is initialised from its own torch seed inside :func:`torch.random.fork_rng` (the global RNG, and
    so every other artefact of the build, is untouched) and trained by :func:`_train_lm` like the demo model
    (same optimizer, learning rate and schedule shape, warmup scaled with its steps) on a prefix of the demo
    model's training text. Every loss is measured on ``eval_tokens`` (the held-out tokens the demo SAEs are
    evaluated on). The fit is :func:`pytest_saecheck.scaling.fit_scaling_law` on compute ``6 N D``. As a check
    of the fit's honesty it is repeated without the demo model, whose loss that fit then predicts.

    Returns ``{"scaling_law": <fit file dict>, "family": {...}}`` for ``metadata.json``.
    """
    import torch

    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for index, member in enumerate(cfg.family):
        shape = {"n_layers": member.n_layers, "d_model": member.d_model, "n_heads": member.n_heads}
        member_config = dataclasses.replace(
            cfg, n_layers=member.n_layers, d_model=member.d_model, n_heads=member.n_heads
        ).model_config_dict()
        member_config["model_name"] = f"{MODEL_NAME}-{member.name}"
        n_seq = member.steps * member.batch
        log(f"training family member {member.name} ({member.steps} steps x {member.batch} sequences)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + cfg.family_seed + index)
            sibling = make_model(member_config)
            data = _sequences_tensor(n_seq, cfg.n_ctx, cfg.seed, "train")
            warmup = max(1, round(member.steps * cfg.model_warmup / cfg.model_steps))
            _train_lm(
                sibling,
                data,
                cfg,
                steps=member.steps,
                batch=member.batch,
                warmup=warmup,
                log=log,
                label=member.name,
            )
        rows.append(_family_point(member.name, sibling, shape, int(data.numel()), eval_tokens))
    demo_shape = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads}
    train_tokens = cfg.model_steps * cfg.model_batch * cfg.n_ctx
    rows.append(_family_point(MODEL_NAME, model, demo_shape, train_tokens, eval_tokens))
    for row in rows:
        log(
            f"  {row['name']}: N {row['n_params']}, D {row['train_tokens']}, C {row['compute']:.3g}, L {row['loss']:.4f}"
        )

    return fit_family_points(cfg, rows, seconds=round(time.perf_counter() - t_start, 1), log=log)


def fit_family_points(
    cfg: BuildConfig, rows: list[dict[str, Any]], *, seconds: float | None = None, log: Any = print
) -> dict[str, Any]:
    """The fit of :func:`fit_demo_family` from its member records ``rows`` (the demo model last): the law over
    every point, and the check of its honesty, a fit without the demo model that predicts the demo model's loss.
    Deterministic given ``rows`` (the bootstrap is seeded with ``cfg.seed``)."""
    from pytest_saecheck.scaling import fit_scaling_law

    compute = [row["compute"] for row in rows]
    losses = [row["loss"] for row in rows]
    source = (
        f"python -m pytest_saecheck.demo.build: the demo model and {len(rows) - 1} smaller siblings trained "
        "alike, compute 6*N*D"
    )
    law = fit_scaling_law(
        compute, losses, n_bootstrap=cfg.family_bootstrap, seed=cfg.seed, source=source, corpus=FAMILY_CORPUS
    )
    without_demo = fit_scaling_law(
        compute[:-1], losses[:-1], n_bootstrap=0, source=source, corpus=FAMILY_CORPUS
    )
    demo_compute, demo_loss = compute[-1], losses[-1]
    fitted = law.loss_at(demo_compute)
    predicted = without_demo.loss_at(demo_compute)
    log(
        f"  fit: E {law.irreducible:.4f}, A {dict(law.parameters)['A']:.4g}, gamma {law.gamma:.4f}; demo model "
        f"L {demo_loss:.4f} vs fit {fitted:.4f}; predicted without it {predicted:.4f}"
    )
    return {
        "scaling_law": law.to_file_dict(),
        "family": {
            "members": rows,
            "demo_model": {
                "compute": demo_compute,
                "loss": demo_loss,
                "fit_loss": fitted,
                "residual": demo_loss - fitted,
                "fit_without_demo_model": dict(without_demo.parameters),
                "predicted_without_demo_model": predicted,
                "prediction_error": demo_loss - predicted,
            },
            "seconds": seconds,
        },
    }


# ----------------------------------------------------------------------------------------------------------
# the whole build
# ----------------------------------------------------------------------------------------------------------


def build(out_dir: Path, cfg: BuildConfig | None = None, log: Any = print) -> dict[str, Any]:
    """Build everything into ``out_dir`` and return the metadata written to ``out_dir/metadata.json``."""
    import torch

    cfg = cfg or BuildConfig()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(Path(out_dir), cfg, log)
    finally:
        torch.set_num_threads(threads_before)


def _build(out_dir: Path, cfg: BuildConfig, log: Any) -> dict[str, Any]:
    from sae_lens import SAE
    from safetensors.torch import save_file

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    log(f"training the model ({cfg.model_steps} steps x {cfg.model_batch} sequences of {cfg.n_ctx})")
    model, model_stats = train_model(cfg, log=log)
    eval_tokens = _sequences_tensor(cfg.n_eval_sequences, cfg.n_ctx, cfg.seed, "heldout")
    heldout_ce = model_ce(model, eval_tokens)
    log(
        f"  held-out CE {heldout_ce:.4f} nats, train CE {model_stats['train_ce']:.4f}, "
        f"unigram entropy {model_stats['unigram_entropy']:.4f}"
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / MODEL_WEIGHTS_FILENAME))

    log("collecting activations")
    sae_tokens = _sequences_tensor(cfg.sae_n_sequences, cfg.n_ctx, cfg.seed + 1, "train")
    acts = collect_activations(model, sae_tokens, cfg.hook_name)

    saes: dict[str, Any] = {}
    log(f"training 'good' (TopK, d_sae {cfg.good_d_sae}, k {cfg.good_k})")
    saes["good"] = train_topk_sae(
        cfg, acts, d_sae=cfg.good_d_sae, k=cfg.good_k, steps=cfg.good_steps, lr=cfg.good_lr, log=log
    )
    log(f"building 'variance_only' (top {cfg.variance_only_components} principal components)")
    saes["variance_only"] = pca_sae(cfg, acts, cfg.variance_only_components)
    log(f"training 'dead' (TopK without AuxK, d_sae {cfg.dead_d_sae}, k {cfg.dead_k}, lr {cfg.dead_lr})")
    saes["dead"] = train_dead_sae(cfg, acts, log=log)

    sae_dir = out_dir / SAES_DIRNAME
    metrics: dict[str, dict[str, float]] = {}
    for name, sae in saes.items():
        path = sae_dir / name
        if path.exists():
            shutil.rmtree(path)
        if hasattr(sae, "save_inference_model"):
            sae.save_inference_model(path)
        else:
            sae.save_model(path)
        loaded = SAE.load_from_disk(path)  # evaluate exactly what ships
        metrics[name] = evaluate_sae(model, loaded, eval_tokens, cfg.hook_name)
        m = metrics[name]
        log(
            f"  {name}: ce_loss_score {m['ce_loss_score']:.4f}, delta_ce {m['delta_ce']:.4f}, "
            f"R2 {m['explained_variance']:.4f}, L0 {m['l0']:.1f}, alive {m['n_alive']}/{m['d_sae']}"
        )

    log(f"training the model family for the scaling-law fit ({len(cfg.family)} smaller models)")
    family = fit_demo_family(cfg, model, eval_tokens, log=log)

    metadata = {
        "format_version": 1,
        "model_name": MODEL_NAME,
        "hook_name": cfg.hook_name,
        "model_config": cfg.model_config_dict(),
        "tokenizer": {"vocab_size": len(VOCAB), "bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 3},
        "model": {
            "heldout_ce": heldout_ce,
            "train_ce": model_stats["train_ce"],
            "unigram_entropy": model_stats["unigram_entropy"],
            "train_tokens": model_stats["train_tokens"],
        },
        "saes": metrics,
        **family,
        "evaluation": {
            "split": "heldout",
            "seed": cfg.seed,
            "n_sequences": cfg.n_eval_sequences,
            "seq_len": cfg.n_ctx,
            "policy": "position 0 (<bos>) not spliced, ablated or scored; CE over predictions at positions >= 1",
        },
        "seeds": {"build": cfg.seed, "model_text": ["train", cfg.seed], "sae_text": ["train", cfg.seed + 1]},
        "build_config": dataclasses.asdict(cfg),
        "check_tolerance": CHECK_TOLERANCE,
        "versions": _versions(),
        "build_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out_dir / METADATA_FILENAME).write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")
    log(f"done in {metadata['build_seconds']} s -> {out_dir}")
    return metadata


def refit_family(assets_dir: Path, cfg: BuildConfig | None = None, log: Any = print) -> dict[str, Any]:
    """:func:`fit_demo_family` on the demo model shipped in ``assets_dir`` (its weights, not a retrained copy):
    the ``scaling_law`` and ``family`` parts of the metadata, as a build would write them."""
    import torch
    from safetensors.torch import load_file

    cfg = cfg or BuildConfig()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model = make_model(cfg.model_config_dict())
        buffers = {name for name, _ in model.named_buffers()}
        state = load_file(str(Path(assets_dir) / MODEL_WEIGHTS_FILENAME))
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in state.items() if k not in buffers}, strict=False
        )
        if [key for key in missing if key not in buffers] or unexpected:
            raise RuntimeError(f"the shipped model does not fit the build config: {missing}, {unexpected}")
        model.eval()
        eval_tokens = _sequences_tensor(cfg.n_eval_sequences, cfg.n_ctx, cfg.seed, "heldout")
        return fit_demo_family(cfg, model, eval_tokens, log=log)
    finally:
        torch.set_num_threads(threads_before)


def _versions() -> dict[str, str]:
    import sae_lens
    import torch
    import transformer_lens

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
        "sae_lens": sae_lens.__version__,
    }


def compare_metadata(shipped: dict[str, Any], rebuilt: dict[str, Any]) -> list[str]:
    """Differences beyond :data:`CHECK_TOLERANCE` (empty list: the rebuild matches)."""
    tol = shipped.get("check_tolerance", CHECK_TOLERANCE)
    problems: list[str] = []

    def cmp(label: str, a: float, b: float, limit: float) -> None:
        if not abs(a - b) <= limit:
            problems.append(f"{label}: shipped {a:.4f}, rebuilt {b:.4f} (|diff| {abs(a - b):.4f} > {limit})")

    for key in ("heldout_ce", "train_ce"):
        cmp(f"model.{key}", shipped["model"][key], rebuilt["model"][key], tol["nats"])
    cmp(
        "model.unigram_entropy",
        shipped["model"]["unigram_entropy"],
        rebuilt["model"]["unigram_entropy"],
        1e-9,
    )
    for name, ms in shipped["saes"].items():
        mr = rebuilt["saes"].get(name)
        if mr is None:
            problems.append(f"SAE {name!r} missing from the rebuild")
            continue
        for key in ("ce_orig", "ce_sae", "ce_zero", "delta_ce"):
            cmp(f"{name}.{key}", ms[key], mr[key], tol["nats"])
        for key in ("ce_loss_score", "explained_variance"):
            cmp(f"{name}.{key}", ms[key], mr[key], tol["fraction"])
        cmp(f"{name}.l0", ms["l0"], mr["l0"], tol["l0_relative"] * max(1.0, abs(ms["l0"])))
        cmp(f"{name}.alive_fraction", ms["alive_fraction"], mr["alive_fraction"], tol["alive_fraction"])
    problems += _compare_family(shipped, rebuilt, tol)
    return problems


def _compare_family(shipped: dict[str, Any], rebuilt: dict[str, Any], tol: dict[str, float]) -> list[str]:
    """The family's members (compute exactly, loss within ``nats``) and the fit's E, A and gamma (within
    ``law_relative`` of the shipped value)."""
    if "scaling_law" not in shipped:
        return []
    if "scaling_law" not in rebuilt:
        return ["the rebuild has no scaling-law fit"]
    problems: list[str] = []
    shipped_rows = {row["name"]: row for row in shipped["family"]["members"]}
    rebuilt_rows = {row["name"]: row for row in rebuilt["family"]["members"]}
    if set(shipped_rows) != set(rebuilt_rows):
        return [f"family members differ: shipped {sorted(shipped_rows)}, rebuilt {sorted(rebuilt_rows)}"]
    for name, row in shipped_rows.items():
        other = rebuilt_rows[name]
        if row["compute"] != other["compute"]:
            problems.append(
                f"family.{name}.compute: shipped {row['compute']:.6g}, rebuilt {other['compute']:.6g}"
            )
        if not abs(row["loss"] - other["loss"]) <= tol.get("nats", CHECK_TOLERANCE["nats"]):
            problems.append(f"family.{name}.loss: shipped {row['loss']:.4f}, rebuilt {other['loss']:.4f}")
    limit = tol.get("law_relative", CHECK_TOLERANCE["law_relative"])
    for key, value in shipped["scaling_law"]["parameters"].items():
        new = rebuilt["scaling_law"]["parameters"].get(key)
        if new is None or not abs(new - value) <= limit * abs(value):
            problems.append(
                f"scaling_law.{key}: shipped {value:.6g}, rebuilt {new} (relative tolerance {limit})"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_saecheck.demo.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default: {ASSETS_DIR})")
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temporary directory and compare with the shipped metadata within its tolerance",
    )
    parser.add_argument(
        "--family-only",
        action="store_true",
        help="with --check: retrain only the model family and refit its scaling law, on the shipped demo model "
        "(a few minutes instead of the whole build)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    cfg = BuildConfig()
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.family_only and not args.check:
        parser.error("--family-only goes with --check")
    if args.check and args.family_only:
        shipped_path = (args.out or ASSETS_DIR) / METADATA_FILENAME
        shipped = json.loads(shipped_path.read_text())
        problems = _compare_family(
            shipped,
            refit_family(args.out or ASSETS_DIR, cfg),
            shipped.get("check_tolerance", CHECK_TOLERANCE),
        )
        if problems:
            print(f"family check FAILED against {shipped_path}:")
            for p in problems:
                print(f"  {p}")
            return 1
        print(f"family check OK: the refit matches {shipped_path} within {shipped.get('check_tolerance')}")
        return 0
    if args.check:
        shipped_path = (args.out or ASSETS_DIR) / METADATA_FILENAME
        shipped = json.loads(shipped_path.read_text())
        with tempfile.TemporaryDirectory(prefix="saecheck-demo-") as tmp:
            rebuilt = build(Path(tmp), cfg)
        problems = compare_metadata(shipped, rebuilt)
        if problems:
            print(f"check FAILED against {shipped_path}:")
            for p in problems:
                print(f"  {p}")
            return 1
        print(f"check OK: the rebuild matches {shipped_path} within {shipped.get('check_tolerance')}")
        return 0
    build(args.out or ASSETS_DIR, cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
