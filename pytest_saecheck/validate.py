"""What an artefact says is checked before it is believed: configs, loader output, and kwargs it hands on.

Three jobs, one home each:

* :func:`validate_sae_config`: the types and ranges of an SAE config (``cfg.json`` as read from disk, or a
  loaded ``sae.cfg.to_dict()``), with the file and the key named. Run before SAE Lens reads the file, so a
  string ``"false"`` is refused rather than read as true, and ``k = -5`` is refused at load rather than failing
  deep inside ``torch.topk`` at evaluation time.
* :func:`check_loaded`: a loaded dictionary against its own config and, for a local directory, against the
  tensors stored in its weights file: every weight's shape (and, for square weights, orientation), one dtype
  for every floating weight, the architecture against ``metadata.training_architecture``. SAE Lens versions
  with a known loader bug for the artefact in hand are named (:data:`KNOWN_LOADER_BUGS`).
* :func:`artefact_model_kwargs`: the model-loading keyword arguments an artefact asks for
  (``metadata.model_from_pretrained_kwargs``) pass only through an allow-list of the keys that shape the
  computation; anything that could run code or fetch something (``trust_remote_code``, ``revision``,
  ``cache_dir``, ``token``, ...) is refused with a named error. A test opts in explicitly with the
  ``model_from_pretrained_kwargs`` setting, which replaces the artefact's kwargs.

:func:`check_sparsity` compares a measured L0 with the ``k`` the artefact records (TopK, BatchTopK).

Torch is imported inside functions only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from pytest_saecheck.errors import ConfigError, LoadError

PROCESSING_FLAGS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)
"""TransformerLens' weight processing switches; ``from_pretrained`` turns all but the last on, SAE Lens trains
and evaluates with every one off (``from_pretrained_no_processing``) unless the SAE's kwargs say otherwise."""

DTYPES = ("float32", "float16", "bfloat16", "float64")

# -------------------------------------------------------------------------------------------------------------
# kwargs an artefact hands to the model loader

ARTEFACT_MODEL_KWARGS: Mapping[str, str] = {
    **{flag: "bool" for flag in PROCESSING_FLAGS},
    "n_ctx": "positive int",
    "first_n_layers": "positive int",
    "default_prepend_bos": "bool",
    "dtype": "dtype",
    "torch_dtype": "dtype",
    "device": "ignored",  # the device setting places the model
}
"""The model-loading keys an artefact may set (key → the kind of value): those that shape the computation."""


def artefact_model_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """``kwargs`` (an artefact's ``model_from_pretrained_kwargs``) checked against :data:`ARTEFACT_MODEL_KWARGS`.

    ``where`` names the artefact (``"the SAE's cfg.json /path/cfg.json"``). Returns a plain dict (``{}`` for
    None). Raises :class:`ConfigError` naming ``where`` and every refused key: a key outside the allow-list
    (``trust_remote_code``, ``revision``, ``code_revision``, ``cache_dir``, ``token``, ...: they could run code
    shipped with a model or fetch other weights), or a value of the wrong type.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(
            f"{where}: metadata.model_from_pretrained_kwargs must be a mapping, got {type(kwargs).__name__} "
            f"{kwargs!r}"
        )
    refused = sorted(str(key) for key in kwargs if key not in ARTEFACT_MODEL_KWARGS)
    if refused:
        raise ConfigError(
            f"{where}: metadata.model_from_pretrained_kwargs sets {', '.join(map(repr, refused))}, which an "
            "artefact may not choose (they can run code shipped with a model or fetch other weights; an "
            f"artefact may set only {', '.join(ARTEFACT_MODEL_KWARGS)}). If you trust it, pass the kwargs "
            "yourself: @pytest.mark.saecheck(model_from_pretrained_kwargs={...}) (or the "
            "saecheck_model_from_pretrained_kwargs ini key), which replaces the SAE's"
        )
    for key, value in kwargs.items():
        _check_value(
            f"{where}: metadata.model_from_pretrained_kwargs.{key}", value, ARTEFACT_MODEL_KWARGS[key]
        )
    return dict(kwargs)


def _check_value(what: str, value: object, kind: str) -> None:
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {type(value).__name__} {value!r}")
    if kind == "positive int" and not (_is_int(value) and value > 0):
        raise ConfigError(f"{what} must be a positive integer, got {type(value).__name__} {value!r}")
    if kind == "dtype" and not (isinstance(value, str) and value.removeprefix("torch.") in DTYPES):
        if type(value).__module__ != "torch":
            raise ConfigError(f"{what} must be one of {', '.join(DTYPES)}, got {value!r}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# -------------------------------------------------------------------------------------------------------------
# SAE configs

# training architecture (metadata.training_architecture) → the inference architectures SAE Lens saves it as
_INFERENCE_ARCHITECTURES: Mapping[str, frozenset[str]] = {
    "standard": frozenset({"standard"}),
    "gated": frozenset({"gated"}),
    "jumprelu": frozenset({"jumprelu"}),
    "topk": frozenset({"topk"}),
    "abstopk": frozenset({"abstopk"}),
    "batchtopk": frozenset({"jumprelu", "topk"}),
    "matryoshka_batchtopk": frozenset({"jumprelu", "topk"}),
}
TOPK_ARCHITECTURES = frozenset({"topk", "abstopk", "batchtopk", "matryoshka_batchtopk"})

_NORMALIZATIONS = (
    "none",
    "expected_average_only_in",
    "layer_norm",
    "constant_norm_rescale",
    "covariance_whitening",
)


def _lookup(cfg: Mapping[str, Any], key: str) -> tuple[str, Any]:
    """``(the key's written path, value)``: ``metadata.<key>`` when the config nests it, else ``<key>``."""
    metadata = cfg.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get(key) is not None:
        return f"metadata.{key}", metadata[key]
    return key, cfg.get(key)


def validate_sae_config(cfg: Any, where: str) -> None:
    """Check an SAE config's types and ranges; ``where`` names the file (or ``"release r, id i"``).

    ``cfg`` is the mapping SAE Lens reads (its 6.x layout with nested ``metadata``, or the older flat one).
    Checked: ``d_in``, ``d_sae`` (and ``d_out``) positive integers; ``k`` an integer in ``[1, d_sae]``;
    ``dtype`` a known floating dtype; boolean switches (``apply_b_dec_to_input``, ``prepend_bos``, ...) true or
    false, not strings; ``normalize_activations`` one SAE Lens knows; ``hook_name`` a non-empty string,
    ``hook_head_index`` a non-negative integer or null, ``context_size`` a positive integer or null;
    ``architecture`` one the recorded ``training_architecture`` is saved as.

    Raises :class:`ConfigError` naming ``where``, the key, the value and the fix.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: an SAE config must be a JSON object, got {type(cfg).__name__}")
    metadata = cfg.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ConfigError(f"{where}: 'metadata' must be a JSON object, got {type(metadata).__name__}")

    def bad(key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{where}: key {key!r} must be {expected}, got {type(value).__name__} {value!r}")

    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if not (_is_int(value) and value > 0):
            raise bad(key, value, "a positive integer")
    if cfg.get("d_out") is not None and not (_is_int(cfg["d_out"]) and cfg["d_out"] > 0):
        raise bad("d_out", cfg["d_out"], "a positive integer")
    if "k" in cfg and cfg["k"] is not None:
        k = cfg["k"]
        if not (_is_int(k) and 1 <= k <= cfg["d_sae"]):
            raise bad(
                "k", k, f"an integer from 1 to d_sae ({cfg['d_sae']}), the number of latents kept per token"
            )
    dtype = cfg.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES):
        raise bad("dtype", dtype, f"one of {', '.join(DTYPES)}")
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm", "prepend_bos"):
        written, value = _lookup(cfg, key)
        if value is not None and not isinstance(value, bool):
            raise bad(written, value, "true or false (a JSON boolean, not a string)")
    normalize = cfg.get("normalize_activations")  # a boolean in configs before SAE Lens 6 (it maps those)
    if normalize is not None and not isinstance(normalize, bool) and normalize not in _NORMALIZATIONS:
        raise bad("normalize_activations", normalize, f"one of {', '.join(_NORMALIZATIONS)}")
    written, hook = _lookup(cfg, "hook_name")
    if hook is None:  # the name before SAE Lens 6
        written, hook = _lookup(cfg, "hook_point")
    if hook is not None and not (isinstance(hook, str) and hook):
        raise bad(written, hook, "a non-empty hook name such as 'blocks.8.hook_resid_pre'")
    written, head = _lookup(cfg, "hook_head_index")
    if head is None:  # the name before SAE Lens 6
        written, head = _lookup(cfg, "hook_point_head_index")
    if head is not None and not (_is_int(head) and head >= 0):
        raise bad(written, head, "a non-negative integer (the attention head) or null")
    written, context = _lookup(cfg, "context_size")
    if context is not None and not (_is_int(context) and context > 0):
        raise bad(written, context, "a positive integer or null")
    for key in ("model_name", "dataset_path"):
        written, value = _lookup(cfg, key)
        if value is not None and not isinstance(value, str):
            raise bad(written, value, "a string or null")
    written, kwargs = _lookup(cfg, "model_from_pretrained_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise bad(written, kwargs, "a JSON object")
    _check_architecture(cfg, where)


def _check_architecture(cfg: Mapping[str, Any], where: str) -> None:
    architecture = cfg.get("architecture")
    _, training = _lookup(cfg, "training_architecture")
    if not isinstance(architecture, str) or not isinstance(training, str):
        return
    allowed = _INFERENCE_ARCHITECTURES.get(training)
    if allowed is not None and architecture not in allowed | {training}:  # a training SAE is its own
        raise ConfigError(
            f"{where}: key 'architecture' is {architecture!r} but metadata.training_architecture is "
            f"{training!r}, which SAE Lens saves as {' or '.join(sorted(allowed))}; read as {architecture!r}, its "
            f"latents would be computed by the wrong activation function. Set 'architecture' to "
            f"{sorted(allowed)[0]!r} (with the fields it needs, e.g. k) or fix training_architecture"
        )
    details = (
        cfg.get("metadata", {}).get("training_architecture_details")
        if isinstance(cfg.get("metadata"), Mapping)
        else None
    )
    if training in TOPK_ARCHITECTURES and isinstance(details, Mapping) and "k" in details:
        k = details["k"]
        if not (_is_int(k) and 1 <= k <= cfg["d_sae"]):
            raise ConfigError(
                f"{where}: key 'metadata.training_architecture_details.k' must be an integer from 1 to d_sae "
                f"({cfg['d_sae']}), got {k!r}"
            )


def recorded_k(cfg: Any) -> tuple[int | None, str | None]:
    """``(k, training architecture)`` an SAE's config records: ``cfg.k`` of a TopK SAE, else
    ``metadata.training_architecture_details.k`` of a TopK-family training run; ``(None, ...)`` otherwise."""
    metadata = getattr(cfg, "metadata", None)
    training = getattr(metadata, "training_architecture", None) if metadata is not None else None
    k = getattr(cfg, "k", None)
    if not _is_int(k):
        details = getattr(metadata, "training_architecture_details", None) if metadata is not None else None
        k = details.get("k") if isinstance(details, Mapping) and training in TOPK_ARCHITECTURES else None
    return (k if _is_int(k) else None), (training if isinstance(training, str) else None)


# -------------------------------------------------------------------------------------------------------------
# SAE Lens versions with known loader bugs


@dataclass(frozen=True)
class LoaderBug:
    """A released SAE Lens loader fault: the versions that have it (inclusive) and the artefacts it touches."""

    first: str
    last: str
    applies_to: str
    effect: str
    installed: bool = True  # True: the installed version matters; False: the version that saved the artefact

    def covers(self, version: str | None) -> bool:
        parsed, first, last = _version_tuple(version), _version_tuple(self.first), _version_tuple(self.last)
        return parsed is not None and first is not None and last is not None and first <= parsed <= last

    def describe(self, version: str) -> str:
        who = "installed" if self.installed else "that saved this artefact"
        return (
            f"SAE Lens {version} ({who}) has a known loader bug for {self.applies_to} (SAE Lens "
            f"{self.first}–{self.last}): {self.effect}"
        )


KNOWN_LOADER_BUGS: Mapping[str, LoaderBug] = {
    "w_skip_transposed": LoaderBug(
        "6.24.0",
        "6.54.1",
        "affine (skip) transcoders",
        "W_skip is loaded transposed (an exact transcoder then scores R² −1.35); upgrade sae-lens to 6.54.2 or later",
    ),
    "w_skip_dtype": LoaderBug(
        "0.0.0",
        "6.49.1",
        "skip transcoders in half precision",
        "a float32 W_skip is kept inside a bf16 transcoder and the release loader fails; upgrade sae-lens to "
        "6.49.2 or later, or load in float32",
    ),
    "dictionary_learning_threshold": LoaderBug(
        "0.0.0",
        "6.51.7",
        "dictionary_learning TopK checkpoints",
        "their 'threshold' key is not read and the release loader fails; upgrade sae-lens to 6.51.8 or later",
    ),
    "batchtopk_threshold": LoaderBug(
        "0.0.0",
        "6.54.8",
        "BatchTopK SAEs trained with normalised activations",
        "the SAE was saved as JumpReLU with its threshold off by the normalisation factor, so its L0 and "
        "reconstructions are not the trained SAE's; retrain or re-save with sae-lens 6.54.9 or later",
        installed=False,
    ),
}
"""Known SAE Lens loader faults (name → :class:`LoaderBug`); the version ranges were read from the SAE Lens
changelog and measured on checkpoints loaded with those versions."""


def _version_tuple(version: object) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return tuple(int(part) for part in match.groups()) if match else None


def installed_sae_lens() -> str:
    """The installed SAE Lens version (``"not installed"`` when it is missing)."""
    try:
        from sae_lens import __version__
    except ImportError:
        return "not installed"
    return str(__version__)


def known_bugs(sae: Any = None, cfg: Mapping[str, Any] | None = None, loader: str = "") -> list[str]:
    """Sentences naming the known SAE Lens loader bugs (:data:`KNOWN_LOADER_BUGS`) that can touch this artefact,
    for the installed SAE Lens or the one that saved it. ``sae``: the loaded dictionary, or ``cfg``: its config
    mapping; ``loader``: the SAE Lens release loader (``conversion_func``) and SAE id, when it came from one."""
    installed = installed_sae_lens()
    if cfg is None:
        to_dict = getattr(getattr(sae, "cfg", None), "to_dict", None)
        cfg = to_dict() if callable(to_dict) else {}
    architecture = str(cfg.get("architecture", ""))
    _, training = _lookup(cfg, "training_architecture")
    _, saved_by = _lookup(cfg, "sae_lens_training_version")
    if saved_by is None:
        _, saved_by = _lookup(cfg, "sae_lens_version")
    parameters = dict(sae.named_parameters()) if sae is not None and hasattr(sae, "named_parameters") else {}
    skip = (
        "skip" in architecture
        or "W_skip" in parameters
        or any(w in loader.lower() for w in ("skip", "affine"))
    )
    applies = {
        "w_skip_transposed": skip,
        "w_skip_dtype": skip,
        "dictionary_learning_threshold": "dictionary_learning" in loader,
    }
    found = [
        KNOWN_LOADER_BUGS[name].describe(installed)
        for name, hit in applies.items()
        if hit and KNOWN_LOADER_BUGS[name].covers(installed)
    ]
    if training in ("batchtopk", "matryoshka_batchtopk") and architecture == "jumprelu":
        bug = KNOWN_LOADER_BUGS["batchtopk_threshold"]
        if bug.covers(saved_by):
            found.append(bug.describe(str(saved_by)))
    return found


def refuse_unverifiable(sae: Any, where: str) -> None:
    """Refuse a dictionary from an SAE Lens release that the installed SAE Lens is known to load transposed
    where no shape can show it (a square ``W_skip``; a local directory is checked against its file instead).

    Raises :class:`LoadError` naming ``where`` and the bug.
    """
    bug = KNOWN_LOADER_BUGS["w_skip_transposed"]
    installed = installed_sae_lens()
    w_skip = dict(sae.named_parameters()).get("W_skip") if hasattr(sae, "named_parameters") else None
    if (
        w_skip is not None
        and bug.covers(installed)
        and w_skip.ndim == 2
        and w_skip.shape[0] == w_skip.shape[1]
    ):
        raise LoadError(
            f"{where} is a skip transcoder, and {bug.describe(installed)}. Its W_skip is square, so the "
            "orientation cannot be checked against its shape: it is refused rather than scored"
        )


# -------------------------------------------------------------------------------------------------------------
# a loaded dictionary against its config and its file


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """The shape SAE Lens gives each weight of a dictionary with this config (``[d_in, d_sae]`` encoders,
    ``[d_sae, d_out]`` decoders, ``W_skip [d_out, d_in]``: its forward adds ``x @ W_skip.T``)."""
    d_in, d_sae = int(cfg.d_in), int(cfg.d_sae)
    d_out = int(getattr(cfg, "d_out", None) or d_in)
    return {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_out),
        "b_enc": (d_sae,),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "log_threshold": (d_sae,),
        "W_skip": (d_out, d_in),
        "b_gate": (d_sae,),
        "b_mag": (d_sae,),
        "r_mag": (d_sae,),
    }


def check_loaded(sae: Any, where: str, weights_file: Path | None = None) -> None:
    """Check a loaded SAE Lens dictionary against its config and (``weights_file``) the tensors stored on disk.

    Checks each weight's shape against :func:`expected_shapes`; for a local directory, each stored tensor's shape
    and, for square 2-D weights, orientation (the loaded first row equals the stored one, not the stored first
    column); one dtype for every floating weight, the config's. Raises :class:`LoadError` naming ``where``, the
    weight, what was expected and what was found, and the SAE Lens versions with a known bug for it.
    """
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(sae, "named_parameters"):
        return
    params = dict(sae.named_parameters())
    expected = expected_shapes(cfg)
    problems = []
    for name, param in params.items():
        shape = expected.get(name)
        if shape is not None and tuple(param.shape) != shape:
            transposed = " (transposed)" if tuple(reversed(param.shape)) == shape else ""
            problems.append(f"{name} has shape {tuple(param.shape)}{transposed}, the config implies {shape}")
    if weights_file is not None and weights_file.is_file() and weights_file.suffix == ".safetensors":
        problems += _against_file(params, weights_file)
    floating = {name: p.dtype for name, p in params.items() if p.is_floating_point()}
    if len(set(floating.values())) > 1:
        by_dtype: dict[str, list[str]] = {}
        for name, dtype in floating.items():
            by_dtype.setdefault(str(dtype).removeprefix("torch."), []).append(name)
        problems.append(
            "its weights are in several dtypes ("
            + "; ".join(f"{dtype}: {', '.join(names)}" for dtype, names in by_dtype.items())
            + ")"
        )
    if problems:
        bugs = known_bugs(sae)
        raise LoadError(
            f"{where} did not load as its config describes: {'; '.join(problems)}."
            + (f" {' '.join(bugs)}." if bugs else f" SAE Lens {installed_sae_lens()} loaded it.")
            + " It is refused rather than scored"
        )


def _against_file(params: Mapping[str, Any], weights_file: Path) -> list[str]:
    from safetensors import safe_open

    problems = []
    with safe_open(str(weights_file), framework="pt", device="cpu") as handle:
        for name in handle.keys():
            param = params.get(name)
            if param is None:
                continue
            stored = handle.get_slice(name)
            shape = tuple(stored.get_shape())
            if shape != tuple(param.shape):
                problems.append(
                    f"{name} was loaded with shape {tuple(param.shape)}, {weights_file.name} stores {shape}"
                )
            elif len(shape) == 2 and shape[0] == shape[1] and shape[0] > 1:
                first_row = stored[0:1].float().reshape(-1)
                loaded = param.detach()[0].float().cpu()
                if not _close(loaded, first_row) and _close(param.detach()[:, 0].float().cpu(), first_row):
                    problems.append(
                        f"{name} was loaded transposed (its rows are the columns {weights_file.name} stores)"
                    )
    return problems


def _close(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.allclose(a, b, rtol=1e-2, atol=1e-3 * float(b.abs().max().clamp_min(1e-12))))


# -------------------------------------------------------------------------------------------------------------
# L0 against the recorded k

BATCHTOPK_L0_FACTOR = 2.0
"""A BatchTopK SAE keeps k latents per token on average over its training batches, and its inference threshold
keeps about k on the same distribution; a mean L0 more than this factor away from k (either way) on evaluation
tokens is a loader or saving fault, not a shift of data (a BatchTopK SAE saved by SAE Lens ≤ 6.54.8 as JumpReLU
measured 30.4 where k = 8)."""


def check_sparsity(dictionary: Mapping[str, Any], l0: float) -> str | None:
    """A sentence when the measured mean L0 contradicts the ``k`` the dictionary records, else None.

    ``dictionary`` is an :class:`~pytest_saecheck.dictionaries.DictionaryInfo` as a dict (``k``,
    ``training_architecture``, ``architecture``, ``saved_by``). A TopK SAE keeps at most k latents per token, so
    L0 > k is impossible for a faithful load; a BatchTopK SAE saved as JumpReLU keeps about k on average
    (:data:`BATCHTOPK_L0_FACTOR`).
    """
    k = dictionary.get("k")
    if not _is_int(k) or not math.isfinite(l0):
        return None
    architecture = dictionary.get("architecture")
    training = dictionary.get("training_architecture")
    if architecture in ("topk", "abstopk") and l0 > k + 1e-6:
        return f"its mean L0 is {l0:.4g}, more than the k = {k} latents a TopK SAE keeps per token"
    if training in ("batchtopk", "matryoshka_batchtopk") and architecture == "jumprelu":
        if not k / BATCHTOPK_L0_FACTOR <= l0 <= k * BATCHTOPK_L0_FACTOR:
            bug = KNOWN_LOADER_BUGS["batchtopk_threshold"]
            saved_by = dictionary.get("saved_by")
            cause = (
                bug.describe(str(saved_by))
                if bug.covers(saved_by)
                else "its JumpReLU threshold does not match the trained SAE"
            )
            return (
                f"its mean L0 is {l0:.4g}, but it was trained as {training} with k = {k} (a factor "
                f"{BATCHTOPK_L0_FACTOR:g} either way is allowed): {cause}"
            )
    return None
