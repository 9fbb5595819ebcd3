"""SAE loaders: SAE Lens and sparsify directories and SAE Lens releases, after the plug-ins' hooks."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_saecheck.devices import auto_device
from pytest_saecheck.errors import (
    ConfigError,
    LoadError,
    SAECheckError,
    WeightsUnavailableError,
)
from pytest_saecheck.loading.clt import (
    CLT_RELEASE_CONVERTERS,
    clt_directory_format,
    load_clt_directory,
    load_clt_release,
)
from pytest_saecheck.loading.offline import (
    is_unavailable_error,
    no_range_requests,
    offline_state,
    quiet_deprecations,
)
from pytest_saecheck.loading.resolve import hooks_then_builtin
from pytest_saecheck.loading.specs import (
    absolute_path,
    local_path,
    looks_like_path,
    split_release,
)
from pytest_saecheck.normalisation import attach_activation_scaler
from pytest_saecheck.validate import (
    check_loaded,
    installed_sae_lens,
    known_bugs,
    refuse_unverifiable,
    validate_sae_config,
)

if TYPE_CHECKING:
    from sae_lens import SAE

# --------------------------------------------------------------------------------------------------------
# SAEs


def load_sae(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    hook_name: str | None = None,
    *,
    hook_name_override: bool = False,
) -> SAE:
    """Load an SAE the way the plugin does: hooks first, then the built-in loaders.

    ``spec``: a local directory (SAE Lens ``cfg.json`` + weights, or an EleutherAI sparsify ``cfg.json`` +
    ``sae.safetensors``), an SAE Lens ``release/id``, or a name a plug-in loads (``pytest_saecheck_load_sae``; the
    bundled demo's ``"demo/<name>"``). ``device``: default CUDA when available,
    else CPU. ``dtype``: as for :func:`load_model` (None: the SAE config's dtype; float32 for sparsify).
    ``hook_name``: the hook the SAE reads, for an SAE whose config names none (a sparsify directory whose layer
    folder is not ``layers.N``); one that contradicts the SAE's own record (``hook_name``, ``hf_hook_name``) is
    refused unless ``hook_name_override=True`` (then it replaces the record, and the resolver reports the point
    as an override). Relative paths resolve against the working directory.

    Raises :class:`LoadError` (not found, unreadable, a format that cannot be converted faithfully),
    :class:`ConfigError` (a malformed spec, a hook_name contradicting the SAE's record), :class:`WeightsUnavailableError` (not on this machine, no network).
    """
    resolved_device = device if device is not None else auto_device()
    sae, from_hook = hooks_then_builtin(
        lambda hook: hook.pytest_saecheck_load_sae(spec=spec, device=resolved_device, dtype=dtype),
        lambda: builtin_load_sae(spec, resolved_device, dtype, hook_name, hook_name_override),
    )
    if from_hook and hook_name is not None:
        _set_hook_name(sae, hook_name, hook_name_override, spec)
    return sae


def _set_hook_name(sae: Any, hook_name: str, override: bool, spec: str) -> None:
    """Apply the ``hook_name`` setting to ``sae``: where its own record names another point, only on purpose."""
    from pytest_saecheck.hookpoints.resolve import OVERRIDE_KEY, same_point

    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    if metadata is None:
        raise ConfigError(
            f"the hook_name setting ({hook_name!r}) cannot be applied: the SAE ({type(sae).__name__}) has no "
            "cfg.metadata; set its hook in the loader that makes it"
        )
    record = {key: getattr(metadata, key, None) for key in ("hook_name", "hf_hook_name")}
    contradicted = {key: value for key, value in record.items() if value and not same_point(value, hook_name)}
    if record["hook_name"] and same_point(record["hook_name"], hook_name):
        contradicted = {}  # the setting repeats the SAE's own label
    if contradicted and not override:
        own = ", ".join(f"{key}={value!r}" for key, value in contradicted.items())
        raise ConfigError(
            f"the hook_name setting {hook_name!r} contradicts the SAE's own record ({own}) for {spec!r}: it would "
            "evaluate the SAE at a point it was not trained on. Remove the setting (an ini-wide hook_name applies "
            "to every SAE), or set hook_name_override=True in the marker (--saecheck-hook-name-override) if the "
            "test moves it on purpose"
        )
    metadata.hook_name = hook_name
    if contradicted:
        setattr(metadata, OVERRIDE_KEY, True)


def builtin_load_sae(
    spec: str, device: str, dtype: str | None, hook_name: str | None = None, hook_name_override: bool = False
) -> Any:
    """The built-in SAE loaders only (no hooks); see :func:`load_sae`."""
    if (path := local_path(spec)) is not None:
        if clt_directory_format(path) is not None:
            if hook_name is not None:
                raise ConfigError(
                    f"the hook_name setting ({hook_name!r}) cannot apply to the cross-layer transcoder in {spec!r}: "
                    "it reads and writes one point per layer, recorded in its own files"
                )
            return load_clt_directory(path, device, dtype)
        sae = load_sae_directory(path, device, dtype, hook_name)
    elif looks_like_path(spec):
        raise LoadError(
            f"SAE directory {spec!r} does not exist (looked for {absolute_path(spec)}); give the path of a directory "
            "saved with SAE.save_model(), an SAE Lens 'release/id' pair, or 'demo/<name>'"
        )
    else:
        release, sae_id = split_release(spec)
        sae = load_sae_release(release, sae_id, device, dtype)
    if hook_name is not None:
        _set_hook_name(sae, hook_name, hook_name_override, spec)
    return sae


SPARSIFY_WEIGHTS = "sae.safetensors"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
# sparsify layer folders SAE Lens' sparsify converter maps to a TransformerLens hook (it also matches
# "layers.3.mlp", which it would wrongly read as the residual stream, so only whole names count here)
_SPARSIFY_LAYER = re.compile(r"layers[._](\d+)|embed_tokens")


def sae_directory_format(path: Path) -> str:
    """``"sae_lens"``, ``"sparsify"`` (EleutherAI), ``"dictionary_learning"`` or ``"unknown"``, from the files."""
    cfg = _read_json(path / "cfg.json") if (path / "cfg.json").is_file() else None
    if isinstance(cfg, Mapping) and ("num_latents" in cfg or "expansion_factor" in cfg):
        if (path / SPARSIFY_WEIGHTS).is_file() or not any(path.glob("sae_weights.*")):
            return "sparsify"
    if cfg is not None:
        return "sae_lens"
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if (path / DICTIONARY_LEARNING_WEIGHTS).is_file() or (
        isinstance(config, Mapping) and "trainer" in config
    ):
        return "dictionary_learning"
    return "unknown"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LoadError(f"{str(path)!r} is not readable JSON: {error}") from None


def load_sae_directory(path: Path, device: str, dtype: str | None, hook_name: str | None = None) -> Any:
    """Load a local SAE directory: SAE Lens format, or EleutherAI sparsify converted with SAE Lens' converter.

    A dictionary_learning checkpoint (``ae.pt`` + ``config.json`` with ``trainer``) is refused: SAE Lens converts
    those only from the Hugging Face Hub.
    """
    kind = sae_directory_format(path) if path.is_dir() else "unknown"
    if kind == "sparsify":
        return load_sparsify_directory(path, device, dtype, hook_name)
    if kind == "dictionary_learning":
        raise LoadError(
            f"{str(path)!r} is a dictionary_learning checkpoint ({DICTIONARY_LEARNING_WEIGHTS} + config.json "
            "with 'trainer'); SAE Lens converts these only from the Hugging Face Hub (its 'dictionary_learning_1' "
            'loader), not from a local directory. Load it from its Hub release (sae="<release>/<id>" with the '
            "files in the HF cache), or convert it to an SAE Lens directory (an SAE Lens SAE with its weights, "
            "saved with sae.save_model(dir)), or register a pytest_saecheck_load_sae hook"
        )
    if kind != "sae_lens":
        raise LoadError(
            f"SAE path {str(path)!r} is not an SAE Lens directory (no cfg.json in {path.resolve()}); save one with "
            "sae.save_model(dir)"
        )
    cfg_file = path / "cfg.json"
    validate_sae_config(_read_json(cfg_file), str(cfg_file))
    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(path, device=device, dtype=dtype, converter=_sae_lens_disk_converter)
    except SAECheckError:
        raise
    except Exception as error:
        raise LoadError(
            f"could not load the SAE in {str(path)!r} with SAE Lens {installed_sae_lens()}: "
            f"{type(error).__name__}: {error}"
        ) from None
    check_loaded(sae, f"the SAE in {str(path)!r}", path / SAE_LENS_WEIGHTS)
    attach_activation_scaler(sae, path)
    return sae


def _sae_lens_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAE Lens' own disk loader, with SAE Lens 6 configs whose nested metadata lacks a version kept as 6.x.

    SAE Lens decides between its 6.x config layout and the older flat one by ``sae_lens_version``; a config
    with a nested ``metadata`` and no version (what SAE Lens' own converters return) would be read as old, and
    the nested ``hook_name``, ``model_name``, ... dropped. SAE Lens' ``SAEMetadata`` records the running
    version when a config names none; this records it before the layout is decided.
    """
    from sae_lens import __version__ as sae_lens_version
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    cfg_dict, state_dict = sae_lens_disk_loader(path, device, cfg_overrides)
    metadata = cfg_dict.get("metadata")
    if (
        isinstance(metadata, dict)
        and not cfg_dict.get("sae_lens_version")
        and not metadata.get("sae_lens_version")
    ):
        cfg_dict["metadata"] = {**metadata, "sae_lens_version": sae_lens_version}
    return cfg_dict, state_dict


def load_sparsify_directory(path: Path, device: str, dtype: str | None, hook_name: str | None = None) -> Any:
    """An EleutherAI sparsify ``SparseCoder`` directory as an SAE Lens ``TopKSAE``, via SAE Lens' converter.

    SAE Lens' ``sparsify_disk_loader`` maps the layer folder (``layers.N`` to ``blocks.N.hook_resid_post``,
    ``embed_tokens`` to ``hook_embed``); a folder named otherwise (``layers.3.mlp``, ``h.3``) keeps its name, a
    module path relative to the base model, as ``hook_name`` for :func:`pytest_saecheck.hookpoints.resolve_points`
    to place on the model. ``hook_name`` places it instead, and is checked against the converter's mapping by
    :func:`load_sae` for a layer folder. Two of its readings disagree with sparsify's own ``SparseCoder`` (1.x) and are corrected
    here: the stored ``W_dec`` is already ``[num_latents, d_in]`` (it transposes it), and sparsify subtracts
    ``b_dec`` before encoding whatever ``normalize_decoder`` says. Transcoders, skip connections and activations
    other than TopK are refused: the converter would drop them. Without a ``config.json`` (sparsify's run
    config) in the parent folder the model and dataset are unknown rather than guessed.
    """
    cfg = _read_json(path / "cfg.json")
    what = f"{str(path)!r} is an EleutherAI sparsify directory (cfg.json with num_latents/expansion_factor)"
    refusals = []
    if cfg.get("transcode"):
        refusals.append(
            "it is a transcoder (transcode=true), which SAE Lens' sparsify converter reads as an SAE"
        )
    if cfg.get("skip_connection"):
        refusals.append("it has a skip connection (W_skip), which SAE Lens' sparsify converter drops")
    if cfg.get("activation", "topk") != "topk":
        refusals.append(f"its activation is {cfg.get('activation')!r}; SAE Lens converts only topk")
    if not (path / SPARSIFY_WEIGHTS).is_file():
        refusals.append(f"it has no {SPARSIFY_WEIGHTS}")
    if refusals:
        raise LoadError(
            f"{what}, but it cannot be evaluated faithfully: {'; '.join(refusals)}. Load it with sparsify's "
            "SparseCoder.load_from_disk and register a pytest_saecheck_load_sae hook that returns an object with "
            "encode/decode/cfg"
        )
    if hook_name is None and not _SPARSIFY_LAYER.fullmatch(path.name):
        hook_name = path.name  # sparsify's hookpoint, a module path the resolver places on the model
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    run_config = path.parent / "config.json"
    run = _read_json(run_config) if run_config.is_file() else {}
    overrides: dict[str, Any] = {"dtype": dtype or "float32", "apply_b_dec_to_input": True}
    if "model" not in run:
        overrides["model_name"] = None
    if "dataset" not in run:
        overrides["dataset_path"] = None
    if "ctx_len" not in run:
        overrides["context_size"] = None
    with safe_keys(path / SPARSIFY_WEIGHTS) as stored:
        stored_w_dec = "W_dec" in stored

    def converter(
        folder: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        with _sparsify_layer_view(Path(folder)) as view:
            cfg_dict, state_dict = sparsify_disk_loader(view, device, {**(cfg_overrides or {}), **overrides})
        if stored_w_dec:  # sparsify stores W_dec as [num_latents, d_in], SAE Lens' layout; undo its transpose
            state_dict["W_dec"] = state_dict["W_dec"].T.contiguous()
        if hook_name is not None and not _SPARSIFY_LAYER.fullmatch(path.name):
            cfg_dict["hook_name"] = hook_name  # the converter cannot name this folder
        return cfg_dict, state_dict

    try:
        sae = SAE.load_from_disk(path, device=device, dtype=dtype or "float32", converter=converter)
    except SAECheckError:
        raise
    except Exception as error:
        raise LoadError(
            f"{what}, and SAE Lens' sparsify converter failed on it (SAE Lens {installed_sae_lens()}): "
            f"{type(error).__name__}: {error}"
        ) from None
    check_loaded(sae, f"the sparsify SAE in {str(path)!r}")
    return sae


@contextlib.contextmanager
def _sparsify_layer_view(path: Path) -> Iterator[Path]:
    """``path``, or (for a layer folder SAE Lens' converter cannot name) a temporary ``layers.0`` folder linking
    to its files, so that the converter reads it; the hook then comes from the ``hook_name`` setting."""
    if _SPARSIFY_LAYER.fullmatch(path.name):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="saecheck-sparsify-") as tmp:
        run = Path(tmp) / path.parent.name
        view = run / "layers.0"
        view.mkdir(parents=True)
        for name in ("cfg.json", SPARSIFY_WEIGHTS):
            (view / name).symlink_to((path / name).resolve())
        if (path.parent / "config.json").is_file():
            (run / "config.json").symlink_to((path.parent / "config.json").resolve())
        yield view


@contextlib.contextmanager
def safe_keys(path: Path) -> Iterator[set[str]]:
    """The tensor names in a safetensors file (read from its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield set(handle.keys())
    except Exception as error:
        raise LoadError(f"{str(path)!r} is not a readable safetensors file: {error}") from None


def load_sae_release(release: str, sae_id: str, device: str, dtype: str | None) -> Any:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release in directory:
        known_ids = list(directory[release].saes_map)
        if sae_id not in known_ids:
            close = difflib.get_close_matches(sae_id, known_ids, n=3, cutoff=0.5)
            hint = (
                f"close ids: {', '.join(close)}" if close else f"{len(known_ids)} ids, e.g. {known_ids[:3]}"
            )
            raise LoadError(f"SAE Lens release {release!r} has no SAE id {sae_id!r} ({hint})")
        repo_id, folder = directory[release].repo_id, directory[release].saes_map[sae_id]
        if getattr(directory[release], "conversion_func", None) in CLT_RELEASE_CONVERTERS:
            # SAE Lens would sum each layer's decoders into one; the repository is one whole CLT
            return load_clt_release(release, repo_id, dtype)
    elif "/" in release:
        repo_id, folder = release, sae_id
    else:
        spec = f"{release}/{sae_id}"
        if os.path.isdir(os.path.expanduser(release)):
            # "saes/nope" where saes/ exists: a local SAE directory that is missing, not a release name.
            raise LoadError(
                f"no SAE directory at {absolute_path(spec)} (the directory {absolute_path(release)} exists, and "
                f"{release!r} is not an SAE Lens release); check the name, or save the SAE there with "
                "sae.save_model(path)"
            )
        close = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.5)
        hint = f" Close releases: {', '.join(close)}." if close else ""
        raise LoadError(
            f"{release!r} is not an SAE Lens release (nor a local directory: looked for {absolute_path(spec)})."
            f"{hint} See sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory() for the list"
        )
    where = f"SAE Lens release {release!r}, id {sae_id!r}"
    require_safe_torch_load(where)
    try:
        with quiet_deprecations(), no_range_requests():
            sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except SAECheckError:
        raise
    except Exception as error:
        if is_unavailable_error(error):
            raise WeightsUnavailableError(
                f"SAE {release}/{sae_id} (Hugging Face repo {repo_id}, folder {folder}) is not available on "
                f"this machine ({offline_state()}). Download it once with network access: "
                f"python -c \"from sae_lens import SAE; SAE.from_pretrained('{release}', '{sae_id}')\" "
                f"(or: hf download {repo_id} --include '{folder}/*') and run with the same HF_HOME, or save it "
                "with sae.save_model(dir) and set sae= to that directory"
            ) from None
        loader = f"{getattr(directory.get(release), 'conversion_func', '') or ''} {sae_id}"
        bugs = known_bugs(cfg={}, loader=loader)
        raise LoadError(
            f"could not load {where} (Hugging Face repo {repo_id}, folder {folder}) with SAE Lens "
            f"{installed_sae_lens()}: {type(error).__name__}: {error}"
            + (f". {' '.join(bugs)}" if bugs else "")
        ) from None
    to_dict = getattr(sae.cfg, "to_dict", None)
    if callable(to_dict):
        validate_sae_config(to_dict(), where)
    check_loaded(sae, where)
    refuse_unverifiable(sae, where)
    return sae


TORCH_SAFE_LOAD = (2, 6)
"""The first torch whose ``torch.load`` defaults to ``weights_only=True``. SAE Lens' hub loaders call
``torch.load`` without ``weights_only``; on an older torch a pickled checkpoint from the hub could run code."""


def require_safe_torch_load(where: str) -> None:
    """Refuse an SAE Lens release on a torch older than :data:`TORCH_SAFE_LOAD` (raises :class:`LoadError`)."""
    import torch

    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if version < TORCH_SAFE_LOAD:
        raise LoadError(
            f"{where} is loaded by SAE Lens' hub loaders, which call torch.load without weights_only; torch "
            f"{torch.__version__} would unpickle the checkpoint (which can run code). Upgrade torch to "
            f"{'.'.join(map(str, TORCH_SAFE_LOAD))} or later (its default is weights_only=True)"
        )
