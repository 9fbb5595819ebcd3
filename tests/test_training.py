"""Tests of the AuxK training-objective checks: adapter resolution, a toy implementation, and SAE Lens."""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import sys
import textwrap

import pytest
import torch
from packaging.version import Version
from torch import nn

from pytest_saecheck import running
from pytest_saecheck.errors import ConfigError, TrainingCheckError
from pytest_saecheck.training import (
    AuxLossAdapter,
    AuxLossAdapterBase,
    ResolvedAdapter,
    SAELensTopKAdapter,
    SparsifyAdapter,
    assert_aux_k_scaling,
    assert_aux_loss_zero_without_dead,
    assert_aux_residual_detached,
    assert_no_aux_bias_double_count,
    assert_training_objective,
    gao_k_aux_and_scale,
    resolve,
    resolve_training_adapter,
)

# sae-lens 6.0-6.5 warn about model_from_pretrained_kwargs when a config is built without a model
pytestmark = pytest.mark.filterwarnings(
    r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs:UserWarning"
)

ALL_CHECKS = [
    assert_no_aux_bias_double_count,
    assert_aux_residual_detached,
    assert_aux_k_scaling,
    assert_aux_loss_zero_without_dead,
]

# ==============================================================================================================
# A toy TopK SAE with an AuxK loss, and its adapter (also the README's worked example)
# ==============================================================================================================


class ToyTopKSAE(nn.Module):
    """A minimal TopK SAE; ``bug`` switches in one known AuxK mistake."""

    def __init__(self, d_in: int = 8, d_sae: int = 32, k: int = 2, *, bug: str | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(self.W_enc.detach().T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k = k
        self.bug = bug

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return z @ self.W_dec + self.b_dec

    def aux_loss(self, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        num_dead = int(dead_mask.sum())
        e = x - self(x)
        if self.bug != "no_detach":
            e = e.detach()
        if num_dead == 0:
            if self.bug == "nonzero_when_none_dead":
                return e.pow(2).sum(-1).mean()
            return x.new_zeros(())
        d = self.W_dec.shape[0] if self.bug == "k_from_d_sae" else self.W_dec.shape[1]
        k_aux = d // 2
        scale = 1.0 if self.bug == "no_scale" else min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        pre = self.pre_acts(x)
        masked = pre.masked_fill(~dead_mask, -math.inf)
        idx = masked.topk(k_aux, dim=-1).indices
        z = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
        e_hat = z @ self.W_dec
        if self.bug == "double_count":
            e_hat = e_hat + self.b_dec
        return scale * (e_hat - e).pow(2).sum(-1).mean()


class ToyAdapter(AuxLossAdapterBase):
    """Adapter for ToyTopKSAE: six methods; reduce_aux_error keeps the base default (mean squared norm)."""

    shift_invariant = True  # the encoder sees x - b_dec

    def decoder_bias(self) -> torch.Tensor:
        return self.training_sae.b_dec

    def decoder_weight(self) -> torch.Tensor:
        return self.training_sae.W_dec

    def aux_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.training_sae.pre_acts(x)

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        return self.training_sae(x)

    def aux_loss(self, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        return self.training_sae.aux_loss(x, dead_mask)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ==============================================================================================================
# Toy implementation through adapter=
# ==============================================================================================================


def test_toy_adapter_satisfies_protocol():
    assert isinstance(ToyAdapter(ToyTopKSAE()), AuxLossAdapter)


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda f: f.__name__)
def test_correct_toy_passes_every_check(check):
    sae = ToyTopKSAE()
    before = _state(sae)
    check(sae, adapter=ToyAdapter)  # a factory is accepted as well as an instance
    check(sae, adapter=ToyAdapter(sae))
    _assert_same_state(sae, before)


# Each planted bug: the check that must catch it, what its message must say, and the other checks it also fails
# (every check not named must pass).
PLANTED_BUGS = [
    (
        "double_count",
        assert_no_aux_bias_double_count,
        [
            "does not exclude b_dec",
            "implementation aux loss",
            "reference: ê = z_aux W_dec (no b_dec)",
            "double-counting formula: ê + b_dec",
            "matched: double-counting formula",
            "metamorphic check failed",
        ],
        (),
    ),
    (
        "no_detach",
        assert_aux_residual_detached,
        [
            "e is not detached",
            "matched: residual NOT detached, b_dec excluded",
            "residual detached, b_dec excluded (correct)",
        ],
        (),
    ),
    (
        "no_scale",
        assert_aux_k_scaling,
        [
            "does not follow the documented k_aux / dead-latent scaling",
            "no scale (scale = 1)",
            # with every latent dead the scale is 1 anyway, so that row matches the documented formula
            "documented formula",
        ],
        (),
    ),
    # the bias and detach checks' references use the documented k_aux too, so the loss (and its gradient)
    # matches none of their formulas
    (
        "k_from_d_sae",
        assert_aux_k_scaling,
        ["k_aux from d_sae instead of d_in"],
        (assert_no_aux_bias_double_count, assert_aux_residual_detached),
    ),
    ("nonzero_when_none_dead", assert_aux_loss_zero_without_dead, ["is not zero when no latent is dead"], ()),
]


@pytest.mark.parametrize(
    ("bug", "failing", "message", "also"), PLANTED_BUGS, ids=[row[0] for row in PLANTED_BUGS]
)
def test_a_planted_bug_fails_its_check_and_only_the_listed_ones(bug, failing, message, also):
    sae = ToyTopKSAE(bug=bug)
    before = _state(sae)
    with pytest.raises(AssertionError) as excinfo:
        failing(sae, adapter=ToyAdapter(sae))
    text = str(excinfo.value)
    assert [part for part in message if part not in text] == [], text
    assert all(isinstance(arg, str) for arg in excinfo.value.args)  # no tensors kept alive
    for check in ALL_CHECKS:
        if check is not failing and check not in also:
            check(sae, adapter=ToyAdapter(sae))
    for check in also:
        with pytest.raises(AssertionError, match=r"matched: (neither|none)"):
            check(sae, adapter=ToyAdapter(sae))
    # the whole objective collects exactly these failures
    with pytest.raises(AssertionError) as collected:
        assert_training_objective(sae, adapter=ToyAdapter(sae))
    named = {check.__name__ for check in ALL_CHECKS if f"[{check.__name__}]" in str(collected.value)}
    assert named == {failing.__name__, *(check.__name__ for check in also)}
    _assert_same_state(sae, before)


def test_the_correct_toy_passes_the_whole_objective():
    assert_training_objective(ToyTopKSAE(), adapter=ToyAdapter)


def test_toy_double_count_values_in_message_are_the_computed_ones():
    sae = ToyTopKSAE(bug="double_count")
    with pytest.raises(AssertionError) as excinfo:
        assert_no_aux_bias_double_count(sae, adapter=ToyAdapter(sae))
    values = {}
    for line in str(excinfo.value).splitlines():
        for label in ("implementation aux loss", "reference: ê", "double-counting formula: ê"):
            if line.strip().startswith(label):
                values[label] = float(line.split()[-1])
    assert values["implementation aux loss"] == pytest.approx(values["double-counting formula: ê"], rel=1e-4)
    assert abs(values["implementation aux loss"] - values["reference: ê"]) > 0.1 * values["reference: ê"]


def test_toy_double_count_without_shift_invariance_still_fails():
    class NoShiftAdapter(ToyAdapter):
        shift_invariant = False

    sae = ToyTopKSAE(bug="double_count")
    with pytest.raises(AssertionError, match="matched: double-counting formula") as excinfo:
        assert_no_aux_bias_double_count(sae, adapter=NoShiftAdapter(sae))
    assert "metamorphic" not in str(excinfo.value)


def test_custom_k_aux_formula_through_adapter():
    """An implementation documenting a different k_aux (here: a fixed 3) passes when the adapter says so."""

    class FixedK(ToyTopKSAE):
        def aux_loss(self, x, dead_mask):
            num_dead = int(dead_mask.sum())
            if num_dead == 0:
                return x.new_zeros(())
            k_aux = min(3, num_dead)
            e = (x - self(x)).detach()
            pre = self.pre_acts(x)
            idx = pre.masked_fill(~dead_mask, -math.inf).topk(k_aux, dim=-1).indices
            z = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
            return (z @ self.W_dec - e).pow(2).sum(-1).mean()

    class FixedKAdapter(ToyAdapter):
        def k_aux_and_scale(self, num_dead, d_in):
            return min(3, num_dead), 1.0

    sae = FixedK()
    assert_aux_k_scaling(sae, adapter=FixedKAdapter(sae))
    assert_no_aux_bias_double_count(sae, adapter=FixedKAdapter(sae))
    with pytest.raises(AssertionError):
        assert_aux_k_scaling(sae, adapter=ToyAdapter(sae))


def test_user_batch_is_used():
    sae = ToyTopKSAE(bug="double_count")
    batch = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with pytest.raises(AssertionError, match="batch of 5"):
        assert_no_aux_bias_double_count(sae, adapter=ToyAdapter(sae), batch=batch)


def test_checks_are_deterministic():
    sae = ToyTopKSAE(bug="double_count")
    messages = []
    for _ in range(2):
        with pytest.raises(AssertionError) as excinfo:
            assert_no_aux_bias_double_count(sae, adapter=ToyAdapter(sae))
        messages.append(str(excinfo.value))
    assert messages[0] == messages[1]


# ==============================================================================================================
# Restoration
# ==============================================================================================================


class _Boom(RuntimeError):
    pass


class RaisingToy(ToyTopKSAE):
    """Mutates its weights and a buffer, reassigns the buffer, then raises inside the aux loss."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def aux_loss(self, x, dead_mask):
        with torch.no_grad():
            self.W_dec.mul_(3.0)
            self.W_enc.add_(1.0)
        self.steps = self.steps + 1  # reassigns the buffer to a new tensor
        self.train(not self.training)
        raise _Boom("implementation failed")


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda f: f.__name__)
def test_object_restored_when_implementation_raises(check):
    sae = RaisingToy()
    with torch.no_grad():
        sae.b_dec.copy_(torch.arange(8.0))
    sae.W_dec.grad = torch.full_like(sae.W_dec, 0.5)
    before = _state(sae)
    buffer_obj, bias_obj, training = sae.steps, sae.b_dec, sae.training
    with pytest.raises(_Boom):
        check(sae, adapter=ToyAdapter(sae))
    _assert_same_state(sae, before)
    assert sae.steps is buffer_obj
    assert sae.b_dec is bias_obj
    assert sae.training == training
    assert torch.equal(sae.W_dec.grad, torch.full_like(sae.W_dec, 0.5))
    assert sae.b_dec.grad is None


def test_object_restored_after_failing_check():
    sae = ToyTopKSAE(bug="double_count")
    with torch.no_grad():
        sae.b_dec.copy_(torch.linspace(-1, 1, 8))
    before = _state(sae)
    with pytest.raises(AssertionError):
        assert_no_aux_bias_double_count(sae, adapter=ToyAdapter(sae))
    _assert_same_state(sae, before)
    assert all(p.grad is None for p in sae.parameters())


def test_non_module_implementation_gets_its_bias_restored():
    class Plain:
        def __init__(self) -> None:
            self.inner = ToyTopKSAE()

    class PlainAdapter(ToyAdapter):
        def __init__(self, obj):
            super().__init__(obj.inner)
            self.module = None  # only b_dec is known to the check

    obj = Plain()
    with torch.no_grad():
        obj.inner.b_dec.fill_(0.25)
    assert_no_aux_bias_double_count(obj, adapter=PlainAdapter(obj))
    assert torch.equal(obj.inner.b_dec, torch.full((8,), 0.25))


def test_thread_count_is_restored():
    threads = torch.get_num_threads()
    assert_no_aux_bias_double_count(ToyTopKSAE(), adapter=ToyAdapter)
    assert torch.get_num_threads() == threads


# ==============================================================================================================
# Adapter resolution and bad input
# ==============================================================================================================


def test_unknown_class_raises_training_check_error_naming_it():
    with pytest.raises(TrainingCheckError) as excinfo:
        assert_no_aux_bias_double_count(ToyTopKSAE())
    msg = str(excinfo.value)
    assert "ToyTopKSAE" in msg
    assert "pytest_saecheck_training_adapter" in msg
    assert "AuxLossAdapter" in msg


def test_incomplete_adapter_is_rejected():
    class Half:
        def decoder_bias(self):
            return torch.zeros(3)

    with pytest.raises(TrainingCheckError, match="lacks decoder_weight, aux_pre_activations"):
        resolve_training_adapter(ToyTopKSAE(), adapter=Half())


def test_bad_selection_is_rejected():
    class Bad(ToyAdapter):
        selection = "largest"

    with pytest.raises(TrainingCheckError, match="selection='largest'"):
        resolve_training_adapter(ToyTopKSAE(), adapter=Bad)


def test_object_satisfying_protocol_is_its_own_adapter():
    adapter = ToyAdapter(ToyTopKSAE())
    assert resolve_training_adapter(adapter) is adapter
    assert_no_aux_bias_double_count(adapter)


def test_resolver_fills_every_optional_member_once():
    """An adapter with only the required members gets AuxLossAdapterBase's defaults from the resolver."""

    class Bare:
        def __init__(self, sae):
            self.sae = sae

        def decoder_bias(self):
            return self.sae.b_dec

        def decoder_weight(self):
            return self.sae.W_dec

        def aux_pre_activations(self, x):
            return self.sae.pre_acts(x)

        def reconstruction(self, x):
            return self.sae(x)

        def aux_loss(self, x, dead_mask):
            return self.sae.aux_loss(x, dead_mask)

        def reduce_aux_error(self, squared_error, x):
            return squared_error.sum(dim=-1).mean()

    sae = ToyTopKSAE()
    resolved = resolve(sae, adapter=Bare(sae))
    assert isinstance(resolved, ResolvedAdapter)
    assert resolved.name == Bare.__qualname__
    assert (resolved.selection, resolved.shift_invariant) == ("value", False)
    assert resolved.module is sae  # the object under test is a module: its state is restored
    assert resolved.k_aux_and_scale(3, 16) == gao_k_aux_and_scale(3, 16)
    assert resolved.aux_groups(torch.zeros(2, 8)) is None
    assert set(resolved.gradient_tensors()) == {name for name, _ in sae.named_parameters()}
    assert resolve(sae, adapter=resolved) is resolved  # resolving twice is a no-op
    assert_training_objective(sae, adapter=Bare(sae))


def test_training_package_imports_run_one_way():
    """checks → reference → resolve → adapters → protocol: each module imports only the ones after it, at the
    top (no function-local import hiding a cycle), and only the resolver reads adapter members with defaults."""
    import ast
    import importlib

    layers = ["checks", "reference", "resolve", "adapters", "protocol"]
    for position, name in enumerate(layers):
        module = importlib.import_module(f"pytest_saecheck.training.{name}")
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "pytest_saecheck.training."
            ):
                target = node.module.split(".")[2]
                assert layers.index(target) > position, f"{name} imports {target}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"function-local import in training/{name}.py: {node.name}"
            if (
                name != "resolve"
                and isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "getattr"
            ):
                first = node.args[0]
                assert not (isinstance(first, ast.Name) and first.id in ("adapter", "ad")), (
                    f"training/{name}.py reads an adapter member with a default of its own"
                )


def test_k_scaling_records_the_measured_deviation(monkeypatch):
    """The recorded value is max |impl/ref - 1| as measured, not a number read back from the message's table
    (the old table cell showed the ratio to 4 significant digits, "1", so a failing check recorded 0)."""
    from pytest_saecheck import records

    factor = 1.0 + 3.12345678e-4

    class Inflated(ToyTopKSAE):
        def aux_loss(self, x, dead_mask):
            return factor * super().aux_loss(x, dead_mask)

    captured = []
    monkeypatch.setattr(
        records,
        "record",
        lambda entry, item=None: captured.append(
            entry.to_plain() if hasattr(entry, "to_plain") else dict(entry)
        ),
    )
    sae = Inflated()
    with pytest.raises(AssertionError, match="does not follow the documented k_aux"):
        assert_aux_k_scaling(sae, adapter=ToyAdapter(sae))
    (entry,) = captured
    assert entry["assertion"] == "assert_aux_k_scaling"
    assert entry["metric"] == "max_relative_deviation"
    assert entry["passed"] is False
    # float32 losses: the deviation is the factor's to float32 precision
    assert entry["value"] == pytest.approx(factor - 1.0, rel=1e-3)
    assert entry["implementation"] == f"{Inflated.__qualname__} (via ToyAdapter)"

    captured.clear()
    assert_aux_k_scaling(ToyTopKSAE(), adapter=ToyAdapter)
    (entry,) = captured
    assert entry["passed"] is True and entry["message"] is None
    assert 0.0 <= entry["value"] <= 1e-4


def test_non_finite_tolerance_is_a_config_error():
    with pytest.raises(ConfigError, match="atol must be a finite number"):
        assert_aux_k_scaling(ToyTopKSAE(), adapter=ToyAdapter, atol=math.inf)
    with pytest.raises(ConfigError, match="rtol must be a finite number"):
        assert_no_aux_bias_double_count(ToyTopKSAE(), adapter=ToyAdapter, rtol=math.nan)


class _FakeRelay:
    def __init__(self, result):
        self.result = result
        self.calls = []

    def pytest_saecheck_training_adapter(self, training_sae):
        self.calls.append(training_sae)
        return self.result(training_sae) if callable(self.result) else self.result


class _StandInRun:
    """A pytest run (pytest_saecheck.running.Run) whose hook relay is ``relay``, outside any test."""

    def __init__(self, relay):
        self.hook = relay
        self.item = None


def _hooked(relay):
    return running.activated(_StandInRun(relay))


def test_hook_result_is_used():
    relay = _FakeRelay(ToyAdapter)
    sae = ToyTopKSAE(bug="double_count")
    with _hooked(relay), pytest.raises(AssertionError, match="via ToyAdapter"):
        assert_no_aux_bias_double_count(sae)
    assert relay.calls == [sae]
    with _hooked(relay):
        assert_no_aux_bias_double_count(ToyTopKSAE())


def test_explicit_adapter_wins_over_hook():
    relay = _FakeRelay(ToyAdapter)
    sae = ToyTopKSAE()
    adapter = ToyAdapter(sae)
    with _hooked(relay):
        assert resolve_training_adapter(sae, adapter=adapter) is adapter
    assert relay.calls == []


def test_hook_wins_over_builtin_adapter():
    sae_lens_topk = pytest.importorskip("sae_lens.saes.topk_sae")
    sae = sae_lens_topk.TopKTrainingSAE(sae_lens_topk.TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))

    class Marker(SAELensTopKAdapter):
        pass

    with _hooked(_FakeRelay(Marker)):
        assert type(resolve_training_adapter(sae)) is Marker
    with _hooked(_FakeRelay(None)):  # declining falls through
        assert type(resolve_training_adapter(sae)) is SAELensTopKAdapter


def test_bad_hook_result_is_reported():
    with (
        _hooked(_FakeRelay(object())),
        pytest.raises(TrainingCheckError, match="from the pytest_saecheck_training_adapter hook"),
    ):
        resolve_training_adapter(ToyTopKSAE())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtol": -1.0}, "non-negative"),
        ({"batch": torch.zeros(4, 3)}, r"batch must be \[n, d_in=8\]"),
        ({"batch": torch.zeros(1, 8)}, "at least 2 rows"),
        ({"batch_size": 1}, "batch_size must be at least 2"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        assert_no_aux_bias_double_count(ToyTopKSAE(), adapter=ToyAdapter, **kwargs)


def test_bad_dead_counts_raise_config_error():
    with pytest.raises(ConfigError, match="dead_counts"):
        assert_aux_k_scaling(ToyTopKSAE(), adapter=ToyAdapter, dead_counts=[0])


def test_zero_coefficient_is_reported_as_undecidable():
    class ZeroLoss(ToyTopKSAE):
        def aux_loss(self, x, dead_mask):
            return 0.0 * super().aux_loss(x, dead_mask)

    class ZeroAdapter(ToyAdapter):
        def reduce_aux_error(self, squared_error, x):
            return 0.0 * squared_error.sum()

    sae = ZeroLoss()
    with pytest.raises(TrainingCheckError, match="indistinguishable"):
        assert_no_aux_bias_double_count(sae, adapter=ZeroAdapter(sae))


def test_gao_formula():
    assert gao_k_aux_and_scale(1, 16) == (1, 1 / 8)
    assert gao_k_aux_and_scale(8, 16) == (8, 1.0)
    assert gao_k_aux_and_scale(100, 16) == (8, 1.0)
    assert gao_k_aux_and_scale(3, 1) == (1, 1.0)


def test_missing_sparsify_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "sparsify", None)  # makes `import sparsify` raise ImportError
    with pytest.raises(TrainingCheckError, match="pip install eai-sparsify"):
        SparsifyAdapter(object())


# ==============================================================================================================
# The hook through a real pytest run
# ==============================================================================================================


def _toy_module_source() -> str:
    header = textwrap.dedent(
        """
        import math

        import torch
        from torch import nn

        from pytest_saecheck.training import AuxLossAdapterBase
        """
    )
    return "\n\n".join([header, inspect.getsource(ToyTopKSAE), inspect.getsource(ToyAdapter)])


def test_hook_in_conftest_supplies_adapter(pytester):
    pytester.makepyfile(toy_impl=_toy_module_source())
    pytester.makeconftest(
        """
        from toy_impl import ToyAdapter, ToyTopKSAE

        def pytest_saecheck_training_adapter(training_sae):
            if isinstance(training_sae, ToyTopKSAE):
                return ToyAdapter(training_sae)
            return None

        def pytest_runtest_logreport(report):
            if report.when == "call":
                for r in getattr(report, "saecheck_records", None) or ():
                    print("RECORD", report.nodeid, r["assertion"], r["passed"], r["matched"] if "matched" in r else "-")
        """
    )
    pytester.makepyfile(
        test_aux="""
        from pytest_saecheck.training import assert_aux_residual_detached, assert_no_aux_bias_double_count
        from toy_impl import ToyTopKSAE

        def test_correct():
            assert_no_aux_bias_double_count(ToyTopKSAE())

        def test_double_count():
            assert_no_aux_bias_double_count(ToyTopKSAE(bug="double_count"))

        def test_no_detach():
            assert_aux_residual_detached(ToyTopKSAE(bug="no_detach"))
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*matched: double-counting formula*", "*e is not detached*"])
    # every check leaves a plain record on the test report (for --saecheck-json and the HTML report)
    result.stdout.fnmatch_lines_random(
        [
            "*RECORD test_aux.py::test_correct assert_no_aux_bias_double_count True -",
            "*RECORD test_aux.py::test_double_count assert_no_aux_bias_double_count False double-counting formula*",
            "*RECORD test_aux.py::test_no_detach assert_aux_residual_detached False residual NOT detached*",
        ]
    )
    # __tracebackhide__ keeps the check's own frames out of the report
    assert "reference_loss(" not in result.stdout.str()
    assert "conclude(" not in result.stdout.str()


# ==============================================================================================================
# SAE Lens
# ==============================================================================================================

SAE_LENS_VERSION = Version(importlib.metadata.version("sae-lens"))
#: first sae-lens release whose TopK AuxK loss decodes without b_dec (6.36.1 and earlier call decode())
SAE_LENS_AUX_BIAS_FIXED = Version("6.36.2")

topk_mod = pytest.importorskip("sae_lens.saes.topk_sae")


def _optional(module: str, *names: str):
    try:
        mod = __import__(module, fromlist=list(names))
        return tuple(getattr(mod, n) for n in names)
    except (ImportError, AttributeError):
        return None


_BATCHTOPK = _optional("sae_lens.saes.batchtopk_sae", "BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig")
_MATRYOSHKA = _optional(
    "sae_lens.saes.matryoshka_batchtopk_sae",
    "MatryoshkaBatchTopKTrainingSAE",
    "MatryoshkaBatchTopKTrainingSAEConfig",
)
_ABSTOPK = _optional("sae_lens.saes.abstopk_sae", "AbsTopKTrainingSAE", "AbsTopKTrainingSAEConfig")


def _cfg_fields(cfg_cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cfg_cls)}


def _sae_lens_variants():
    variants = [pytest.param("topk", id="TopK")]
    if "rescale_acts_by_decoder_norm" in _cfg_fields(topk_mod.TopKTrainingSAEConfig):
        variants.append(pytest.param("topk_no_rescale", id="TopK-no-rescale"))
    variants.append(pytest.param("topk_no_b_dec_input", id="TopK-b_dec-not-applied-to-input"))
    variants.append(
        pytest.param(
            "batchtopk", id="BatchTopK", marks=pytest.mark.skipif(_BATCHTOPK is None, reason="absent")
        )
    )
    variants.append(
        pytest.param(
            "matryoshka",
            id="MatryoshkaBatchTopK",
            marks=pytest.mark.skipif(_MATRYOSHKA is None, reason="absent"),
        )
    )
    has_matryoshka_aux = _MATRYOSHKA is not None and "use_matryoshka_aux_loss" in _cfg_fields(_MATRYOSHKA[1])
    variants.append(
        pytest.param(
            "matryoshka_aux",
            id="MatryoshkaBatchTopK-matryoshka-aux",
            marks=pytest.mark.skipif(not has_matryoshka_aux, reason="absent"),
        )
    )
    variants.append(
        pytest.param("abstopk", id="AbsTopK", marks=pytest.mark.skipif(_ABSTOPK is None, reason="absent"))
    )
    return variants


def _base_and_cfg(variant: str):
    import warnings

    common = {"d_in": 16, "d_sae": 64, "dtype": "float32", "device": "cpu"}
    if variant.startswith("topk"):
        cls, cfg_cls = topk_mod.TopKTrainingSAE, topk_mod.TopKTrainingSAEConfig
        kw = {"k": 4}
        if variant == "topk_no_rescale":
            kw["rescale_acts_by_decoder_norm"] = False
        if variant == "topk_no_b_dec_input":
            kw["apply_b_dec_to_input"] = False
    elif variant == "batchtopk":
        cls, cfg_cls = _BATCHTOPK
        kw = {"k": 4}
    elif variant.startswith("matryoshka"):
        cls, cfg_cls = _MATRYOSHKA
        kw = {"k": 4, "matryoshka_widths": [8, 24, 64]}
        if variant == "matryoshka_aux":
            kw["use_matryoshka_aux_loss"] = True
    else:
        cls, cfg_cls = _ABSTOPK
        kw = {"k": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = cfg_cls(**common, **kw)
    return cls, cfg


def _make_sae_lens(variant: str, bug: str | None = None):
    import warnings

    torch.manual_seed(0)
    cls, cfg = _base_and_cfg(variant)
    if bug is not None:
        cls = _buggy_sae_lens_class(cls, bug, magnitude=variant == "abstopk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg)


def _aux_acts(hidden_pre: torch.Tensor, dead: torch.Tensor, k_aux: int, magnitude: bool) -> torch.Tensor:
    key = hidden_pre.abs() if magnitude else hidden_pre
    idx = key.masked_fill(~dead[None], -math.inf).topk(k_aux, dim=-1).indices
    return torch.zeros_like(hidden_pre).scatter(-1, idx, hidden_pre.gather(-1, idx))


def _buggy_sae_lens_class(base, bug: str, *, magnitude: bool):
    """A subclass of an installed SAE Lens class whose TopK aux loss has one known bug."""

    def aux(self, sae_in, sae_out, hidden_pre, dead_neuron_mask):
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual = sae_in - sae_out
        if bug != "no_detach":
            residual = residual.detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        recons = self.decode(_aux_acts(hidden_pre, dead_neuron_mask, k_aux, magnitude))  # decode() adds b_dec
        if bug != "double_count":
            recons = recons - self.b_dec
        coef = getattr(self.cfg, "aux_loss_coefficient", 1.0)
        return coef * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    method = "calculate_abstopk_aux_loss" if magnitude else "calculate_topk_aux_loss"
    name = f"{bug.title().replace('_', '')}{base.__name__}"
    return type(name, (base,), {method: aux})


def _installed_has_double_count_bug(variant: str) -> bool:
    if variant == "matryoshka_aux":  # its own aux loss appeared after the fix
        return False
    return SAE_LENS_VERSION < SAE_LENS_AUX_BIAS_FIXED


@pytest.mark.parametrize("variant", _sae_lens_variants())
def test_sae_lens_installed_class(variant):
    sae = _make_sae_lens(variant)
    before = _state(sae)
    assert isinstance(resolve_training_adapter(sae), SAELensTopKAdapter)
    if _installed_has_double_count_bug(variant):
        # sae-lens <= 6.36.1 decodes the aux latents through decode(), which adds b_dec
        with pytest.raises(AssertionError, match="matched: double-counting formula"):
            assert_no_aux_bias_double_count(sae)
    else:
        assert_no_aux_bias_double_count(sae)
    assert_aux_residual_detached(sae)
    assert_aux_k_scaling(sae)
    assert_aux_loss_zero_without_dead(sae)
    _assert_same_state(sae, before)


@pytest.mark.parametrize(
    "variant", [p for p in _sae_lens_variants() if p.id != "MatryoshkaBatchTopK-matryoshka-aux"]
)
def test_sae_lens_subclass_readding_b_dec_fails(variant):
    sae = _make_sae_lens(variant, bug="double_count")
    with pytest.raises(AssertionError) as excinfo:
        assert_no_aux_bias_double_count(sae)
    msg = str(excinfo.value)
    assert "SAE Lens adapter" in msg
    assert "matched: double-counting formula" in msg
    assert ("metamorphic check failed" in msg) == (variant != "topk_no_b_dec_input")
    assert_aux_residual_detached(sae)


@pytest.mark.parametrize(
    "variant", [p for p in _sae_lens_variants() if p.id != "MatryoshkaBatchTopK-matryoshka-aux"]
)
def test_sae_lens_subclass_forgetting_detach_fails(variant):
    sae = _make_sae_lens(variant, bug="no_detach")
    with pytest.raises(AssertionError) as excinfo:
        assert_aux_residual_detached(sae)
    assert "matched: residual NOT detached, b_dec excluded" in str(excinfo.value)
    assert_no_aux_bias_double_count(sae)


def test_sae_lens_fixed_subclass_passes_even_on_old_versions():
    """The subclass with no bug is the fixed formula: it passes whatever sae-lens is installed."""
    sae = _make_sae_lens("topk", bug="none")
    assert_training_objective(sae)


def test_sae_lens_batchtopk_threshold_is_restored():
    if _BATCHTOPK is None:
        pytest.skip("BatchTopK absent")
    sae = _make_sae_lens("batchtopk")
    threshold_obj = sae.topk_threshold
    value = threshold_obj.clone()
    assert_aux_k_scaling(sae)  # runs training_forward_pass, which updates the threshold
    assert sae.topk_threshold is threshold_obj
    assert torch.equal(sae.topk_threshold, value)


def test_sae_lens_restored_when_training_step_raises():
    class Raising(topk_mod.TopKTrainingSAE):
        def calculate_aux_loss(self, *args, **kwargs):
            with torch.no_grad():
                self.W_dec.mul_(2.0)
            raise _Boom("aux loss failed")

    sae = Raising(topk_mod.TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))
    with torch.no_grad():
        sae.b_dec.fill_(0.5)
    before = _state(sae)
    with pytest.raises(_Boom):
        assert_no_aux_bias_double_count(sae)
    _assert_same_state(sae, before)


def test_sae_lens_adapter_reduction_uses_coefficient():
    if "aux_loss_coefficient" not in _cfg_fields(topk_mod.TopKTrainingSAEConfig):
        pytest.skip("no aux_loss_coefficient in this sae-lens")
    sae = topk_mod.TopKTrainingSAE(
        topk_mod.TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, aux_loss_coefficient=0.5)
    )
    adapter = SAELensTopKAdapter(sae)
    assert float(adapter.reduce_aux_error(torch.ones(4, 8), torch.zeros(4, 8))) == pytest.approx(4.0)
    if not _installed_has_double_count_bug("topk"):
        assert_no_aux_bias_double_count(sae)


def test_sae_lens_non_topk_training_sae_is_rejected():
    jumprelu = _optional("sae_lens.saes.jumprelu_sae", "JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig")
    if jumprelu is None:
        pytest.skip("no JumpReLU training SAE")
    cls, cfg_cls = jumprelu
    sae = cls(cfg_cls(d_in=8, d_sae=16))
    with pytest.raises(TrainingCheckError, match="without a TopK-style AuxK loss"):
        assert_no_aux_bias_double_count(sae)


def test_sae_lens_inference_sae_is_rejected():
    sae = topk_mod.TopKSAE(topk_mod.TopKSAEConfig(d_in=8, d_sae=16, k=2))
    with pytest.raises(TrainingCheckError, match="inference SAE"):
        assert_no_aux_bias_double_count(sae)


def _buggy_matryoshka_aux_class(bug: str):
    """A Matryoshka subclass whose per-level aux loss (use_matryoshka_aux_loss) has one known bug."""
    base = _MATRYOSHKA[0]

    def aux(self, sae_in, sae_out, feature_acts, hidden_pre, dead_neuron_mask):
        if dead_neuron_mask is None or int(dead_neuron_mask.sum()) == 0:
            return sae_out.new_tensor(0.0)
        w = self.W_dec
        if self.cfg.rescale_acts_by_decoder_norm:
            w = w / w.norm(dim=-1, keepdim=True)
        k_aux = sae_in.shape[-1] // 2
        partial, prev, total = self.b_dec, 0, sae_out.new_tensor(0.0)
        for width in self.cfg.matryoshka_widths:
            partial = partial + feature_acts[:, prev:width] @ w[prev:width]
            mask = dead_neuron_mask[prev:width]
            if (num_dead := int(mask.sum())) > 0:
                residual = sae_in - partial
                if bug != "no_detach":
                    residual = residual.detach()
                acts = _aux_acts(hidden_pre[:, prev:width], mask, min(k_aux, num_dead), False)
                recons = acts @ w[prev:width]
                if bug == "double_count":
                    recons = recons + self.b_dec
                total = total + min(num_dead / k_aux, 1.0) * (recons - residual).pow(2).sum(-1).mean()
            prev = width
        return self.cfg.aux_loss_coefficient * total

    return type(f"{bug.title().replace('_', '')}Matryoshka", (base,), {"calculate_matryoshka_aux_loss": aux})


@pytest.mark.parametrize("bug", ["none", "double_count", "no_detach"])
def test_sae_lens_matryoshka_level_aux_subclass(bug):
    if _MATRYOSHKA is None or "use_matryoshka_aux_loss" not in _cfg_fields(_MATRYOSHKA[1]):
        pytest.skip("no Matryoshka per-level aux loss in this sae-lens")
    _, cfg = _base_and_cfg("matryoshka_aux")
    torch.manual_seed(0)
    sae = _buggy_matryoshka_aux_class(bug)(cfg)
    if bug == "double_count":
        with pytest.raises(AssertionError, match="matched: double-counting formula"):
            assert_no_aux_bias_double_count(sae)
        assert_aux_residual_detached(sae)
    elif bug == "no_detach":
        with pytest.raises(AssertionError, match="matched: residual NOT detached, b_dec excluded"):
            assert_aux_residual_detached(sae)
        assert_no_aux_bias_double_count(sae)
    else:
        assert_training_objective(sae)
