"""The session cache: models, SAEs, tokens and evaluations shared by the tests of one pytest run.

At most one model is held at a time. Before a different model is loaded, the previous one (and the SAEs and
token sets loaded alongside it) are dropped and memory is freed (``gc.collect`` and the accelerator's
``empty_cache``), so a file testing SAEs on three models never holds three models at once. Evaluations hold
no tensors and survive a model change (the most recent :data:`MAX_EVALUATIONS` of them). A load that failed is remembered and fails the same way
again, without a second slow download attempt.
"""

from __future__ import annotations

import gc
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from pytest_saecheck.errors import SAECheckError
from pytest_saecheck.plugin.rates import PassClock

T = TypeVar("T")

MAX_SAES = 4
MAX_TOKEN_SETS = 8
# An evaluation keeps per-sequence sums for its bootstrap intervals, [n_sequences, d_model] float64 among them
# (tens of MB for a large model), so a run over hundreds of SAEs keeps only the most recent ones.
MAX_EVALUATIONS = 32


def free_accelerator_memory() -> None:
    """Collect garbage and return cached accelerator memory to the driver (no-op when torch is not loaded)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - a broken CUDA setup must not fail the test run
        pass
    mps = getattr(torch, "mps", None)
    backend = getattr(getattr(torch, "backends", None), "mps", None)
    try:
        if mps is not None and backend is not None and backend.is_available():
            mps.empty_cache()
    except Exception:  # pragma: no cover
        pass


class SessionCache:
    """Per-run store of loaded objects; one instance lives on ``config.stash``."""

    def __init__(
        self,
        *,
        max_saes: int = MAX_SAES,
        max_token_sets: int = MAX_TOKEN_SETS,
        max_evaluations: int = MAX_EVALUATIONS,
    ) -> None:
        self.max_saes = max_saes
        self.max_token_sets = max_token_sets
        self.max_evaluations = max_evaluations
        self._model_key: Hashable | None = None
        self._model: Any = None
        self._saes: OrderedDict[Hashable, Any] = OrderedDict()
        self._tokens: OrderedDict[Hashable, Any] = OrderedDict()
        self._evaluations: OrderedDict[Hashable, Any] = OrderedDict()
        # evaluations derived from a cached one (another scaling law): no pass, not counted as an evaluation
        self._derived: OrderedDict[Hashable, Any] = OrderedDict()
        # warnings of SAEs evaluated in another SAE's release pass, shown when their own test reads them
        self.pending_warnings: dict[Hashable, list[str]] = {}
        # this run's passes (FLOPs, seconds), for the time estimate of the next pass and the record of this
        # machine's rates (plugin.rates); ``recorded_rate`` is the rate an earlier run recorded, used before the
        # first pass
        self.clock = PassClock()
        self.recorded_rate: float | None = None
        self._failures: dict[Hashable, tuple[type[SAECheckError], str]] = {}
        # how each model key was loaded (loader and kwargs), for the evaluation records; small, kept all run
        self.model_loads: dict[Hashable, Any] = {}
        # what a chat template put in each token set (loading.chat.template_summary), made when the tokens are
        # loaded so that recording it later needs no model; small, kept all run
        self.chat_templates: dict[Hashable, Any] = {}
        self.loads: dict[str, int] = {"model": 0, "sae": 0, "tokens": 0, "evaluation": 0, "pass": 0}
        # SAE specs that share every other setting, planned at collection (fixtures.plan_release_groups)
        self.release_plan: dict[Hashable, list[str]] = {}
        # under pytest-xdist, the releases the cost model cuts to balance the workers: (release key, spec) -> chunk
        self.release_chunks: dict[tuple[Hashable, str], int] = {}
        # each release's passes (specs), sized by memory when its first SAE is evaluated (fixtures._release_passes)
        self.release_passes: dict[Hashable, list[tuple[str, ...]]] = {}
        # why an SAE of a release cannot be evaluated within the memory budget even alone (engine.cost.too_big)
        self.release_refusals: dict[Hashable, str] = {}
        # the SAEs of every release pass run so far, in order (a run's progress and the tests' evidence)
        self.pass_log: list[tuple[str, ...]] = []
        # how many SAEs of each release its passes have evaluated so far (the progress line of each pass)
        self.release_done: dict[Hashable, int] = {}
        # each test's specs resolved from its settings (fixtures.ResolvedSpecs): small, kept all run
        self._resolved_specs: dict[Hashable, Any] = {}
        self.frees = 0

    # -- models -------------------------------------------------------------------------------------------

    @property
    def model_key(self) -> Hashable | None:
        return self._model_key

    def model(self, key: Hashable, load: Callable[[], T]) -> T:
        """The model for ``key``; a different key releases the held model (and its SAEs and tokens) first."""
        if key == self._model_key and self._model is not None:
            return self._model
        self._raise_remembered(("model", key))
        if self._model_key is not None:
            self.release_model()
        model = self._load(("model", key), load, "model")
        self._model_key, self._model = key, model
        return model

    def release_model(self) -> None:
        """Drop the held model, SAEs and token sets, and free their memory."""
        self._model_key = None
        self._model = None
        self._saes.clear()
        self._tokens.clear()
        free_accelerator_memory()
        self.frees += 1

    # -- SAEs, tokens, evaluations -------------------------------------------------------------------------

    def sae(self, key: Hashable, load: Callable[[], T]) -> T:
        return self._lru(self._saes, key, load, "sae", self.max_saes)

    def tokens(self, key: Hashable, load: Callable[[], T]) -> T:
        return self._lru(self._tokens, key, load, "tokens", self.max_token_sets)

    def evaluation(self, key: Hashable, compute: Callable[[], T]) -> T:
        return self._lru(self._evaluations, key, compute, "evaluation", self.max_evaluations)

    def derived(self, key: Hashable, derive: Callable[[], T]) -> T:
        """A value derived from a cached evaluation without a pass (kept like evaluations, not counted)."""
        if key in self._derived:
            self._derived.move_to_end(key)
            value: T = self._derived[key]
            return value
        value = derive()
        self._derived[key] = value
        while len(self._derived) > self.max_evaluations:
            self._derived.popitem(last=False)
        return value

    def resolved_specs(self, settings: Hashable, resolve: Callable[[], T]) -> T:
        """The specs resolved from ``settings`` (computed once per run; they hold no tensor)."""
        if settings not in self._resolved_specs:
            self._resolved_specs[settings] = resolve()
        value: T = self._resolved_specs[settings]
        return value

    def has_evaluation(self, key: Hashable) -> bool:
        return key in self._evaluations

    def clear(self) -> None:
        """Drop everything (end of the run)."""
        self._evaluations.clear()
        self._derived.clear()
        self.pending_warnings.clear()
        self._resolved_specs.clear()
        self.release_passes.clear()
        self.release_refusals.clear()
        self.release_done.clear()
        self._failures.clear()
        self.model_loads.clear()
        self.release_model()

    # -- internals -----------------------------------------------------------------------------------------

    def _lru(
        self, store: OrderedDict[Hashable, Any], key: Hashable, load: Callable[[], T], kind: str, size: int
    ) -> T:
        if key in store:
            store.move_to_end(key)
            return store[key]
        self._raise_remembered((kind, key))
        value = self._load((kind, key), load, kind)
        store[key] = value
        while len(store) > size:
            store.popitem(last=False)
        return value

    def _load(self, failure_key: Hashable, load: Callable[[], T], kind: str) -> T:
        try:
            value = load()
        except SAECheckError as error:
            self._failures[failure_key] = (type(error), str(error))
            raise
        self.loads[kind] += 1
        return value

    def _raise_remembered(self, failure_key: Hashable) -> None:
        remembered = self._failures.get(failure_key)
        if remembered is not None:
            error_type, message = remembered
            raise error_type(message)
