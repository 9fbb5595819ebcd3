"""The saecheck fixtures and the :class:`SAECheck` bundle they hand to tests.

``saecheck`` is lazy: the SAE, the model and the tokens are loaded the first time something needs them, and
the evaluation is computed once per (model, SAE, tokens, token policy, batch size) for the whole run. A test
whose evaluation is already cached loads no model at all. Imports no torch at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import time
import warnings
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_saecheck import loading, records
from pytest_saecheck.checks import baselines
from pytest_saecheck.checks.workflow import SAEUnderTest
from pytest_saecheck.defaults import DEFAULT_CONTEXT_SIZE, INTERVAL_LEVEL
from pytest_saecheck.devices import auto_device
from pytest_saecheck.errors import ConfigError, SAECheckError, SAECheckWarning, WeightsUnavailableError
from pytest_saecheck.naming import joined
from pytest_saecheck.plugin.session_cache import SessionCache
from pytest_saecheck.plugin.settings import (
    FrozenKwargs,
    SAECheckSettings,
    release_group_key,
    resolve_for_item,
    saecheck_items,
)
from pytest_saecheck.scaling import model_default_law

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from pytest_saecheck.engine import Evaluation
    from pytest_saecheck.engine.growth import Growth
    from pytest_saecheck.scaling import ScalingLaw
    from pytest_saecheck.sequential import GateDecision

CACHE_KEY = pytest.StashKey[SessionCache]()


def session_cache(config: pytest.Config) -> SessionCache:
    """The run's :class:`SessionCache` (created on first use)."""
    cache = config.stash.get(CACHE_KEY, None)
    if cache is None:
        cache = config.stash[CACHE_KEY] = SessionCache()
    return cache


@dataclasses.dataclass(frozen=True)
class ResolvedSpecs:
    """What one test's settings leave to the SAE's config, read once.

    Built by :func:`resolve_specs` at most once per settings in a run (kept by the session cache), so that
    computing a cache key never loads (or downloads) an SAE again, even after the SAE was dropped from the
    cache. ``model`` and ``tokens`` are ``None`` when they cannot be resolved; ``model_problem`` and
    ``tokens_problem`` then say why (raised as :class:`ConfigError` by the property that needs them).
    """

    model: str | None
    tokens: str | None
    context_size: int
    prepend_bos: bool
    model_from_pretrained_kwargs: FrozenKwargs
    activation_scalers: tuple[tuple[str, float | str | None], ...]
    model_problem: str | None = None
    tokens_problem: str | None = None
    recorded_hook: str | None = None
    """The first dictionary's own hook record (``hook_name``); ``None`` for a cross-layer transcoder or when no SAE
    is configured."""
    recorded_backend: tuple[str, str] | None = None
    """``(backend, why)`` the first dictionary's own record asks for (:func:`pytest_saecheck.hookpoints.
    choose_backend`); ``None`` for a cross-layer transcoder or when no SAE is configured."""


def _activation_scaler(settings: SAECheckSettings, spec: str) -> float | str | None:
    """The ``activation_scaler`` setting; with ``auto``, the checkpoint directory when it holds
    ``activation_scaler.json`` (else None: the engine estimates a factor if the SAE needs one)."""
    if settings.activation_scaler is not None:
        return settings.activation_scaler
    from pytest_saecheck.normalisation import ACTIVATION_SCALER_FILENAME

    path = loading.local_path(spec)
    if path is not None and (path / ACTIVATION_SCALER_FILENAME).is_file():
        return str(path)
    return None


_NO_SAE = (
    "no SAE is configured for this test; add @pytest.mark.saecheck(sae=...) to the test, class or "
    "module (pytestmark), or pass --saecheck-sae / set the ini key saecheck_sae"
)
_NO_MODEL = (
    "no model is configured for this test; add @pytest.mark.saecheck(model=...) (or sae=..., whose "
    "config names its model), or pass --saecheck-model / set the ini key saecheck_model"
)


def resolve_specs(
    settings: SAECheckSettings, sae_specs: tuple[str, ...], load_sae: Callable[[str], Any]
) -> ResolvedSpecs:
    """The :class:`ResolvedSpecs` of ``settings``: ``sae_specs`` are its SAE specs (empty when it names none);
    ``load_sae(spec)`` is called at most once, for the first SAE, and only when one is configured.

    Raises what ``load_sae`` raises (:class:`~pytest_saecheck.errors.LoadError`,
    :class:`~pytest_saecheck.errors.WeightsUnavailableError`).
    """
    first = sae_specs[0] if sae_specs else None
    sae = load_sae(first) if first is not None else None
    model, model_problem = settings.model, None
    if model is None and first is None:
        model_problem = _NO_MODEL
    elif model is None and first is not None:
        try:
            model = loading.default_model_spec(first, sae)
        except ConfigError as error:
            model_problem = str(error)
    tokens, tokens_problem = settings.tokens, None
    if tokens is None and first is not None:
        try:
            tokens = loading.default_token_source(first, sae)
        except ConfigError as error:
            tokens_problem = str(error)
    if settings.context_size is not None:
        context_size = settings.context_size
    else:
        context_size = DEFAULT_CONTEXT_SIZE if sae is None else loading.default_context_size(None, sae)
    kwargs = settings.model_from_pretrained_kwargs
    if kwargs is None:
        from_sae = loading.sae_metadata(sae, "model_from_pretrained_kwargs") if sae is not None else None
        kwargs = FrozenKwargs(loading.artefact_model_kwargs(from_sae, f"the SAE {first!r}"))
    return ResolvedSpecs(
        model=model,
        tokens=tokens,
        context_size=context_size,
        prepend_bos=loading.prepend_bos(sae) if sae is not None else True,
        model_from_pretrained_kwargs=kwargs,
        activation_scalers=tuple((spec, _activation_scaler(settings, spec)) for spec in sae_specs),
        model_problem=model_problem,
        tokens_problem=tokens_problem,
        recorded_hook=(
            (str(loading.sae_metadata(sae, "hook_name") or "") or None)
            if sae is not None and _is_module(sae)
            else None
        ),
        recorded_backend=(_recorded_backend(sae, model) if sae is not None and _is_module(sae) else None),
    )


def _recorded_backend(sae: Any, model: str | None) -> tuple[str, str]:
    """``(backend, why)`` the dictionary's own hook record asks for, on the architecture of ``model`` when its
    config is on this machine (read from the file; nothing is fetched)."""
    from pytest_saecheck.dictionaries import describe
    from pytest_saecheck.hookpoints import HookRecord, choose_backend

    choice = choose_backend(
        HookRecord.of(sae), transcoder=describe(sae).is_transcoder, architecture=_architecture(model)
    )
    return choice.backend, choice.reason


def _architecture(model: str | None) -> str | None:
    """``config.architectures[0]`` of ``model`` (a local directory, or a hub id in the local cache), else None."""
    if model is None:
        return None
    import json

    path = loading.local_path(model)
    config: Any = path / "config.json" if path is not None else None
    if config is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            config = try_to_load_from_cache(model, "config.json")
        except (ValueError, OSError):  # not a hub id (huggingface_hub's HFValidationError is a ValueError)
            return None
    try:
        architectures = json.loads(Path(str(config)).read_text()).get("architectures") or [None]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return str(architectures[0]) if architectures[0] else None


class SAECheck(SAEUnderTest):
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
        self._specs: ResolvedSpecs | None = None

    @property
    def item(self) -> pytest.Item | None:
        """The test this fixture was made for."""
        return self._item

    # -- specs -------------------------------------------------------------------------------------------

    @property
    def sae_specs(self) -> tuple[str, ...]:
        """Every SAE under test: one, or several spliced jointly (``sae=[...]`` with ``splice="joint"``)."""
        sae = self.settings.sae
        if sae is None:
            raise ConfigError(_NO_SAE)
        specs = sae if isinstance(sae, tuple) else (sae,)
        if len(specs) > 1 and self.settings.splice != "joint":
            raise ConfigError(
                f'sae= names {len(specs)} SAEs but splice is {self.settings.splice!r}: add splice="joint" to '
                "splice them all at once, or test them one by one with pytest.mark.parametrize and saecheck_param"
            )
        repeated = sorted({spec for spec in specs if specs.count(spec) > 1})
        if repeated:
            raise ConfigError(
                f"sae= lists {', '.join(map(repr, repeated))} more than once; a joint splice puts each SAE in the "
                "model once: list distinct SAEs"
            )
        if len(specs) < 2 and self.settings.splice == "joint":
            raise ConfigError(
                'splice="joint" needs several SAEs: give sae=["release/id-a", "release/id-b", ...]'
            )
        return specs

    @property
    def joint(self) -> bool:
        return len(self.sae_specs) > 1

    @property
    def sae_spec(self) -> str:
        specs = self.sae_specs
        if len(specs) > 1:
            raise ConfigError(
                f"this test splices {len(specs)} SAEs jointly; use saecheck.saes (a dict spec → SAE) instead of "
                "saecheck.sae"
            )
        return specs[0]

    @property
    def specs(self) -> ResolvedSpecs:
        """The specs resolved once for these settings in this run (see :class:`ResolvedSpecs`)."""
        if self._specs is None:
            sae_specs = self.sae_specs if self.settings.sae is not None else ()
            self._specs = self._guard(
                lambda: self._cache.resolved_specs(
                    self.settings, lambda: resolve_specs(self.settings, sae_specs, self._load_sae)
                )
            )
        return self._specs

    @property
    def model_spec(self) -> str:
        if self.settings.model is not None:  # given: no need to read the SAE's config
            return self.settings.model
        specs = self.specs
        if specs.model is None:
            raise ConfigError(specs.model_problem or _NO_MODEL)
        return specs.model

    @property
    def token_source(self) -> str:
        if self.settings.tokens is not None:
            return self.settings.tokens
        specs = self.specs
        if specs.tokens is None:
            raise ConfigError(specs.tokens_problem or _NO_SAE)
        return specs.tokens

    @property
    def context_size(self) -> int:
        return self.specs.context_size

    @property
    def scaling_law(self) -> ScalingLaw | None:
        """The law of ``compute_fraction``: the ``scaling_law`` setting; left at its default, the law a plug-in
        names for the model (:func:`pytest_saecheck.scaling.model_default_law`: the demo family's on the demo)."""
        if self.settings.sources.get("scaling_law") == "default":
            law = model_default_law(self.model_spec)
            if law is not None:
                return law
        return self.settings.scaling_law

    @property
    def activation_scaler(self) -> float | str | None:
        """The ``activation_scaler`` setting; with ``auto``, the checkpoint directory when it holds
        ``activation_scaler.json`` (else None: the engine estimates a factor if the SAE needs one)."""
        return self._activation_scaler_for(self.sae_spec)

    def _activation_scaler_for(self, spec: str) -> float | str | None:
        """The resolved scaler of one of this test's SAEs, or of a release-group sibling's ``spec``."""
        own = dict(self.specs.activation_scalers)
        return own[spec] if spec in own else _activation_scaler(self.settings, spec)

    @property
    def label(self) -> str:
        """A short readable name: the SAE spec (and the model, when it was given explicitly)."""
        written = self.settings.written  # a relative path as written, not the absolute path it names
        sae = written.get("sae") or joined(self.settings.sae) or "(no SAE)"
        if self.settings.splice == "joint":
            sae += " (joint)"
        model = written.get("model", self.settings.model)
        return sae if model is None else f"{sae} @ {model}"

    @property
    def model_from_pretrained_kwargs(self) -> dict[str, Any]:
        """The model's loading kwargs: the ``model_from_pretrained_kwargs`` setting, else the SAE config's, else
        {}; with ``n_devices`` from the ``n_devices`` setting when it is given."""
        kwargs = dict(self.specs.model_from_pretrained_kwargs)
        if self.settings.n_devices is not None:
            kwargs["n_devices"] = self.settings.n_devices
        return kwargs

    # -- cache keys --------------------------------------------------------------------------------------

    def _model_key(self) -> Hashable:
        """What determines the model as loaded (equivalent kwargs give one key: one model for both)."""
        kwargs = loading.equivalent_load_kwargs(self.model_from_pretrained_kwargs, self.dtype)
        return (
            self.model_spec,
            self.device,
            FrozenKwargs(kwargs),
            self.backend,
            self.settings.device_map,
            self.settings.max_memory,
        )

    @property
    def backend(self) -> str:
        """The model backend (:attr:`backend_choice`'s)."""
        return self.backend_choice[0]

    @property
    def backend_choice(self) -> tuple[str, str]:
        """``(backend, why)``: the ``backend`` setting; with ``auto``, ``hf`` when a ``device_map`` is set, when the
        SAE's record names a module path, or a tensor a ``HookedTransformer`` has no faithful point at
        (:func:`pytest_saecheck.hookpoints.choose_backend`: Gemma Scope 2 transcoders read a norm's output with
        its gain), else ``transformer_lens``."""
        if self.settings.backend != "auto":
            return self.settings.backend, "set by the backend setting"
        if self.settings.device_map is not None:
            return "hf", "device_map is set"
        if self.settings.sae is None:
            return "transformer_lens", "the default"
        if self.settings.hook_name is not None:
            hook = self.settings.hook_name
            if hook.startswith(("blocks.", "hook_")):
                return "transformer_lens", f"the hook_name setting {hook!r} is a TransformerLens hook"
            return "hf", f"the hook_name setting {hook!r} is a module path"
        recorded = self.specs.recorded_backend
        if recorded is None:  # a cross-layer transcoder records TransformerLens hooks
            return "transformer_lens", "a cross-layer transcoder's record names TransformerLens hooks"
        return recorded

    def _sae_key(self, spec: str | None = None) -> Hashable:
        return (
            spec or self.sae_specs,
            self.device,
            self.dtype,
            self.settings.hook_name,
            self.settings.hook_name_override,
        )

    def _tokens_key(self) -> Hashable:
        return (
            self.token_source,
            self.model_spec,
            self.settings.n_tokens,
            self.context_size,
            self.settings.seed,
            self.specs.prepend_bos,
        )

    def evaluation_key(self) -> Hashable:
        return (
            self._model_key(),
            self._sae_key(),
            self._tokens_key(),
            self.settings.batch_size,
            self.settings.exclude_bos,
            self.settings.exclude_special_tokens,
            self.settings.exclude_token_ids,
            self.specs.activation_scalers,
            self.settings.splice,
            self.settings.token_groups,
        )

    # -- loaded objects ----------------------------------------------------------------------------------

    @property
    def sae(self) -> SAE:
        """The SAE under test (an SAE Lens ``SAE``); ``saes`` when several are spliced jointly."""
        return self._load_sae(self.sae_spec)

    @property
    def saes(self) -> dict[str, SAE]:
        """Every SAE under test, ``resolved spec → SAE`` (a local directory by its absolute path; one entry unless
        ``splice="joint"``)."""
        return {spec: self._load_sae(spec) for spec in self.sae_specs}

    def _load_sae(self, spec: str) -> Any:
        return self._guard(
            lambda: self._cache.sae(
                self._sae_key(spec),
                lambda: loading.load_sae(
                    spec,
                    self.device,
                    self.dtype,
                    self.settings.hook_name,
                    hook_name_override=self.settings.hook_name_override,
                ),
            )
        )

    @property
    def model(self) -> HookedTransformer:
        spec = self.model_spec
        key = self._model_key()

        def load() -> Any:
            backend, why = self.backend_choice
            model, how = loading.load_model_recorded(
                spec,
                self.device,
                self.dtype,
                self.model_from_pretrained_kwargs,
                backend=backend,
                device_map=self.settings.device_map,
                max_memory=self.settings.max_memory,
            )
            self._cache.model_loads[key] = dataclasses.replace(how, backend=(backend, why))
            if backend != "transformer_lens":  # the default needs no line; a Hugging Face model says why
                self._say(f"saecheck: {self.label}: the {backend} backend ({why})")
            return model

        return self._guard(lambda: self._cache.model(key, load))

    @property
    def model_loading(self) -> loading.ModelLoad | None:
        """How this test's model was loaded in this run (loader and kwargs), or None if it was not loaded."""
        return self._cache.model_loads.get(self._model_key())

    @property
    def tokens(self) -> Any:
        source, context_size = self.token_source, self.context_size

        def load() -> Any:
            from pytest_saecheck.loading import chat

            sae = self._load_sae(self.sae_specs[0]) if self.settings.sae is not None else None
            tokens = loading.load_tokens(
                source, self.model, sae, self.settings.n_tokens, context_size, self.settings.seed
            )
            self._cache.chat_templates[self._chat_template_key()] = chat.template_summary(
                tokens, loading.usable_tokenizer(self.model), self._token_policy().kept_mask(tokens)
            )
            return tokens

        return self._guard(lambda: self._cache.tokens(self._tokens_key(), load))

    def _chat_template_key(self) -> Hashable:
        """The token set and the policy settings a chat-template summary counts positions under."""
        settings = self.settings
        policy = (settings.exclude_bos, settings.exclude_special_tokens, tuple(settings.exclude_token_ids))
        return (self._tokens_key(), policy)

    def _token_policy(self) -> Any:
        """The token policy of this test's settings, resolved for its model (the one ``evaluate`` applies)."""
        from pytest_saecheck.policy import TokenPolicy

        return TokenPolicy(
            self.settings.exclude_bos,
            self.settings.exclude_special_tokens,
            tuple(self.settings.exclude_token_ids),
        ).resolved_for(self.model)

    @property
    def evaluation(self) -> Evaluation:
        """The engine's :class:`~pytest_saecheck.engine.Evaluation`, computed once per run for this subject.

        With ``splice="joint"`` it is the joint evaluation (every SAE spliced at once). SAEs of the run that share
        model, tokens and settings are evaluated together in one pass the first time any of them is needed
        (:func:`plan_release_groups`), in passes that fit the ``release_group_mib`` memory budget.
        """

        def compute() -> Evaluation:
            self.token_source  # noqa: B018 - a gate without tokens says so before any model is loaded
            if self.joint:
                return self._evaluate(self.saes, joint=True).joint
            growth = self.growth()
            if growth is not None:  # sequential: whoever reads the evaluation itself reads the ceiling's
                return growth.ceiling()
            return self._evaluate_with_release_group()

        # The key leaves out the scaling law, which changes only compute_fraction: derived from the same pass.
        from pytest_saecheck.engine.finish import under_law

        key = self.evaluation_key()
        evaluation = self._guard(lambda: self._cache.evaluation(key, compute))
        evaluation = self._cache.derived(
            (key, self.scaling_law), lambda: under_law(evaluation, self.scaling_law)
        )
        for message in self._cache.pending_warnings.pop(key, ()):
            # a release pass computed this SAE during another SAE's test: its warnings show under its own test
            warnings.warn(message, SAECheckWarning, stacklevel=2)
        if not self._evaluation_recorded:
            self._evaluation_recorded = True
            records.record(self._evaluation_record(evaluation), self._item)
        return evaluation

    def growth(self) -> Growth | None:
        """With the ``sequential`` setting, this SAE's growing evaluation (one per SAE and run, shared by its tests);
        None otherwise, and for a joint splice (decided at the ceiling). Members of a release grow one by one."""
        if not self.settings.sequential or self.joint:
            return None

        def make() -> Growth:
            from pytest_saecheck.engine.growth import Growth, plan_for

            plan = plan_for(int(self.tokens.shape[0]), self.settings.batch_size)
            if _is_module(self.sae):  # one stream: each look runs only the batches beyond the last one
                stream = self._evaluate({self.sae_spec: self.sae}, stream=True)
                return Growth(stream.to, plan, merges=True)
            return Growth(lambda n: self._evaluate({self.sae_spec: self.sae}, n_sequences=n), plan)

        growth: Growth = self._guard(lambda: self._cache.evaluation(("growth", self.evaluation_key()), make))
        return growth

    def decide_sequential(
        self, metric: str, low: float | None, high: float | None, confidence: float | None, label: str
    ) -> tuple[Evaluation, GateDecision] | None:
        """Grow this SAE's sequential evaluation until the gate is decided (None without the setting)."""
        growth = self.growth()
        if growth is None:
            return None
        evaluation, decision = self._guard(lambda: growth.decide(metric, low, high, confidence, label))
        if not self._evaluation_recorded:
            self._evaluation_recorded = True
            records.record(self._evaluation_record(evaluation), self._item)
        return evaluation, decision

    def _evaluate(
        self,
        saes: dict[str, Any],
        *,
        joint: bool = False,
        n_sequences: int | None = None,
        progress: str | None = None,
        stream: bool = False,
        planned: bool = False,
    ) -> Any:
        """The engine on these SAEs; on the first ``n_sequences`` sequences of the tokens when given; ``progress``
        (where the pass stands in its release) leads the line announcing the pass; with ``stream``, the
        :class:`~pytest_saecheck.engine.run.Stream` that evaluates them on demand. ``planned``: a pass of a release
        the plan lists (its time is what the plan estimates; ``plugin.rates``)."""
        from pytest_saecheck.engine import evaluate
        from pytest_saecheck.engine.run import open_stream

        self._cache.loads["pass"] = self._cache.loads.get("pass", 0) + 1
        single = len(saes) == 1 and not joint
        for sae in saes.values():
            if not _is_module(sae):  # a cross-layer transcoder: its weights within this test's budget
                sae.set_weight_budget(self.settings.weight_budget_mib * 2**20)
        scalers = {spec: self._activation_scaler_for(spec) for spec in saes}
        tokens = self.tokens if n_sequences is None else self.tokens[:n_sequences]
        grouping = None
        if self.settings.token_groups is not None:
            from pytest_saecheck.groups import resolve

            kept = self._token_policy().kept_mask(tokens)
            grouping = resolve(self.settings.token_groups, self.model, tokens, kept)
        # the cost model describes SAEs and transcoders; a cross-layer transcoder's pass is not announced
        modules = all(_is_module(sae) for sae in saes.values())
        cost = self._announce_pass(list(saes.values()), tokens, progress) if modules else None
        started = time.perf_counter()
        result = (open_stream if stream else evaluate)(
            self.model,
            next(iter(saes.values())) if single else saes,
            tokens,
            batch_size=self.settings.batch_size,
            exclude_bos=self.settings.exclude_bos,
            exclude_special_tokens=self.settings.exclude_special_tokens,
            exclude_token_ids=self.settings.exclude_token_ids,
            activation_scaler=next(iter(scalers.values())) if single else scalers,
            scaling_law=self.scaling_law,
            joint=joint,
            token_groups=grouping,
            backend=self.backend,
        )
        if cost is not None and not stream:  # a stream has not run yet: no rate to measure
            self._cache.clock.add(cost.flops, time.perf_counter() - started, self.device, planned=planned)
        return result

    def _announce_pass(self, saes: list[Any], tokens: Any, progress: str | None = None) -> Any:
        """Say what the pass will evaluate before it starts (tokens, SAEs, memory, time at the rate of the
        previous pass of this run), on the terminal unless -q; return its cost (``engine.cost``)."""
        from pytest_saecheck.engine import cost as cost_model

        model_shape, sae_shapes = cost_model.shapes_of(self.model, saes)
        n_sequences, seq_len = (int(v) for v in tokens.shape)
        cost = cost_model.pass_cost(
            model_shape, sae_shapes, n_sequences * seq_len, seq_len, self.settings.batch_size
        )
        rate = self._cache.clock.flops_per_second or self._cache.recorded_rate
        line = cost_model.describe_pass(cost, len(saes), n_sequences * seq_len, n_sequences, rate, progress)
        self._say(line)
        return cost

    def _say(self, line: str) -> None:
        """One line on the terminal, unless -q (or outside a test); pytest's output capture is suspended for it
        (as ``capsys.disabled()`` does), so the line shows while the test runs, not only under ``-s``."""
        config = self._item.config if self._item is not None else None
        reporter = config.pluginmanager.get_plugin("terminalreporter") if config is not None else None
        if reporter is None or config is None or config.get_verbosity() < 0:
            return
        capture = config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line(line)

    def _evaluate_with_release_group(self) -> Evaluation:
        """This SAE's evaluation, computed in one pass with the not yet evaluated SAEs of its release pass
        (:meth:`_release_passes`: the release cut into passes by the cost model)."""
        if not _is_module(self.sae):
            # a cross-layer transcoder reads its weights per layer: a replacement model is a pass of its own
            return self._evaluate({self.sae_spec: self.sae})
        group = [self]
        passes = self._release_passes()
        refusal = self._cache.release_refusals.get((self._release_key(), self.sae_spec))
        if refusal is not None:
            raise ConfigError(f"the SAE {self.sae_spec!r} {refusal}")
        members = next((p for p in passes if self.sae_spec in p), ())
        for spec in members:
            if spec == self.sae_spec:
                continue
            sibling = self._sibling(spec)
            try:
                if not self._cache.has_evaluation(sibling.evaluation_key()):
                    group.append(sibling)
            except (SAECheckError, pytest.skip.Exception):
                continue  # that SAE's own test reports the problem
        self._cache.pass_log.append(tuple(member.sae_spec for member in group))
        progress = self._release_progress(passes, members, len(group))
        planned = bool(passes)
        if len(group) == 1:
            return self._evaluate({self.sae_spec: self.sae}, progress=progress, planned=planned)
        try:
            with warnings.catch_warnings():
                # each SAE's warnings are shown under its own test (below, and when its test reads it); each
                # SAE's weights are loaded here, when its pass starts (the session cache keeps the last few)
                warnings.simplefilter("ignore", SAECheckWarning)
                result = self._evaluate(
                    {member.sae_spec: member.sae for member in group}, progress=progress, planned=planned
                )
        except SAECheckError:
            # one SAE of the group cannot be evaluated: each SAE's own test reports its own problem
            return self._evaluate({self.sae_spec: self.sae}, planned=planned)
        for member in group[1:]:
            key = member.evaluation_key()
            self._cache.evaluation(key, functools.partial(operator.getitem, result, member.sae_spec))
            self._cache.pending_warnings[key] = list(result[member.sae_spec].warnings)
        for message in result[self.sae_spec].warnings:
            warnings.warn(message, SAECheckWarning, stacklevel=2)
        return result[self.sae_spec]

    def _release_progress(
        self, passes: list[tuple[str, ...]], members: tuple[str, ...], n_saes: int
    ) -> str | None:
        """Where the pass of ``n_saes`` SAEs (of the planned pass ``members``) stands in its release: ``release
        pass k/K, SAEs done/total``, counted over this run's passes of the release; None outside a release of
        several passes."""
        if len(passes) < 2 or members not in passes:
            return None
        key = self._release_key()
        done = self._cache.release_done.get(key, 0)
        self._cache.release_done[key] = done + n_saes
        total = sum(map(len, passes))
        return f"release pass {passes.index(members) + 1}/{len(passes)}, SAEs {done}/{total} done before it"

    def _sibling(self, spec: str) -> SAECheck:
        """The bundle of another SAE of this test's release (the same settings but the SAE)."""
        return SAECheck(dataclasses.replace(self.settings, sae=spec), self.device, self._cache)

    def _release_key(self) -> Hashable:
        """The release this SAE's passes are planned in: its settings but the SAE, model and tokens as loaded."""
        return (release_group_key(self.settings), self._model_key(), self._tokens_key())

    def _release_passes(self) -> list[tuple[str, ...]]:
        """The passes of this SAE's release (planned SAEs evaluated with this model and these tokens), sized once
        per run by the cost model (:func:`pytest_saecheck.engine.cost.memory_groups`) within the memory budget
        (:func:`pytest_saecheck.plugin.schedule.budget_bytes`); each SAE's shape is read from its config, and
        only an SAE without a readable config is loaded for it. An SAE too big for the budget even alone is
        left out, its reason kept for its own test. ``[]`` outside a planned release."""
        release = release_group(self._cache, self.settings)
        key = self._release_key()
        if self.sae_spec not in release or self.settings.release_group_mib == 0:
            return []
        found = self._cache.release_passes.get(key)
        if found is not None:
            return found
        from pytest_saecheck.engine import cost
        from pytest_saecheck.plugin import schedule

        model = cost.shapes_of(self.model, [])[0]
        n_sequences, seq_len = (int(v) for v in self.tokens.shape)
        n_tokens, batch_size = n_sequences * seq_len, self.settings.batch_size
        budget = schedule.budget_bytes(self.settings, self.device, model.weight_bytes)
        specs, shapes = [], []
        for spec in release:
            sibling = self if spec == self.sae_spec else self._sibling(spec)
            try:
                if (sibling._model_key(), sibling._tokens_key()) != (self._model_key(), self._tokens_key()):
                    continue
                shape = schedule.sae_config_shape(spec, model, self.dtype)
                if shape is None:  # no config readable without the weights: its shape from the loaded SAE
                    if not _is_module(sibling.sae):
                        continue  # a cross-layer transcoder is a pass of its own
                    shape = cost.shapes_of(self.model, [sibling.sae])[1][0]
            except (SAECheckError, pytest.skip.Exception):
                continue  # that SAE's own test reports the problem
            refusal = (
                None if budget is None else cost.too_big(model, shape, n_tokens, seq_len, batch_size, budget)
            )
            if refusal is not None:
                self._cache.release_refusals[(key, spec)] = refusal
                continue
            specs.append(spec)
            shapes.append(shape)
        groups = cost.memory_groups(
            model, shapes, n_tokens, seq_len, batch_size, budget or 2**62, self._cache.max_evaluations // 2
        )
        passes = [tuple(specs[i] for i in group) for group in groups]
        self._cache.release_passes[key] = passes
        return passes

    @property
    def metrics(self) -> dict[str, float]:
        return self.evaluation.metrics

    # -- helpers -----------------------------------------------------------------------------------------

    def subject(self) -> dict[str, Any]:
        """Plain description of what is under test (goes on every record)."""
        written = self.settings.written  # as given; a relative path's absolute form is in resolved_*
        return {
            "label": self.label,
            "model": written.get("model", self.settings.model),
            "sae": written.get("sae") or joined(self.settings.sae),
            "tokens": written.get("tokens", self.settings.tokens),
            "device": self.device,
            "dtype": self.dtype,
        }

    def _evaluation_record(self, evaluation: Evaluation) -> records.EvaluationRecord:
        from pytest_saecheck.engine.result import interval_notes

        intervals = _intervals(evaluation)
        data = evaluation.to_dict()
        density = data.pop("latent_density", None)
        notes = interval_notes(evaluation.metrics, intervals, INTERVAL_LEVEL)
        data["warnings"] = [*data["warnings"], *(note for note in notes if note not in data["warnings"])]
        data["token_policy"] = self._with_chat_template(data.get("token_policy"))
        data["dictionary"] = self._with_saebench_weights(data.get("dictionary"))
        return records.EvaluationRecord.from_plain(
            {
                **self.subject(),
                "resolved_sae": joined(self.settings.sae),
                "resolved_model": self.model_spec,
                "model_loading": how.to_dict() if (how := self.model_loading) is not None else None,
                "resolved_tokens": self.token_source,
                "settings": {  # the law used: a plug-in's for the model when left at the default
                    **self.settings.to_dict(),
                    "scaling_law": None if (law := self.scaling_law) is None else law.spec,
                },
                **data,
                "latent_density_histogram": _density_histogram(density),
                "interval_level": INTERVAL_LEVEL,
                "intervals": intervals,
                **baselines.record_fields(self, self._item.config if self._item is not None else None),
            }
        )

    def _with_saebench_weights(self, dictionary: Any) -> Any:
        """The recorded dictionary, with SAEBench's weight-based cosine statistics (``max_cosine``) when the run
        writes SAEBench-format results (``--saecheck-saebench-json``): they cost O(d_sae² · d_in), so only then."""
        config = self._item.config if self._item is not None else None
        from pytest_saecheck.files import option_path

        if config is None or option_path(config, "saecheck_saebench_json") is None or self.joint:
            return dictionary
        if not isinstance(dictionary, dict):
            return dictionary
        from pytest_saecheck.report.saebench import max_cosine_statistics

        statistics = max_cosine_statistics(self.sae)
        return dictionary if statistics is None else {**dictionary, "max_cosine": statistics}

    def _with_chat_template(self, policy: Any) -> Any:
        """The recorded token policy, with what a chat template put in the tokens (``chat_template``) when it did
        (found when the tokens were loaded: recording needs no model, so a cached evaluation loads none)."""
        # made with this test's policy when it loaded the tokens; a test that found them loaded under another
        # policy records none rather than another policy's counts
        summary = self._cache.chat_templates.get(self._chat_template_key())
        return (
            policy
            if summary is None or not isinstance(policy, dict)
            else {**policy, "chat_template": summary}
        )

    def _guard(self, load: Any) -> Any:
        try:
            with _dependency_warnings_hidden():
                return load()
        except WeightsUnavailableError as error:
            if self.settings.unavailable == "skip":
                _skip(str(error))
            raise

    def __repr__(self) -> str:
        return f"<SAECheck {self.label} on {self.device}>"


def _is_module(sae: Any) -> bool:
    """Whether ``sae`` holds its weights as module parameters (a cross-layer transcoder reads them per layer)."""
    return callable(getattr(sae, "parameters", None))


def plan_release_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """At collection: group the single-SAE tests whose settings differ only in the SAE (one pass each group)."""
    plan: dict[Hashable, list[str]] = {}
    for _, settings in saecheck_items(items):
        if (
            not isinstance(settings.sae, str)
            or settings.splice != "separate"
            or settings.release_group_mib == 0
        ):
            continue
        specs = plan.setdefault(release_group_key(settings), [])
        if settings.sae not in specs:
            specs.append(settings.sae)
    session_cache(config).release_plan = plan


def release_group(cache: SessionCache, settings: SAECheckSettings) -> list[str]:
    """The SAE specs planned with the same settings as ``settings`` (empty outside a planned run); under
    pytest-xdist with a release cut per worker, those of the chunk of ``settings.sae``."""
    plan = cache.release_plan
    key = release_group_key(settings)
    specs = list(plan.get(key, [])) if plan else []
    chunk = cache.release_chunks.get((key, settings.sae)) if isinstance(settings.sae, str) else None
    if chunk is None:
        return specs
    return [spec for spec in specs if cache.release_chunks.get((key, spec)) == chunk]


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


def _intervals(evaluation: Evaluation) -> dict[str, tuple[float, float]]:
    """95% bootstrap intervals of every metric that has one, from one set of resamples (cached)."""
    try:
        intervals = evaluation.confidence_intervals(INTERVAL_LEVEL)
    except SAECheckError:  # e.g. a single sequence: no interval
        return {}
    return {name: (float(low), float(high)) for name, (low, high) in intervals.items()}


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
    if saecheck_settings.sae is not None:
        _ = (
            bundle.sae_specs
        )  # a list without splice="joint", or one SAE twice: an error at setup, not a failure
    records.record(records.SubjectRecord(**bundle.subject()), request.node)
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
