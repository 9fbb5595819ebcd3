"""The Hugging Face backend: a decoder-only ``AutoModelForCausalLM`` of transformers 5 behind
:class:`~pytest_saecheck.engine.cut.ModelCut`.

Points are module points (:class:`~pytest_saecheck.hookpoints.ModulePoint`: a module's output, or its input,
by its dotted path), read with forward hooks and pre-hooks and replaced by hooks that return the replacement.

A continuation does not recompute the prefix. During the original run every decoder layer's call arguments
(the attention mask of its kind, the position embeddings, position ids, ...) are recorded by a pre-hook; a
continuation from layer ``L`` calls layers ``L, L+1, ...`` with those arguments and the replaced hidden states,
then the model's own final norm and head (:meth:`HFCut.logits`: final norm, ``lm_head``, the final logit
soft-cap of Gemma 2/3). The head is checked once against the model's own logits; a model whose head does more
is refused. A point outside the decoder layers (the embeddings) cannot be continued from a layer: there every
variant runs the whole forward with the replacement (the same numbers, slower), and the result says so.
"""

from __future__ import annotations

import contextlib
import difflib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pytest_saecheck.engine.cut import CapturedRun, Site, SiteHook, model_device, module_device
from pytest_saecheck.errors import ConfigError, HookNotFoundError, ModelStateError
from pytest_saecheck.hookpoints import ModulePoint

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
"""Names of the final norm in the base models of transformers (Llama/Qwen/Gemma: ``norm``; GPT-2: ``ln_f``;
GPT-NeoX: ``final_layer_norm``)."""

HEAD_CHECK_TOLERANCE = 1e-4
"""The largest difference, relative to the largest logit, allowed between :meth:`HFCut.logits` and the model's
own forward on the first batch (float32: a few ulps of accumulated rounding; bf16 is checked in its own
rounding, 2**-7)."""


def is_causal_lm(model: Any) -> bool:
    """True for a transformers ``PreTrainedModel`` with a language-model head (``get_output_embeddings``)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and callable(getattr(model, "get_output_embeddings", None))


@dataclass(frozen=True)
class ModuleSite:
    """A :class:`~pytest_saecheck.engine.cut.Site` at a module point of a Hugging Face model.

    ``layer``: the decoder layer the point lies in (-1 before the first); ``resid_entry``: set when the point is
    the residual stream between decoder layers (a layer's input: that layer; a layer's output: the next one;
    the final norm's input: ``n_layers``); ``resumable``: a run can be continued from a layer at this point
    (otherwise the whole forward runs with the replacement).
    """

    point: ModulePoint
    layer: int
    resid_entry: int | None
    resumable: bool = True
    head_index: int | None = None

    @property
    def hook_name(self) -> str:
        return str(self.point)

    @property
    def is_residual(self) -> bool:
        return self.resid_entry is not None

    @property
    def entry(self) -> int:
        return self.resid_entry if self.resid_entry is not None else max(self.layer, 0)

    def select(self, activation: torch.Tensor) -> torch.Tensor:
        return activation

    def write_back(self, activation: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        return replacement


@dataclass
class _Context:
    """What a continuation of one run needs: its tokens and each decoder layer's call ``(args, kwargs)`` without
    the hidden states (``None`` in their place)."""

    tokens: torch.Tensor
    layer_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


def _first(output: Any) -> torch.Tensor:
    """A module's hidden-state output: the output itself, or the first element of a tuple (decoder layers)."""
    if isinstance(output, tuple):
        return output[0]
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise ModelStateError(f"a module returned {type(output).__name__}, not hidden states")


def _replaced_output(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (value.to(output[0].device), *output[1:])
    return value.to(output.device)


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ModelStateError("a module was called without hidden states as its first argument")
    return hidden


def _with_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], value: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


_HEAD_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()
"""Models whose head :meth:`HFCut.logits` reproduces (checked once per model object in a process)."""


class HFCut:
    """:class:`~pytest_saecheck.engine.cut.ModelCut` for a decoder-only transformers ``*ForCausalLM`` model.

    ``model.tokenizer`` (set by :func:`pytest_saecheck.load_model`) is its tokenizer, when there is one.
    Raises :class:`ModelStateError` when the model has no decoder layers or final norm this backend can find.
    """

    backend = "hf"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base = model.base_model
        config = model.config
        self.config = getattr(config, "text_config", None) or config
        if hasattr(config, "get_text_config"):
            self.config = config.get_text_config()
        self.device = model_device(model)
        self.modules: dict[str, torch.nn.Module] = dict(model.named_modules())
        self.base_prefix = next(name for name, module in self.modules.items() if module is self.base)
        self.layers_path, self.layers = self._decoder_layers()
        self.n_layers = len(self.layers)
        self.final_norm_path, self.final_norm = self._final_norm()
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ModelStateError(
                f"{type(model).__name__} has no language-model head (get_output_embeddings)"
            )
        self.soft_cap: float | None = getattr(self.config, "final_logit_softcapping", None)
        self.layer_devices = [module_device(layer, self.device) for layer in self.layers]
        self._output_device = module_device(self.head, self.device)

    # --- the model's parts ----------------------------------------------------------------------------

    def _decoder_layers(self) -> tuple[str, torch.nn.ModuleList]:
        n = getattr(self.config, "num_hidden_layers", None)
        found = [
            (name, module)
            for name, module in self.modules.items()
            if isinstance(module, torch.nn.ModuleList)
            and name.startswith(self.base_prefix)
            and len(module) > 0
            and (n is None or len(module) == n)
        ]
        if not found:
            raise ModelStateError(
                f"found no list of {n} decoder layers in {type(self.model).__name__}; the Hugging Face backend "
                "takes decoder-only causal language models (model.layers / transformer.h / gpt_neox.layers)"
            )
        return min(found, key=lambda item: item[0].count("."))

    def _final_norm(self) -> tuple[str, torch.nn.Module]:
        for name in FINAL_NORM_NAMES:
            module = getattr(self.base, name, None)
            if isinstance(module, torch.nn.Module):
                prefix = f"{self.base_prefix}." if self.base_prefix else ""
                return f"{prefix}{name}", module
        raise ModelStateError(
            f"found no final norm ({', '.join(FINAL_NORM_NAMES)}) in {type(self.base).__name__}; the Hugging Face "
            "backend needs it to unembed a continued run"
        )

    # --- what the model is ----------------------------------------------------------------------------

    @property
    def d_vocab(self) -> int:
        return int(self.config.vocab_size)

    @property
    def d_vocab_out(self) -> int:
        return int(self.head.weight.shape[0])

    @property
    def n_ctx(self) -> int | None:
        value = getattr(self.config, "max_position_embeddings", None) or getattr(
            self.config, "n_positions", None
        )
        return int(value) if value else None

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.model.dtype
        return dtype

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def tokenize(self, text: str, prepend_bos: bool | None) -> list[int]:
        tokenizer = self.tokenizer
        ids: list[int] = list(tokenizer(text, add_special_tokens=prepend_bos is not False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        if prepend_bos and isinstance(bos, int) and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def check(self) -> list[str]:
        if self.model.training:
            raise ModelStateError(
                f"the {type(self.model).__name__} is in training mode (dropout on), so its runs are random; call "
                "model.eval() first"
            )
        return [
            f"{name or '(model)'} (forward hook)"
            for name, module in self.modules.items()
            if any(
                not _transformers_recorder(hook)
                for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
            )
        ]

    # --- where ----------------------------------------------------------------------------------------

    def site(self, name: Any, head_index: int | None) -> ModuleSite:
        """The site of a :class:`ModulePoint`, or of a module path (``"model.layers.3"``, relative to the base
        model as sparsify writes it: ``"layers.3"``) with an optional ``.input``/``.output`` (default: output)."""
        if head_index is not None:
            raise ConfigError(
                f"hook_head_index={head_index} selects an attention head of a TransformerLens hook; the Hugging Face "
                "backend reads whole module outputs: use backend='transformer_lens'"
            )
        point = name if isinstance(name, ModulePoint) else self._point(str(name))
        if point.path not in self.modules:
            raise self._unknown(point.path)
        return self._site(point)

    def _point(self, name: str) -> ModulePoint:
        io = "output"
        for suffix in ("input", "output"):
            if name.endswith(f".{suffix}") and name not in self.modules:
                name, io = name[: -len(suffix) - 1], suffix
        if name not in self.modules and self.base_prefix and f"{self.base_prefix}.{name}" in self.modules:
            name = f"{self.base_prefix}.{name}"
        layer = self._layer_of(name)
        return ModulePoint(name, "input" if io == "input" else "output", layer)

    def _layer_of(self, path: str) -> int | None:
        prefix = f"{self.layers_path}."
        if not path.startswith(prefix):
            return None
        return int(path[len(prefix) :].split(".")[0])

    def _site(self, point: ModulePoint) -> ModuleSite:
        layer = self._layer_of(point.path)
        if point.path == self.final_norm_path and point.io == "input":
            return ModuleSite(point, self.n_layers - 1, self.n_layers)
        if layer is None:
            return ModuleSite(point, -1, None, resumable=False)
        if point.path == f"{self.layers_path}.{layer}":
            return ModuleSite(point, layer, layer if point.io == "input" else layer + 1)
        return ModuleSite(point, layer, None)

    def _unknown(self, path: str) -> HookNotFoundError:
        paths = [name for name in self.modules if name]
        close = difflib.get_close_matches(path, paths, n=5, cutoff=0.5)
        hint = f" Nearest module paths: {', '.join(close)}." if close else ""
        return HookNotFoundError(
            f"{type(self.model).__name__} has no module {path!r}.{hint} Decoder layers are "
            f"{self.layers_path}.0 to {self.layers_path}.{self.n_layers - 1}; give a point as a module path with "
            "an optional .input/.output"
        )

    def residual_site(self, entry: int) -> ModuleSite:
        if entry >= self.n_layers:
            return self._site(ModulePoint(self.final_norm_path, "input", None))
        return self._site(ModulePoint(f"{self.layers_path}.{entry}", "input", entry))

    def norm_output_site(self, site: Site) -> Site:
        """A module point is the norm's output already (``<norm>.output``): ``site`` itself."""
        return site

    def device_at(self, site: Site) -> torch.device:
        if not self.layer_devices:
            return self.device
        return self.layer_devices[min(max(site.layer, 0), len(self.layer_devices) - 1)]

    @property
    def output_device(self) -> torch.device:
        return self._output_device

    @contextlib.contextmanager
    def prepared(self, sites: Sequence[Site]) -> Iterator[None]:
        yield

    # --- hooks ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hooks(self, hooks: Sequence[tuple[ModuleSite, SiteHook]]) -> Iterator[None]:
        handles = []
        try:
            for site, fn in hooks:
                module = self.modules[site.point.path]
                if site.point.io == "output":
                    handles.append(module.register_forward_hook(_output_hook(fn)))
                else:
                    handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run_base(self, tokens: torch.Tensor, hooks: Sequence[tuple[ModuleSite, SiteHook]]) -> torch.Tensor:
        """The final residual (the final norm's input) of one base-model run with ``hooks``."""
        final: list[torch.Tensor] = []
        with self._hooks([*hooks, (self.residual_site(self.n_layers), _keep(final))]):
            self.base(input_ids=tokens, use_cache=False)
        return final[-1]

    # --- runs -----------------------------------------------------------------------------------------

    def capture(self, tokens: torch.Tensor, sites: Sequence[Site]) -> CapturedRun:
        context = _Context(tokens)
        captured: dict[str, torch.Tensor] = {}
        order: list[str] = []

        def keep(site: ModuleSite) -> SiteHook:
            def hook(activation: torch.Tensor) -> None:
                captured[site.hook_name] = activation
                order.append(site.hook_name)

            return hook

        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # Everything but the hidden states, which a continuation replaces: holding every layer's input would
            # keep n_layers activations of the batch alive.
            if args:
                context.layer_calls.append(((None, *args[1:]), kwargs))
            else:
                context.layer_calls.append(((), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        wanted = {site.hook_name: _module_site(site) for site in sites}
        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers]
        try:
            final = self._run_base(tokens, [(site, keep(site)) for site in wanted.values()])
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in wanted if name not in captured]
        if missing:
            raise HookNotFoundError(
                f"module point {', '.join(map(repr, missing))} did not fire in a forward pass of the model: it is "
                "not on the forward path"
            )
        if self.model not in _HEAD_CHECKED:
            self._check_head(tokens[:1], final[:1])
        return CapturedRun(final, captured, order, context)

    def _check_head(self, tokens: torch.Tensor, final: torch.Tensor) -> None:
        """The model's own logits of one sequence against :meth:`logits` of its final residual."""
        own = self.model(input_ids=tokens, use_cache=False).logits.float()
        ours = self.logits(final).float().to(own.device)
        scale = max(float(own.abs().max()), 1.0)
        rounding = max(HEAD_CHECK_TOLERANCE, 4 * torch.finfo(self.dtype).eps)
        difference = float((own - ours).abs().max())
        if not difference <= rounding * scale:
            raise ModelStateError(
                f"{type(self.model).__name__}'s logits are not final norm → lm_head"
                f"{' → soft-cap' if self.soft_cap else ''} of its last hidden state (they differ by "
                f"{difference:.3g}); the Hugging Face backend cannot unembed a continued run of this model"
            )
        _HEAD_CHECKED.add(self.model)

    def continue_from(
        self, run: CapturedRun, site: Site, base: torch.Tensor, replacements: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        module_site = _module_site(site)
        context: _Context = run.context
        if not module_site.resumable:
            tokens = context.tokens[: base.shape[0], : base.shape[1]]
            return [self._run_base(tokens, [(module_site, _constant(value))]) for value in replacements]
        finals = []
        for value in replacements:
            if module_site.is_residual:
                finals.append(self._layers_from(context, module_site.entry, value))
                continue
            layer = module_site.layer
            with self._hooks([(module_site, _constant(value))]):
                hidden = self._call_layer(context, layer, base)
            finals.append(self._layers_from(context, layer + 1, hidden))
        return finals

    def _call_layer(self, context: _Context, index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = context.layer_calls[index]
        args, kwargs = _with_input(args, kwargs, hidden)
        return _first(self.layers[index](*args, **kwargs))

    def _layers_from(self, context: _Context, start: int, hidden: torch.Tensor) -> torch.Tensor:
        for index in range(start, self.n_layers):
            hidden = self._call_layer(context, index, hidden)
        return hidden

    def forward_with_hooks(
        self, tokens: torch.Tensor, hooks: Sequence[tuple[Site, SiteHook]]
    ) -> torch.Tensor:
        return self._run_base(tokens, [(_module_site(site), fn) for site, fn in hooks])

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        normalized = self.final_norm(final_resid)
        logits: torch.Tensor = self.head(normalized.to(module_device(self.head, normalized.device)))
        if self.soft_cap:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits

    def resumes(self, site: Site) -> bool:
        """Whether a run is continued from a layer at ``site`` (else the whole forward runs again)."""
        return _module_site(site).resumable


TRANSFORMERS_RECORDERS = ("transformers.utils.output_capturing",)
"""Modules of the hooks transformers 5 installs on a model's layers the first time it is asked for hidden states or
attentions (``output_hidden_states=True``): they append to a collector and return None, so they change no output."""


def _transformers_recorder(hook: Any) -> bool:
    return getattr(hook, "__module__", None) in TRANSFORMERS_RECORDERS


def _module_site(site: Site) -> ModuleSite:
    if not isinstance(site, ModuleSite):
        raise ConfigError(f"{site.hook_name!r} is not a module point of a Hugging Face model")
    return site


def _output_hook(fn: SiteHook) -> Any:
    def hook(module: Any, args: Any, output: Any) -> Any:
        value = fn(_first(output))
        return None if value is None else _replaced_output(output, value)

    return hook


def _input_hook(fn: SiteHook) -> Any:
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = fn(_input_of(args, kwargs))
        if value is None:
            return None
        return _with_input(args, kwargs, value.to(_input_of(args, kwargs).device))

    return hook


def _keep(into: list[torch.Tensor]) -> SiteHook:
    def hook(activation: torch.Tensor) -> None:
        into.append(activation)

    return hook


def _constant(value: torch.Tensor) -> SiteHook:
    return lambda activation: value


__all__ = ["FINAL_NORM_NAMES", "HFCut", "ModuleSite", "is_causal_lm"]
