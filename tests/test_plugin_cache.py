"""The session cache: one model at a time, memory freed before a different model loads, failures remembered."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from pytest_saecheck.errors import LoadError
from pytest_saecheck.plugin import session_cache as session_cache_module
from pytest_saecheck.plugin.session_cache import SessionCache


class Weighty(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(256, 256))


def test_a_different_model_frees_the_previous_one(monkeypatch: pytest.MonkeyPatch) -> None:
    freed: list[bool] = []
    real_free = session_cache_module.free_accelerator_memory
    monkeypatch.setattr(
        session_cache_module, "free_accelerator_memory", lambda: freed.append(True) or real_free()
    )
    cache = SessionCache()
    first = cache.model(("a", "cpu", None), Weighty)
    first_ref = weakref.ref(first)
    sae_ref = weakref.ref(cache.sae(("sae", "cpu", None), Weighty))
    assert cache.model(("a", "cpu", None), Weighty) is first  # same key: served from the cache
    del first
    gc.collect()
    assert first_ref() is not None, "the cache must hold the current model"

    second = cache.model(("b", "cpu", None), Weighty)
    assert first_ref() is None, "the previous model must be released before the next one loads"
    assert sae_ref() is None, "SAEs loaded alongside the previous model are released too"
    assert freed == [True]
    assert cache.model_key == ("b", "cpu", None) and second is not None
    assert cache.loads["model"] == 2 and cache.frees == 1


def test_memory_is_freed_before_the_next_model_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order matters on a GPU: free first, then allocate the next model."""
    events: list[str] = []
    monkeypatch.setattr(session_cache_module, "free_accelerator_memory", lambda: events.append("free"))
    cache = SessionCache()
    cache.model("a", lambda: events.append("load a") or object())
    cache.model("b", lambda: events.append("load b") or object())
    assert events == ["load a", "free", "load b"]


def test_empty_cache_is_called_when_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    session_cache_module.free_accelerator_memory()
    assert calls == ["empty_cache"]


def test_cuda_is_not_touched_when_it_was_never_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    session_cache_module.free_accelerator_memory()
    assert calls == []  # empty_cache would initialise CUDA in a run that never used it


def test_sae_and_token_caches_are_bounded() -> None:
    cache = SessionCache(max_saes=2, max_token_sets=1)
    refs = [weakref.ref(cache.sae(i, Weighty)) for i in range(3)]
    gc.collect()
    assert refs[0]() is None and refs[1]() is not None and refs[2]() is not None
    cache.tokens("t1", lambda: torch.zeros(2))
    cache.tokens("t2", lambda: torch.zeros(2))
    cache.tokens("t1", lambda: torch.zeros(2))
    assert cache.loads["tokens"] == 3


def test_evaluations_are_bounded_least_recently_used_first() -> None:
    cache = SessionCache(max_evaluations=2)
    cache.evaluation("a", dict)
    cache.evaluation("b", dict)
    cache.evaluation("a", lambda: pytest.fail("recomputed"))  # "a" is now the most recent
    cache.evaluation("c", dict)
    assert cache.has_evaluation("a") and cache.has_evaluation("c") and not cache.has_evaluation("b")


def test_evaluations_survive_a_model_change() -> None:
    cache = SessionCache()
    cache.model("a", object)
    evaluation = cache.evaluation("e", lambda: {"ce_loss_score": 0.9})
    cache.model("b", object)
    assert cache.evaluation("e", lambda: pytest.fail("recomputed")) is evaluation


def test_failed_loads_are_remembered_and_raised_again_without_retrying() -> None:
    cache = SessionCache()
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise LoadError("no such SAE: set sae= to an existing directory")

    for _ in range(2):
        with pytest.raises(LoadError, match="no such SAE"):
            cache.sae("x", broken)
    assert calls == [1]


def test_clear_releases_everything() -> None:
    cache = SessionCache()
    ref = weakref.ref(cache.model("a", Weighty))
    cache.evaluation("e", dict)
    cache.clear()
    gc.collect()
    assert ref() is None and not cache.has_evaluation("e") and cache.model_key is None


def test_a_run_over_several_models_holds_one_model_at_a_time(tiny_pytester: pytest.Pytester) -> None:
    """End to end: each test sees only the model it asked for alive in the run's cache."""
    tiny_pytester.makepyfile(
        test_models="""
        import gc, weakref
        import pytest
        from pytest_saecheck.plugin.fixtures import session_cache

        REFS = []

        @pytest.mark.parametrize("model", [
            pytest.param(name, marks=pytest.mark.saecheck(model=name), id=name) for name in ("tiny", "tiny1", "tiny2")
        ])
        def test_model(saecheck, model, request):
            REFS.append(weakref.ref(saecheck.model))
            gc.collect()
            alive = [ref for ref in REFS if ref() is not None]
            assert len(alive) == 1, f"{len(alive)} models alive"
            assert session_cache(request.config).model_key[0] == model
        """
    )
    result = tiny_pytester.runpytest_inprocess("test_models.py", "--saecheck-sae=sae_random")
    result.assert_outcomes(passed=3)
