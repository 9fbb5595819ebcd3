"""What the engine needs to know about a dictionary (SAE, transcoder, skip transcoder) before splicing it.

An SAE reads and writes the same hook. A transcoder reads at ``hook_name`` and writes at ``hook_name_out``
(SAE Lens 6: ``cfg.metadata.hook_name_out``); it replaces the *output* hook's activation and is measured against
it. Its reconstruction is its own ``forward`` (a skip transcoder's forward adds the skip connection
``x @ W_skip.T``), so nothing about the architecture is re-implemented here.

Dictionaries that cannot be spliced faithfully are refused with :class:`UnsupportedDictionaryError` rather than
scored: a ``TemporalSAE`` (its ``decode`` drops the part predicted from context, so ``decode(encode(x))`` is not
its reconstruction), a transcoder that does not say where it writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pytest_saecheck.errors import ConfigError, UnsupportedDictionaryError

if TYPE_CHECKING:
    import torch

SAE, TRANSCODER, SKIP_TRANSCODER = "sae", "transcoder", "skip_transcoder"


class DictionaryConfig(Protocol):
    """The config fields the engine reads (SAE Lens 6's ``SAEConfig`` has them).

    ``metadata`` holds ``hook_name`` (required: the hook read), and optionally ``hook_name_out`` (a
    transcoder's output hook), ``hook_head_index``, ``context_size``, ``prepend_bos``; each falls back to an
    attribute of the config itself of the same name. ``normalize_activations``, ``d_out`` and
    ``architecture()`` are read when present.
    """

    @property
    def d_in(self) -> int: ...

    @property
    def d_sae(self) -> int: ...

    @property
    def metadata(self) -> Any: ...


class Dictionary(Protocol):
    """What the engine needs of an SAE (or transcoder): SAE Lens' ``SAE`` and its subclasses satisfy it.

    ``encode(x)`` maps ``[..., d_in]`` activations to ``[..., d_sae]`` latents and ``decode(latents)`` back to
    ``[..., d_out]``; a transcoder's reconstruction is ``forward_with_activations(x)`` or ``__call__`` when it has
    them (:meth:`DictionaryInfo.reconstruct`). ``named_parameters`` are checked for NaN/inf before the pass;
    ``dtype`` names the weights' dtype in messages.
    """

    @property
    def cfg(self) -> DictionaryConfig: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor: ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...


def metadata_value(sae: Any, key: str) -> Any:
    """``sae.cfg.metadata.<key>``, else ``sae.cfg.<key>``, else None (SAE Lens 6 keeps the record in metadata)."""
    metadata = getattr(sae.cfg, "metadata", None)
    value = getattr(metadata, key, None) if metadata is not None else None
    return value if value is not None else getattr(sae.cfg, key, None)


def _class_names(sae: object) -> set[str]:
    return {cls.__name__ for cls in type(sae).__mro__}


@dataclass(frozen=True)
class DictionaryInfo:
    """How a dictionary is spliced.

    ``hook_name`` is where it reads, ``hook_name_out`` where it writes (the same hook for an SAE); ``d_in`` and
    ``d_out`` are the widths it reads and writes; ``kind`` is ``"sae"``, ``"transcoder"`` or
    ``"skip_transcoder"``; ``normalize_activations`` is SAE Lens' setting of that name; ``context_size`` the
    context length it was trained on (``cfg.metadata.context_size``), when known; ``k`` the latents per token a
    TopK-family SAE records (its ``k``, or ``metadata.training_architecture_details.k``), ``training_architecture``
    the architecture it was trained as and ``saved_by`` the SAE Lens version that saved it, when recorded;
    ``points``: where it was spliced on the model and why (:meth:`pytest_saecheck.hookpoints.ResolvedPoints.to_dict`), once resolved.
    """

    kind: str
    architecture: str
    hook_name: str
    hook_name_out: str
    hook_head_index: int | None
    d_in: int
    d_out: int
    normalize_activations: str
    context_size: int | None = None
    k: int | None = None
    training_architecture: str | None = None
    saved_by: str | None = None
    points: dict[str, Any] | None = None

    @property
    def is_transcoder(self) -> bool:
        return self.kind != SAE

    def reconstruct(self, sae: Dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents [.., d_sae], reconstruction [.., d_out])`` of ``x [.., d_in]`` by the object's own code."""
        if not self.is_transcoder:
            latents = sae.encode(x)
            return latents, sae.decode(latents)
        forward_with_activations = getattr(sae, "forward_with_activations", None)
        if callable(forward_with_activations):
            recon, latents = forward_with_activations(x)
            return latents, recon
        forward: Any = sae  # a transcoder's forward is its reconstruction
        return sae.encode(x), forward(x)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "architecture": self.architecture,
            "hook_name": self.hook_name,
            "hook_name_out": self.hook_name_out,
            "hook_head_index": self.hook_head_index,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "normalize_activations": self.normalize_activations,
            "context_size": self.context_size,
            "k": self.k,
            "training_architecture": self.training_architecture,
            "saved_by": self.saved_by,
            "points": self.points,
        }


def describe(sae: Any) -> DictionaryInfo:
    """Read how ``sae`` is spliced from its class and config.

    Raises :class:`ConfigError` when the config names no hook or (an SAE Lens config) breaks a type or range
    (:func:`~pytest_saecheck.validate.validate_sae_config`), :class:`UnsupportedDictionaryError` for a
    dictionary that cannot be spliced faithfully.
    """
    from pytest_saecheck.validate import recorded_k, validate_sae_config

    cfg = getattr(sae, "cfg", None)
    if (
        cfg is None
        or not callable(getattr(sae, "encode", None))
        or not callable(getattr(sae, "decode", None))
    ):
        raise ConfigError(
            f"expected an SAE Lens SAE (an object with .cfg, .encode and .decode), got {type(sae).__name__}; "
            "load one with sae_lens.SAE.from_pretrained / SAE.load_from_disk or pytest_saecheck.load_sae"
        )
    to_dict = getattr(cfg, "to_dict", None)
    as_dict = to_dict() if callable(to_dict) else None
    if isinstance(as_dict, dict) and "d_in" in as_dict and "d_sae" in as_dict:  # an SAE Lens-shaped config
        validate_sae_config(as_dict, f"the config of the {type(sae).__name__} (sae.cfg)")
    names = _class_names(sae)
    architecture = str(getattr(cfg, "architecture", lambda: type(sae).__name__)())
    if "TemporalSAE" in names or architecture == "temporal":
        raise UnsupportedDictionaryError(
            f"{type(sae).__name__} cannot be spliced faithfully: its decode() reconstructs only the novel part "
            "of each activation and drops the part predicted from earlier positions, so the engine would score "
            "a reconstruction the SAE never makes. pytest-saecheck does not evaluate temporal SAEs yet."
        )
    hook_name = metadata_value(sae, "hook_name")
    if not hook_name:
        raise ConfigError(
            "the SAE config names no hook (cfg.metadata.hook_name); set it to the hook it reads"
        )
    hook_name_out = metadata_value(sae, "hook_name_out")
    d_in = int(cfg.d_in)
    d_out_cfg = getattr(cfg, "d_out", None)
    is_transcoder = "Transcoder" in names or hook_name_out is not None or d_out_cfg is not None
    if is_transcoder and not hook_name_out:
        raise UnsupportedDictionaryError(
            f"{type(sae).__name__} is a transcoder (it maps {hook_name!r} to another hook), but its config does "
            "not say where it writes; set sae.cfg.metadata.hook_name_out to the output hook (for an MLP "
            "transcoder usually 'blocks.<L>.hook_mlp_out') so its output replaces that activation"
        )
    k, training = recorded_k(cfg)
    if not is_transcoder:
        kind = SAE
    elif "SkipTranscoder" in names or hasattr(sae, "W_skip"):
        kind = SKIP_TRANSCODER
    else:
        kind = TRANSCODER
    return DictionaryInfo(
        kind=kind,
        architecture=architecture,
        hook_name=str(hook_name),
        hook_name_out=str(hook_name_out or hook_name),
        hook_head_index=metadata_value(sae, "hook_head_index"),
        d_in=d_in,
        d_out=int(d_out_cfg) if d_out_cfg is not None else d_in,
        normalize_activations=str(getattr(cfg, "normalize_activations", "none") or "none"),
        context_size=int(context)
        if isinstance(context := metadata_value(sae, "context_size"), int)
        else None,
        k=k,
        training_architecture=training,
        saved_by=str(saved) if (saved := metadata_value(sae, "sae_lens_training_version")) else None,
    )
