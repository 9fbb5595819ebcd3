"""The saecheck fixtures and the :class:`SAECheck` bundle they hand to tests.

``saecheck`` is lazy: the SAE, the model and the tokens are loaded the first time something needs them, and
the evaluation is computed once per (model, SAE, tokens, token policy, batch size) for the whole run. A test
whose evaluation is already cached loads no model at all. Imports no torch at import time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_saecheck import loading, records
from pytest_saecheck.config import SAECheckSettings, resolve_for_item
from pytest_saecheck.errors import ConfigError, SAECheckError
from pytest_saecheck.session_cache import SessionCache

if TYPE_CHECKING:
    from pytest_saecheck.engine import Evaluation

CACHE_KEY = pytest.StashKey[SessionCache]()

INTERVAL_LEVEL = 0.95


def session_cache(config: pytest.Config) -> SessionCache:
    """The run's :class:`SessionCache` (created on first use)."""
    cache = config.stash.get(CACHE_KEY, None)
    if cache is None:
        cache = config.stash[CACHE_KEY] = SessionCache()
    return cache


def auto_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SAECheck:
    """One SAE under test: its model, SAE, tokens and (computed once) evaluation.

    Attributes are loaded on first access. ``evaluation`` is shared by every test and assertion that uses
    the same model, SAE, tokens and token policy.
    """

    def __init__(
        self, settings: SAECheckSettings, device: str, cache: SessionCache, item: pytest.Item | None = None
    ) -> None:
        self.settings = settings
        self.device = device
        self.dtype = settings.dtype
        self._cache = cache
        self._item = item
        self._evaluation_recorded = False

    # -- specs -------------------------------------------------------------------------------------------

    @property
    def sae_spec(self) -> str:
        if self.settings.sae is None:
            raise ConfigError(
                "no SAE is configured for this test; add @pytest.mark.saecheck(sae=...) to the test, class or "
                "module (pytestmark), or pass --saecheck-sae / set the ini key saecheck_sae"
            )
        return self.settings.sae

    @property
    def model_spec(self) -> str:
        if self.settings.model is not None:
            return self.settings.model
        if self.settings.sae is not None and loading.demo_sae_name(self.settings.sae) is not None:
            return loading.DEMO
        if self.settings.sae is None:
            raise ConfigError(
                "no model is configured for this test; add @pytest.mark.saecheck(model=...) (or sae=..., whose "
                "config names its model), or pass --saecheck-model / set the ini key saecheck_model"
            )
        return loading.default_model_spec(self.sae_spec, self.sae)

    @property
    def token_source(self) -> str:
        if self.settings.tokens is not None:
            return self.settings.tokens
        if self.settings.sae is not None and loading.demo_sae_name(self.settings.sae) is not None:
            return loading.DEMO
        return loading.default_token_source(self.sae_spec, self.sae)

    @property
    def context_size(self) -> int:
        if self.settings.context_size is not None:
            return self.settings.context_size
        return loading.default_context_size(None, self.sae) if self.settings.sae is not None else 128

    @property
    def label(self) -> str:
        """A short readable name: the SAE spec (and the model, when it was given explicitly)."""
        sae = self.settings.sae or "(no SAE)"
        return sae if self.settings.model is None else f"{sae} @ {self.settings.model}"

    # -- cache keys --------------------------------------------------------------------------------------

    def _model_key(self) -> Hashable:
        return (self.model_spec, self.device, self.dtype)

    def _sae_key(self) -> Hashable:
        return (self.sae_spec, self.device, self.dtype)

    def _tokens_key(self) -> Hashable:
        bos = loading.prepend_bos(self.sae) if self.settings.sae is not None else True
        return (
            self.token_source,
            self.model_spec,
            self.settings.n_tokens,
            self.context_size,
            self.settings.seed,
            bos,
        )

    def evaluation_key(self) -> Hashable:
        return (
            self._model_key(),
            self._sae_key(),
            self._tokens_key(),
            self.settings.batch_size,
            self.settings.exclude_bos,
            self.settings.scaling_law,
        )

    # -- loaded objects ----------------------------------------------------------------------------------

    @property
    def sae(self) -> Any:
        spec = self.sae_spec
        return self._guard(
            lambda: self._cache.sae(self._sae_key(), lambda: loading.load_sae(spec, self.device, self.dtype))
        )

    @property
    def model(self) -> Any:
        spec = self.model_spec
        return self._guard(
            lambda: self._cache.model(
                self._model_key(), lambda: loading.load_model(spec, self.device, self.dtype)
            )
        )

    @property
    def tokens(self) -> Any:
        source, context_size = self.token_source, self.context_size

        def load() -> Any:
            sae = self.sae if self.settings.sae is not None else None
            return loading.load_tokens(
                source, self.model, sae, self.settings.n_tokens, context_size, self.settings.seed
            )

        return self._guard(lambda: self._cache.tokens(self._tokens_key(), load))

    @property
    def evaluation(self) -> Evaluation:
        """The engine's :class:`~pytest_saecheck.engine.Evaluation`, computed once per run for this subject."""

        def compute() -> Evaluation:
            from pytest_saecheck.engine import evaluate

            return evaluate(
                self.model,
                self.sae,
                self.tokens,
                batch_size=self.settings.batch_size,
                exclude_bos=self.settings.exclude_bos,
                scaling_law=self.settings.scaling_law,
            )

        evaluation = self._guard(lambda: self._cache.evaluation(self.evaluation_key(), compute))
        if not self._evaluation_recorded:
            self._evaluation_recorded = True
            records.record(self._evaluation_record(evaluation), self._item)
        return evaluation

    @property
    def metrics(self) -> dict[str, float]:
        return self.evaluation.metrics

    # -- helpers -----------------------------------------------------------------------------------------

    def subject(self) -> dict[str, Any]:
        """Plain description of what is under test (goes on every record)."""
        return {
            "label": self.label,
            "model": self.settings.model,
            "sae": self.settings.sae,
            "tokens": self.settings.tokens,
            "device": self.device,
            "dtype": self.dtype,
        }

    def _evaluation_record(self, evaluation: Evaluation) -> dict[str, Any]:
        data = evaluation.to_dict()
        density = data.pop("latent_density", None)
        data.pop("device", None)  # the subject's device names the same thing
        return {
            "kind": "evaluation",
            **self.subject(),
            "resolved_model": self.model_spec,
            "resolved_tokens": self.token_source,
            "settings": self.settings.to_dict(),
            **data,
            "latent_density_histogram": _density_histogram(density),
            "interval_level": INTERVAL_LEVEL,
            "intervals": _intervals(evaluation),
        }

    def _guard(self, load: Any) -> Any:
        try:
            with _dependency_warnings_hidden():
                return load()
        except loading.WeightsUnavailableError as error:
            if self.settings.unavailable == "skip":
                _skip(str(error))
            raise

    def __repr__(self) -> str:
        return f"<SAECheck {self.label} on {self.device}>"


#: Modules whose deprecation warnings (SAE Lens importing TransformerLens' deprecated ``utils``, the plugin calling
#: a deprecated API) are hidden while the plugin loads and evaluates: the user can do nothing about them.
DEPENDENCY_MODULES = r"(sae_lens|transformer_lens|pytest_saecheck)(\..*)?$"


@contextlib.contextmanager
def _dependency_warnings_hidden() -> Iterator[None]:
    """Hide deprecation warnings raised from SAE Lens, TransformerLens and plugin code while the plugin calls them.

    Only around the plugin's own loading and evaluation: the user's code, and other warnings, are untouched.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=DEPENDENCY_MODULES)
        yield


def _intervals(evaluation: Evaluation) -> dict[str, list[float]]:
    """95% bootstrap intervals of every metric that has one, from one set of resamples (cached)."""
    try:
        intervals = evaluation.confidence_intervals(INTERVAL_LEVEL)
    except SAECheckError:  # e.g. a single sequence: no interval
        return {}
    return {name: [float(low), float(high)] for name, (low, high) in intervals.items()}


def _density_histogram(density: Any) -> Any:
    """The report's histogram of latent firing densities (small), rather than one number per latent."""
    if density is None:
        return None
    try:
        from pytest_saecheck.report.collect import latent_density_histogram
    except ImportError:  # pragma: no cover - the report package ships with the plugin
        return None
    return latent_density_histogram(list(density))


def _skip(message: str) -> NoReturn:
    __tracebackhide__ = True
    pytest.skip(f"saecheck: {message} (to make this an error instead, set --saecheck-unavailable=error)")


@pytest.fixture
def saecheck_settings(request: pytest.FixtureRequest) -> SAECheckSettings:
    """The resolved saecheck settings of this test (marker > command line > ini > default)."""
    return resolve_for_item(request.node)


@pytest.fixture
def saecheck_device(saecheck_settings: SAECheckSettings) -> str:
    """Device for model and SAE: the ``device`` setting, else CUDA when available, else CPU. Override freely."""
    return saecheck_settings.device or auto_device()


@pytest.fixture
def saecheck(
    request: pytest.FixtureRequest, saecheck_settings: SAECheckSettings, saecheck_device: str
) -> SAECheck:
    """The SAE under test with its model, tokens and evaluation (computed once, shared across tests)."""
    bundle = SAECheck(saecheck_settings, str(saecheck_device), session_cache(request.config), request.node)
    records.record({"kind": "subject", **bundle.subject()}, request.node)
    return bundle


@pytest.fixture
def saecheck_sae(saecheck: SAECheck) -> Any:
    """The SAE under test (an SAE Lens ``SAE``), from the session cache."""
    return saecheck.sae


@pytest.fixture
def saecheck_model(saecheck: SAECheck) -> Any:
    """The model under test (a TransformerLens ``HookedTransformer``), from the session cache."""
    return saecheck.model


@pytest.fixture
def saecheck_tokens(saecheck: SAECheck) -> Any:
    """The evaluation tokens, a LongTensor ``[n_sequences, context_size]`` with BOS at position 0."""
    return saecheck.tokens
