"""Cross-layer transcoder loaders: circuit-tracer's folder layout, Gemma Scope 2 CLT folders, SAE Lens' CLT releases.

Layouts (read from the files; nothing is downloaded here except through huggingface_hub's cache for a release):

* **circuit-tracer** (the ``mntss/clt-*`` releases; circuit-tracer's ``load_clt``): ``config.yaml`` with
  ``model_kind: cross_layer_transcoder``, ``model_name``, ``feature_input_hook`` and ``feature_output_hook`` (the
  TransformerLens hook names inside ``blocks.<l>``); per layer ``W_enc_<l>.safetensors`` holding ``W_enc_<l>``
  ``[d_sae, d_model]``, ``b_enc_<l>`` ``[d_sae]``, ``b_dec_<l>`` ``[d_model]`` and, for JumpReLU, ``threshold_<l>``
  ``[d_sae]``; and ``W_dec_<l>.safetensors`` holding ``W_dec_<l>`` ``[d_sae, n_layers - l, d_model]``.
* **Gemma Scope 2** (``google/gemma-scope-2-*/clt/<width>``; circuit-tracer's ``load_gemma_scope_2_clt``): per
  layer ``layer_<l>.safetensors`` holding ``w_enc`` ``[d_model, d_sae]``, ``b_enc``, ``threshold`` ``[d_sae]``,
  ``b_dec`` ``[d_model]``, ``w_dec`` ``[d_sae, n_layers, d_model]`` (the slots of layers before ``l`` unused) and,
  for the ``affine`` CLTs, ``affine_skip_connection`` ``[d_model, d_model]``; an optional ``config.json`` with
  ``model_name``. They read ``pre_feedforward_layernorm.output`` and write ``post_feedforward_layernorm.output``
  (SAE Lens' Gemma Scope 2 loader): in TransformerLens ``ln2``'s output (``ln2.hook_normalized`` with ``ln2``'s
  weight applied, ``CLTRecord.norm_output``) and ``hook_mlp_out``.
* **SAE Lens** releases whose converter is ``mntss_clt_layer_transcoder``: SAE Lens sums each layer's decoders
  into one, which cannot be spliced; here the release's repository is read as the circuit-tracer folder it is.

Each loader checks the files against each other and the config (layers contiguous from 0, one ``d_model``,
every shape) before any weight is read, and raises :class:`LoadError` naming the file and the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_saecheck.clt import JUMP_RELU, RELU, CLTRecord, CrossLayerTranscoder
from pytest_saecheck.errors import LoadError, WeightsUnavailableError

if TYPE_CHECKING:
    import torch

CIRCUIT_TRACER, GEMMA_SCOPE_2 = "circuit_tracer", "gemma_scope_2"
CLT_RELEASE_CONVERTERS = frozenset({"mntss_clt_layer_transcoder"})
"""SAE Lens release converters whose repository is one circuit-tracer CLT (SAE Lens sums its decoders)."""

_ENC = re.compile(r"W_enc_(\d+)\.safetensors")
_GS2 = re.compile(r"layer_(\d+)\.safetensors")


def clt_directory_format(path: Path) -> str | None:
    """``"circuit_tracer"``, ``"gemma_scope_2"``, or None when ``path`` holds no CLT (from the file names)."""
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if any(_ENC.fullmatch(n) for n in names) and (path / "config.yaml").is_file():
        return CIRCUIT_TRACER
    if any(_GS2.fullmatch(n) for n in names):
        return GEMMA_SCOPE_2
    return None


def load_clt(
    path: str | Path, dtype: str | None = None, *, weight_budget_bytes: int | None = None
) -> CrossLayerTranscoder:
    """Load a cross-layer transcoder folder (circuit-tracer's or Gemma Scope 2's layout, from its files).

    ``dtype``: the weights' dtype when read (default: as stored); ``weight_budget_bytes``: the CLT's weights are
    kept in memory after the first read when they total at most this (default
    :data:`pytest_saecheck.clt.DEFAULT_WEIGHT_BUDGET_BYTES`), otherwise streamed one layer's tensor at a time.
    Raises :class:`LoadError` naming the file and key that disagree.
    """
    return load_clt_directory(Path(path), None, dtype, weight_budget_bytes)


def load_clt_directory(
    path: Path, device: str | None = None, dtype: str | None = None, weight_budget_bytes: int | None = None
) -> CrossLayerTranscoder:
    """Load the CLT in ``path`` (either layout). ``dtype``: the weights' dtype (default: as stored);
    ``device`` is where tensors go when the splice reads them (they are read per layer, not here).

    Raises :class:`LoadError` for a folder that is not a CLT or whose files disagree.
    """
    del device  # tensors move to the activations' device when read
    kind = clt_directory_format(path)
    if kind == CIRCUIT_TRACER:
        return load_circuit_tracer_clt(path, dtype, weight_budget_bytes)
    if kind == GEMMA_SCOPE_2:
        return load_gemma_scope_2_clt(path, dtype, weight_budget_bytes)
    raise LoadError(
        f"{str(path)!r} is not a cross-layer transcoder folder: expected circuit-tracer's config.yaml with "
        "W_enc_<l>.safetensors / W_dec_<l>.safetensors, or Gemma Scope 2's layer_<l>.safetensors"
    )


# --- reading safetensors headers and slices ---------------------------------------------------------------


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except LoadError:
        raise
    except Exception as error:
        raise LoadError(f"{str(path)!r} is not a readable safetensors file: {error}") from None


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with _open(path) as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _dtype_of(path: Path, key: str) -> torch.dtype:
    import torch

    with _open(path) as handle:
        stored = handle.get_slice(key).get_dtype()
    name = _SAFETENSORS_DTYPES.get(stored)
    if name is None:
        raise LoadError(
            f"{str(path)!r}: tensor {key!r} is stored as {stored}; a CLT's weights must be floating point"
        )
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _require(
    path: Path, shapes: dict[str, tuple[int, ...]], key: str, shape: tuple[int, ...] | None
) -> tuple[int, ...]:
    if key not in shapes:
        raise LoadError(
            f"{str(path)!r} has no tensor {key!r} (it holds {', '.join(sorted(shapes)) or 'none'}); the CLT folder "
            "is incomplete or in another layout"
        )
    if shape is not None and shapes[key] != shape:
        raise LoadError(
            f"{str(path)!r}: tensor {key!r} has shape {shapes[key]}, expected {shape} from the other files"
        )
    return shapes[key]


def _check_recorded(config_path: Path, config: dict[str, Any], found: dict[str, int]) -> None:
    """Raise :class:`LoadError` when the config records a size (``n_layers``, ``d_model``) the files disagree with."""
    for key, value in found.items():
        recorded = config.get(key)
        if recorded is not None and recorded != value:
            raise LoadError(
                f"{str(config_path)!r} records {key}={recorded!r}, but the weight files hold {key}={value}; the "
                "folder mixes files of different CLTs"
            )


def _layers(path: Path, pattern: re.Pattern[str], what: str) -> int:
    found = sorted(int(m.group(1)) for p in path.iterdir() if (m := pattern.fullmatch(p.name)))
    if found != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise LoadError(
            f"{str(path)!r}: the {what} files are not layers 0..{max(found)} (missing layer "
            f"{', '.join(map(str, missing))}); a CLT needs every layer from 0"
        )
    return len(found)


def _encoder_shape(
    path: Path, shapes: dict[str, tuple[int, ...]], key: str, d_model: int | None, *, features_first: bool
) -> tuple[int, int]:
    """``(d_sae, d_model)`` of an encoder stored ``[d_sae, d_model]`` (``features_first``) or ``[d_model, d_sae]``,
    checked against the ``d_model`` of the layers before (None for layer 0)."""
    shape = _require(path, shapes, key, None)
    layout = "[d_sae, d_model]" if features_first else "[d_model, d_sae]"
    if len(shape) != 2:
        raise LoadError(f"{str(path)!r}: tensor {key!r} has shape {shape}, expected {layout}")
    width, model_width = shape if features_first else (shape[1], shape[0])
    if d_model is not None and model_width != d_model:
        raise LoadError(
            f"{str(path)!r}: tensor {key!r} reads d_model={model_width}, but layer 0 reads d_model={d_model}"
        )
    return width, model_width


def _same_in_every_layer(
    path: Path, key: str, shapes: dict[str, tuple[int, ...]], in_layer_0: bool | None
) -> bool:
    """Whether ``key`` is in this layer's file; raises :class:`LoadError` when layer 0 said otherwise."""
    present = key in shapes
    if in_layer_0 is not None and present != in_layer_0:
        raise LoadError(
            f"{str(path)!r}: {key!r} is {'present' if present else 'absent'} here but not in layer 0; every layer "
            "of one CLT has the same parts (activation threshold, skip connection)"
        )
    return present


class SafetensorsSource:
    """A :class:`pytest_saecheck.clt.WeightSource` over per-layer safetensors files (either layout).

    ``layout``: ``"circuit_tracer"`` or ``"gemma_scope_2"``; ``dtype``: convert to it when read (None: as stored).
    Decoder slices are read with safetensors' ``get_slice``, so one ``[d_sae, d_model]`` slice is in memory.
    """

    def __init__(self, path: Path, layout: str, dtype: torch.dtype | None) -> None:
        self.path = path
        self.layout = layout
        self.dtype = dtype

    def _file(self, what: str, layer: int) -> tuple[Path, str]:
        if self.layout == CIRCUIT_TRACER:
            kind = "W_dec" if what == "W_dec" else "W_enc"
            return self.path / f"{kind}_{layer}.safetensors", f"{what}_{layer}"
        return self.path / f"layer_{layer}.safetensors", {
            "W_enc": "w_enc",
            "W_dec": "w_dec",
            "W_skip": "affine_skip_connection",
        }.get(what, what)

    def name(self, what: str, layer: int) -> str:
        file, key = self._file(what, layer)
        return f"{key} in {file}"

    def _read(self, what: str, layer: int, index: Any = None) -> torch.Tensor:
        file, key = self._file(what, layer)
        with _open(file) as handle:
            tensor = handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def encoder(self, layer: int) -> tuple[Any, Any, Any]:
        w_enc = self._read("W_enc", layer)
        if self.layout == CIRCUIT_TRACER:
            w_enc = w_enc.T  # stored [d_sae, d_model]
        threshold = self._read("threshold", layer) if self.has_threshold else None
        return w_enc, self._read("b_enc", layer), threshold

    has_threshold = False

    def decoder(self, source: int, target: int) -> Any:
        slot = target - source if self.layout == CIRCUIT_TRACER else target
        return self._read("W_dec", source, (slice(None), slot, slice(None)))

    def b_dec(self, layer: int) -> Any:
        return self._read("b_dec", layer)

    def skip(self, layer: int) -> Any:
        return self._read("W_skip", layer) if self.layout == GEMMA_SCOPE_2 else None


def _torch_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    import torch

    value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise LoadError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float64'")
    return value


# --- circuit-tracer ------------------------------------------------------------------------------------------


def load_circuit_tracer_clt(
    path: Path, dtype: str | None = None, weight_budget_bytes: int | None = None
) -> CrossLayerTranscoder:
    """A circuit-tracer CLT folder (see the module docstring); raises :class:`LoadError` naming file and key."""
    import yaml

    config_path = path / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise LoadError(f"{str(config_path)!r} is not readable YAML: {error}") from None
    if not isinstance(config, dict):
        raise LoadError(f"{str(config_path)!r} is not a mapping of settings")
    kind = config.get("model_kind")
    if kind != "cross_layer_transcoder":
        raise LoadError(
            f"{str(config_path)!r} says model_kind={kind!r}; this loader reads circuit-tracer's "
            "'cross_layer_transcoder' folders (a 'transcoder_set' is a set of per-layer transcoders: load each "
            "layer as an SAE Lens transcoder and evaluate them with joint=True)"
        )
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise LoadError(
                f"{str(config_path)!r} has no {key!r}; circuit-tracer's config names the hook inside each block "
                "that the CLT reads (e.g. 'ln2.hook_normalized') and writes ('hook_mlp_out')"
            )
    n_layers = _layers(path, _ENC, "W_enc_<l>.safetensors")
    d_sae: list[int] = []
    d_model: int | None = None
    has_threshold: bool | None = None
    for layer in range(n_layers):
        enc = path / f"W_enc_{layer}.safetensors"
        shapes = _shapes(enc)
        width, d_model = _encoder_shape(enc, shapes, f"W_enc_{layer}", d_model, features_first=True)
        _require(enc, shapes, f"b_enc_{layer}", (width,))
        _require(enc, shapes, f"b_dec_{layer}", (d_model,))
        layer_threshold = _same_in_every_layer(enc, f"threshold_{layer}", shapes, has_threshold)
        has_threshold = layer_threshold
        if layer_threshold:
            _require(enc, shapes, f"threshold_{layer}", (width,))
        dec = path / f"W_dec_{layer}.safetensors"
        if not dec.is_file():
            raise LoadError(f"{str(path)!r} has W_enc_{layer}.safetensors but no W_dec_{layer}.safetensors")
        _require(dec, _shapes(dec), f"W_dec_{layer}", (width, n_layers - layer, d_model))
        d_sae.append(width)
    assert d_model is not None
    _check_recorded(config_path, config, {"n_layers": n_layers, "d_model": d_model})
    source = SafetensorsSource(path, CIRCUIT_TRACER, _torch_dtype(dtype))
    source.has_threshold = bool(has_threshold)
    stored = _dtype_of(path / "W_enc_0.safetensors", "W_enc_0")
    inp, out = config["feature_input_hook"], config["feature_output_hook"]
    return CrossLayerTranscoder(
        source,
        d_model=d_model,
        d_sae=d_sae,
        activation=JUMP_RELU if has_threshold else RELU,
        has_skip=False,
        record=CLTRecord(
            hook_names_in=tuple(f"blocks.{layer}.{inp}" for layer in range(n_layers)),
            hook_names_out=tuple(f"blocks.{layer}.{out}" for layer in range(n_layers)),
            model_name=config.get("model_name"),
            format=CIRCUIT_TRACER,
            path=str(path),
        ),
        dtype=source.dtype or stored,
        weight_budget_bytes=weight_budget_bytes,
    )


# --- Gemma Scope 2 -----------------------------------------------------------------------------------------


def load_gemma_scope_2_clt(
    path: Path, dtype: str | None = None, weight_budget_bytes: int | None = None
) -> CrossLayerTranscoder:
    """A Gemma Scope 2 CLT folder (see the module docstring); raises :class:`LoadError` naming file and key."""
    n_layers = _layers(path, _GS2, "layer_<l>.safetensors")
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise LoadError(f"{str(path / 'config.json')!r} is not readable JSON: {error}") from None
    d_sae: list[int] = []
    d_model: int | None = None
    has_skip: bool | None = None
    for layer in range(n_layers):
        file = path / f"layer_{layer}.safetensors"
        shapes = _shapes(file)
        width, d_model = _encoder_shape(file, shapes, "w_enc", d_model, features_first=False)
        for key, shape in (("b_enc", (width,)), ("threshold", (width,)), ("b_dec", (d_model,))):
            _require(file, shapes, key, shape)
        _require(file, shapes, "w_dec", (width, n_layers, d_model))
        layer_skip = _same_in_every_layer(file, "affine_skip_connection", shapes, has_skip)
        has_skip = layer_skip
        if layer_skip:
            _require(file, shapes, "affine_skip_connection", (d_model, d_model))
        d_sae.append(width)
    assert d_model is not None
    _check_recorded(path / "config.json", config, {"n_layers": n_layers, "d_model": d_model})
    source = SafetensorsSource(path, GEMMA_SCOPE_2, _torch_dtype(dtype))
    source.has_threshold = True
    stored = _dtype_of(path / "layer_0.safetensors", "w_enc")
    return CrossLayerTranscoder(
        source,
        d_model=d_model,
        d_sae=d_sae,
        activation=JUMP_RELU,
        has_skip=bool(has_skip),
        record=CLTRecord(
            hook_names_in=tuple(f"blocks.{layer}.ln2.hook_normalized" for layer in range(n_layers)),
            hook_names_out=tuple(f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)),
            model_name=config.get("model_name"),
            format=GEMMA_SCOPE_2,
            path=str(path),
            hf_hook_names_in=tuple(
                f"model.layers.{layer}.pre_feedforward_layernorm.output" for layer in range(n_layers)
            ),
            hf_hook_names_out=tuple(
                f"model.layers.{layer}.post_feedforward_layernorm.output" for layer in range(n_layers)
            ),
            norm_output=True,
        ),
        dtype=source.dtype or stored,
        weight_budget_bytes=weight_budget_bytes,
    )


# --- SAE Lens releases ---------------------------------------------------------------------------------------


def load_clt_release(
    release: str, repo_id: str, dtype: str | None = None, weight_budget_bytes: int | None = None
) -> CrossLayerTranscoder:
    """The whole CLT of an SAE Lens ``mntss_clt_layer_transcoder`` release (every id of it names a layer of the
    one CLT in ``repo_id``), from the Hugging Face cache (or the Hub when online), decoders not summed.

    Raises :class:`WeightsUnavailableError` when the files are not on this machine and cannot be downloaded.
    """
    from huggingface_hub import snapshot_download

    patterns = ["config.yaml", "W_enc_*.safetensors", "W_dec_*.safetensors"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as error:
        from pytest_saecheck.loading.offline import offline_state

        raise WeightsUnavailableError(
            f"the CLT of SAE Lens release {release!r} (Hugging Face repo {repo_id}) is not available on this machine "
            f"({offline_state()}; {type(error).__name__}). Download it once with network access: "
            f"hf download {repo_id} --include 'config.yaml' 'W_enc_*' 'W_dec_*', and run with the same HF_HOME, or "
            "set sae= to a local copy of the folder"
        ) from None
    return load_circuit_tracer_clt(Path(folder), dtype, weight_budget_bytes)
