"""Metric pipelines: the protocol :func:`~pytest_saecheck.checks.pipeline.assert_metric_pipeline` checks, and
the built-in adapters (our engine, SAE Lens' ``run_evals``, SAEBench core).

A *pipeline* is a callable ``pipeline(model, sae, tokens, *, batch_size, **options) -> Mapping``:

- ``model`` a TransformerLens ``HookedTransformer``; ``sae`` an SAE Lens SAE or transcoder; ``tokens`` token ids
  ``[n_sequences, seq_len]`` (int64); ``batch_size`` sequences per evaluation batch (``n_sequences`` is always a
  multiple of it).
- ``options`` (only where a property needs them, and only when the callable's signature accepts them):
  ``exclude_token_ids`` (positions holding these ids are neither spliced nor scored) and ``activation_scale``
  (the SAE was trained on activations multiplied by this factor: scale before encoding, unscale after
  decoding, SAE Lens' ``ActivationScaler``).
- It returns metrics under SAE Lens' names (:data:`SAE_LENS_NAMES`), nested as ``run_evals`` writes them
  (``{"reconstruction_quality": {"mse": ...}, ...}``) or flat (``{"mse": ...}`` or
  ``{"reconstruction_quality/mse": ...}``); other keys are ignored.

Every position is evaluated unless ``exclude_token_ids`` says otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_saecheck.errors import ConfigError

# (our engine's name, SAE Lens run_evals group, SAE Lens name): every metric both compute.
SHARED_METRICS: tuple[tuple[str, str, str], ...] = (
    ("ce_orig", "model_performance_preservation", "ce_loss_without_sae"),
    ("ce_sae", "model_performance_preservation", "ce_loss_with_sae"),
    ("ce_zero", "model_performance_preservation", "ce_loss_with_ablation"),
    ("ce_loss_score", "model_performance_preservation", "ce_loss_score"),
    ("kl_sae", "model_behavior_preservation", "kl_div_with_sae"),
    ("kl_zero", "model_behavior_preservation", "kl_div_with_ablation"),
    ("kl_div_score", "model_behavior_preservation", "kl_div_score"),
    ("explained_variance", "reconstruction_quality", "explained_variance"),
    ("explained_variance_legacy", "reconstruction_quality", "explained_variance_legacy"),
    ("mse", "reconstruction_quality", "mse"),
    ("cosine_sim", "reconstruction_quality", "cossim"),
    ("l2_ratio", "shrinkage", "l2_ratio"),
    ("l0", "sparsity", "l0"),
    ("l1", "sparsity", "l1"),
)
"""Our engine's metric names beside SAE Lens ``run_evals``' group and name, for every metric both compute."""

SAE_LENS_NAMES: frozenset[str] = frozenset(
    {name for _, _, name in SHARED_METRICS} | {"l2_norm_in", "l2_norm_out", "relative_reconstruction_bias"}
)
"""The SAE Lens metric names a pipeline's mapping is read for."""

ADAPTERS: tuple[str, ...] = ("sae_lens", "sae_bench", "saecheck")
"""The built-in pipelines, by name: SAE Lens ``run_evals``, SAEBench core, and our own engine."""

PipelineFn = Callable[..., Mapping[str, Any]]


# ------------------------------------------------------------------------------------------------------------
# reading a pipeline's output


def flatten_metrics(result: Any, pipeline_name: str) -> dict[str, float]:
    """The SAE Lens-named numbers of a pipeline's output, flat: ``{"mse": 0.12, ...}``.

    Accepts ``run_evals``' ``(metrics, feature_metrics)`` tuple, a nested mapping ``group -> name -> value`` or a
    flat one (``name`` or ``group/name`` keys). Keys outside :data:`SAE_LENS_NAMES` are ignored; values become
    floats (NaN and infinities kept: they are what is under test).

    Raises:
        ConfigError: the output is not a mapping, or names one metric twice with different values.
    """
    if isinstance(result, tuple) and result and isinstance(result[0], Mapping):
        result = result[0]
    if not isinstance(result, Mapping):
        raise ConfigError(
            f"metric pipeline {pipeline_name} returned {type(result).__name__}; it must return a mapping of "
            "SAE Lens metric names (e.g. {'reconstruction_quality': {'mse': ...}} or {'mse': ...})"
        )
    flat: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        name = key.rsplit("/", 1)[-1]
        if name not in SAE_LENS_NAMES:
            return
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"metric pipeline {pipeline_name} returned {key}={value!r}, which is not a number"
            ) from None
        if name in flat and not (flat[name] == number or (flat[name] != flat[name] and number != number)):
            raise ConfigError(
                f"metric pipeline {pipeline_name} returned {name} twice with different values "
                f"({flat[name]!r} and {number!r}); return one value per metric"
            )
        flat[name] = number

    for key, value in result.items():
        if isinstance(value, Mapping):
            for inner, number in value.items():
                if not isinstance(number, Mapping):
                    put(f"{key}/{inner}", number)
        else:
            put(str(key), value)
    return flat


def accepts(pipeline: PipelineFn, option: str) -> bool:
    """Whether ``pipeline`` takes the keyword ``option`` (or ``**kwargs``)."""
    try:
        parameters = inspect.signature(pipeline).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == option or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# ------------------------------------------------------------------------------------------------------------
# our engine


AS_RUN_EVALS: Mapping[str, Any] = {
    "exclude_bos": False,
    "exclude_special_tokens": False,
    "mean_ablation": False,
}
"""``evaluate`` options under which our engine scores the positions and variants SAE Lens' ``run_evals`` does with
``exclude_special_tokens=False``: every position (no BOS or special token left out) and no mean ablation. Shared
by the ``"saecheck"`` adapter and the engine benchmark."""


def saecheck_pipeline(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    batch_size: int,
    exclude_token_ids: Sequence[int] = (),
    activation_scale: float | None = None,
) -> dict[str, float]:
    """Our engine (:func:`pytest_saecheck.evaluate`, float64 sums) as a pipeline, under SAE Lens' names.

    Every position is evaluated (``exclude_bos=False``, ``exclude_special_tokens=False``) except those holding
    ``exclude_token_ids``; no mean ablation. Metrics our engine leaves undefined are absent.
    """
    from pytest_saecheck.engine import evaluate

    evaluation = evaluate(
        model,
        sae,
        tokens,
        batch_size=batch_size,
        exclude_token_ids=list(exclude_token_ids),
        activation_scaler=activation_scale,
        scaling_law=None,
        progress=False,
        **AS_RUN_EVALS,
    )
    return {
        theirs: float(evaluation.metrics[ours])
        for ours, _, theirs in SHARED_METRICS
        if ours in evaluation.metrics
    }


# ------------------------------------------------------------------------------------------------------------
# SAE Lens run_evals


class TokenStore:
    """The slice of SAE Lens' ActivationsStore that ``run_evals`` uses, serving fixed token batches in order."""

    def __init__(self, tokens: Any, batch_size: int) -> None:
        self.tokens = tokens
        self.store_batch_size_prompts = batch_size
        self.context_size = int(tokens.shape[1])
        self.row = 0

    def get_batch_tokens(self, batch_size: int | None = None, raise_at_epoch_end: bool = False) -> Any:
        n = batch_size or self.store_batch_size_prompts
        if self.row + n > self.tokens.shape[0]:
            raise RuntimeError("TokenStore ran out of tokens: n_batches x batch_size exceeds the token set")
        batch = self.tokens[self.row : self.row + n]
        self.row += n
        return batch

    def reset_input_dataset(self) -> None:
        self.row = 0


def sae_lens_eval_config(batch_size: int, n_batches: int, *, featurewise_density: bool = True) -> Any:
    """SAE Lens' ``EvalConfig`` computing every metric :data:`SHARED_METRICS` names (KL, CE, L2 norms, sparsity,
    variance; featurewise density unless ``featurewise_density=False``) over ``n_batches`` batches of
    ``batch_size`` sequences."""
    from sae_lens.evals import EvalConfig

    return EvalConfig(
        batch_size_prompts=batch_size,
        n_eval_reconstruction_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=n_batches,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=featurewise_density,
        compute_featurewise_weight_based_metrics=False,
        library_version="saecheck",
        git_hash="saecheck",
    )


def run_sae_lens_evals(
    model: Any,
    sae: Any,
    tokens: Any,
    batch_size: int,
    eval_config: Any,
    *,
    exclude_token_ids: Sequence[int] = (),
    activation_scale: float | None = None,
) -> Any:
    """SAE Lens' ``run_evals`` on ``tokens`` (whole batches of ``batch_size``, in order) through :class:`TokenStore`.

    Positions holding ``exclude_token_ids`` are SAE Lens' ignored tokens (``exclude_special_tokens=`` from 6.x
    releases that have it, ``ignore_tokens=`` before); ``activation_scale`` becomes its ``ActivationScaler``.
    Returns ``run_evals``' own ``(metrics, feature_metrics)``.
    """
    from sae_lens.evals import run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    options: dict[str, Any] = {}
    if "exclude_special_tokens" in inspect.signature(run_evals).parameters:
        options["exclude_special_tokens"] = list(exclude_token_ids) if exclude_token_ids else False
    else:  # releases before the exclude_special_tokens argument
        options["ignore_tokens"] = set(exclude_token_ids)
    return run_evals(
        sae,
        TokenStore(tokens, batch_size),
        model,
        ActivationScaler(activation_scale),
        eval_config,
        **options,
    )


def sae_lens_pipeline(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    batch_size: int,
    exclude_token_ids: Sequence[int] = (),
    activation_scale: float | None = None,
) -> Any:
    """The ``"sae_lens"`` adapter: the installed SAE Lens' ``run_evals`` on exactly ``tokens``."""
    n_batches = int(tokens.shape[0]) // batch_size
    config = sae_lens_eval_config(batch_size, n_batches, featurewise_density=False)
    return run_sae_lens_evals(
        model,
        sae,
        tokens,
        batch_size,
        config,
        exclude_token_ids=exclude_token_ids,
        activation_scale=activation_scale,
    )


# ------------------------------------------------------------------------------------------------------------
# SAEBench core


class _FlatConfig:
    """An SAE Lens 6 config read the SAE Lens 5 way SAEBench 0.6.0 reads it: ``cfg.hook_name`` falls back to
    ``cfg.metadata.hook_name``."""

    def __init__(self, cfg: Any) -> None:
        self._cfg = cfg

    def __getattr__(self, name: str) -> Any:
        if hasattr(self._cfg, name):
            return getattr(self._cfg, name)
        metadata = getattr(self._cfg, "metadata", None)
        value = getattr(metadata, name, None) if metadata is not None else None
        if name == "hook_layer" and value is None:  # SAE Lens 5's layer of the hook, read from its name
            from sae_lens.util import extract_layer_from_tlens_hook_name

            return extract_layer_from_tlens_hook_name(str(self.hook_name))
        if metadata is not None and hasattr(metadata, name):
            return value
        raise AttributeError(name)


class _FlatConfigSAE:
    """The SAE with a :class:`_FlatConfig`; everything else (encode, decode, device, ...) is the SAE's own."""

    def __init__(self, sae: Any) -> None:
        self._sae = sae
        self.cfg = _FlatConfig(sae.cfg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sae, name)


def sae_bench_pipeline(model: Any, sae: Any, tokens: Any, *, batch_size: int) -> Any:
    """The ``"sae_bench"`` adapter: SAEBench core's ``get_downstream_reconstruction_metrics`` and
    ``get_sparsity_and_variance_metrics`` (its fork of SAE Lens' evals) on exactly ``tokens``. SAEBench 0.6.0 reads
    SAE Lens 5 configs (``sae.cfg.hook_name``): an SAE Lens 6 SAE is handed over with its metadata readable there.

    Raises:
        ConfigError: SAEBench is not installed.
    """
    try:
        from sae_bench.evals.core import main as core
    except ImportError as error:
        raise ConfigError(
            f"the 'sae_bench' pipeline needs SAEBench, which is not importable here ({error}); install it with "
            "`pip install sae-bench`, or pass your own pipeline callable"
        ) from None
    n_batches = int(tokens.shape[0]) // batch_size
    store = TokenStore(tokens, batch_size)
    sae = _FlatConfigSAE(sae)
    reconstruction = core.get_downstream_reconstruction_metrics(
        sae,
        model,
        store,
        compute_kl=True,
        compute_ce_loss=True,
        n_batches=n_batches,
        eval_batch_size_prompts=batch_size,
        exclude_special_tokens_from_reconstruction=False,
    )
    store.reset_input_dataset()
    variance = core.get_sparsity_and_variance_metrics(
        sae,
        model,
        store,
        n_batches=n_batches,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=False,
        eval_batch_size_prompts=batch_size,
        model_kwargs={},
    )
    metrics = variance[0] if isinstance(variance, tuple) else variance
    return {**dict(reconstruction), **dict(metrics)}


def resolve_pipeline(pipeline: Any) -> tuple[str, PipelineFn]:
    """``(name, callable)`` for a pipeline callable or a built-in adapter name (:data:`ADAPTERS`).

    Raises:
        ConfigError: an unknown name, or something that is neither a name nor callable.
    """
    if isinstance(pipeline, str):
        functions: dict[str, PipelineFn] = {
            "sae_lens": sae_lens_pipeline,
            "sae_bench": sae_bench_pipeline,
            "saecheck": saecheck_pipeline,
        }
        if pipeline not in functions:
            raise ConfigError(
                f"unknown metric pipeline {pipeline!r}; built-in ones: {', '.join(ADAPTERS)}, or pass a callable "
                "(model, sae, tokens, *, batch_size) -> mapping of SAE Lens metric names"
            )
        if pipeline == "sae_lens":
            try:
                import sae_lens

                version = getattr(sae_lens, "__version__", "?")
            except ImportError as error:
                raise ConfigError(f"the 'sae_lens' pipeline needs SAE Lens: {error}") from None
            return f"sae_lens {version}", functions[pipeline]
        return pipeline, functions[pipeline]
    if not callable(pipeline):
        raise ConfigError(
            f"pipeline must be a callable (model, sae, tokens, *, batch_size) -> mapping, or one of "
            f"{', '.join(ADAPTERS)}; got {type(pipeline).__name__}"
        )
    try:
        inspect.signature(pipeline).bind(None, None, None, batch_size=1)
    except TypeError as error:
        raise ConfigError(
            f"pipeline {getattr(pipeline, '__name__', pipeline)!r} cannot be called as "
            f"(model, sae, tokens, *, batch_size): {error}; give it that signature (it may take more keywords "
            "with defaults, e.g. exclude_token_ids=(), activation_scale=None)"
        ) from None
    except ValueError:  # a callable whose signature cannot be read: it is tried as it is
        pass
    return getattr(pipeline, "__name__", type(pipeline).__name__), pipeline


__all__ = [
    "ADAPTERS",
    "SAE_LENS_NAMES",
    "SHARED_METRICS",
    "TokenStore",
    "accepts",
    "flatten_metrics",
    "resolve_pipeline",
    "run_sae_lens_evals",
    "sae_bench_pipeline",
    "sae_lens_eval_config",
    "sae_lens_pipeline",
    "saecheck_pipeline",
]
