"""The hook-point resolver: a dictionary's own record to one read and one write point, on TransformerLens and on a
Hugging Face module tree, checked numerically on tiny models of real architectures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories import identity_sae, make_engine_model, make_sparse_coder, make_tokens
from tiny_hf import D_MODEL, RELEASE, SAE_ID, VOCAB, captured, exact_gemma_transcoder, tiny_hf, tl_twin

from pytest_saecheck import evaluate
from pytest_saecheck.errors import HookNotFoundError, NoFaithfulPointError
from pytest_saecheck.hookpoints import HookRecord, ModulePoint, Site, resolve_points
from pytest_saecheck.hookpoints.layouts import TL3_HOOKS

ARCHITECTURES = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GPTNeoXForCausalLM",
)
ALSO_MAPPED = ("GemmaForCausalLM", "OlmoForCausalLM", "Phi3ForCausalLM", "Qwen2MoeForCausalLM")


def tokens(n: int = 3, seq: int = 12) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))


def spliced_logits(model: Any, read: ModulePoint, write: ModulePoint, fn: Any, ids: torch.Tensor) -> Any:
    """Logits with ``write``'s output replaced by ``fn(read)`` (a plain-torch splice), and the tensors seen."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    assert write.io == "output"

    def capture(m: Any, args: Any, out: Any = None) -> None:
        seen["in"] = (args[0] if read.io == "input" else (out[0] if isinstance(out, tuple) else out)).detach()

    def replace(m: Any, args: Any, out: Any) -> Any:
        seen["out"] = (out[0] if isinstance(out, tuple) else out).detach()
        seen["rec"] = fn(seen["in"])
        return (seen["rec"], *out[1:]) if isinstance(out, tuple) else seen["rec"]

    reader = modules[read.path]
    h1 = (
        reader.register_forward_pre_hook(capture)
        if read.io == "input"
        else reader.register_forward_hook(capture)
    )
    h2 = modules[write.path].register_forward_hook(replace)
    try:
        with torch.no_grad():
            return model(ids).logits, seen
    finally:
        h1.remove()
        h2.remove()


def r2(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double().flatten(0, -2), x_hat.double().flatten(0, -2)
    return float(1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ---------------------------------------------------------------------------------------------------------
# every mapped architecture: the resolved module points exist and agree with the record's own HF names


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_transformer_lens_names_resolve_to_existing_module_points(architecture):
    model = tiny_hf(architecture)
    modules = {name for name, _ in model.named_modules()}
    for name in (
        "hook_resid_pre",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
        "attn.hook_z",
        "hook_out",
    ):
        points = resolve_points(HookRecord(f"blocks.1.{name}"), model, transcoder=False)
        assert isinstance(points.read.point, ModulePoint) and points.read.point.path in modules, name
        assert points.read.point == points.write.point
    transcoder = resolve_points(HookRecord("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"), model)
    assert transcoder.read.site is Site.MLP_IN and transcoder.write.site is Site.MLP_OUT
    assert {transcoder.read.point.path, transcoder.write.point.path} <= modules  # type: ignore[union-attr]
    # the record's own HF name (Qwen Scope: metadata.hf_hook_name = "model.layers.L") agrees with its TL label
    layers = resolve_points(HookRecord("blocks.1.hook_resid_post"), model, transcoder=False).read.point
    agreed = resolve_points(
        HookRecord("blocks.1.hook_resid_post", None, str(layers)), model, transcoder=False
    )
    assert agreed.read.point == layers and "is where it was trained" in agreed.read.reason
    assert "another tensor" not in agreed.read.reason


@pytest.mark.parametrize(
    ("architecture", "sparsify", "expected"),
    [
        ("LlamaForCausalLM", "layers.1", "model.layers.1"),
        ("LlamaForCausalLM", "layers.1.mlp", "model.layers.1.mlp"),
        ("GPT2LMHeadModel", "h.1", "transformer.h.1"),
        ("GPTNeoXForCausalLM", "gpt_neox.layers.1", "gpt_neox.layers.1"),  # dictionary_learning's full path
        ("Qwen3ForCausalLM", "model.layers.1.mlp", "model.layers.1.mlp"),
    ],
)
def test_sparsify_and_dictionary_learning_module_paths(architecture, sparsify, expected):
    model = tiny_hf(architecture)
    points = resolve_points(HookRecord(sparsify), model, transcoder=False)
    assert points.read.point == ModulePoint(expected, "output", 1)
    assert points.backend == "hf"


# ---------------------------------------------------------------------------------------------------------
# the equivalences the maps claim, numerically, on a TransformerLens twin of the same weights


TWINNED = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "GPTNeoXForCausalLM",  # parallel residual
)


@pytest.mark.parametrize("architecture", TWINNED)
def test_module_points_equal_their_transformer_lens_hooks(architecture):
    hf = tiny_hf(architecture)
    tl = tl_twin(hf)
    ids = tokens()
    pairs = {}
    for site, suffix in TL3_HOOKS.items():
        if site in (Site.ATTN_NORMED, Site.MLP_NORMED) or f"blocks.1.{suffix}" not in tl.hook_dict:
            continue  # before the gain: no module point (checked below); no resid_mid with a parallel residual
        record = HookRecord(
            f"blocks.1.{suffix}", "blocks.1.hook_mlp_out"
        )  # a read point (resid_mid: read-only)
        point = resolve_points(record, hf).read.point
        pairs[f"blocks.1.{suffix}"] = point
    tl.set_use_hook_mlp_in(True)
    with torch.no_grad(), captured(hf, list(pairs.values())) as found:
        hf(ids)
        _, cache = tl.run_with_cache(ids)
    assert len(pairs) >= 6
    for hook, point in pairs.items():
        tl_value = cache[hook].flatten(-2) if hook.endswith("hook_z") else cache[hook]
        torch.testing.assert_close(found[point], tl_value, atol=1e-5, rtol=1e-5, msg=f"{hook} vs {point}")


def test_the_gained_pre_mlp_norm_output_is_no_transformer_lens_hook():
    """Gemma 3: pre_feedforward_layernorm.output has the RMSNorm gain applied; under TransformerLens 3.9
    (no weight processing) ln2.hook_normalized is before the gain and hook_mlp_in before the norm: no hook of the
    model equals it."""
    hf = tiny_hf("Gemma3ForCausalLM")
    tl = tl_twin(hf)
    ids = tokens()
    point = ModulePoint("model.layers.1.pre_feedforward_layernorm", "output", 1)
    with torch.no_grad(), captured(hf, [point]) as found:
        hf(ids)
        _, cache = tl.run_with_cache(ids)
    target = found[point]
    same_shape = [name for name, value in cache.items() if value.shape == target.shape]
    assert "blocks.1.ln2.hook_normalized" in same_shape and "blocks.1.hook_mlp_in" not in cache  # flag off
    for name in same_shape:
        assert not torch.allclose(cache[name], target, atol=1e-3), name
    gain = tl.blocks[1].ln2.w
    torch.testing.assert_close(cache["blocks.1.ln2.hook_normalized"] * gain, target, atol=1e-5, rtol=1e-5)
    with pytest.raises(NoFaithfulPointError, match=r"backend=\"hf\""):
        resolve_points(HookRecord("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"), tl)


# ---------------------------------------------------------------------------------------------------------
# Gemma Scope 2: the record of where it was trained wins


def serve_gemma_scope_2(root: Path, weights: dict[str, torch.Tensor], monkeypatch: Any) -> None:
    """The release folder in an offline hub cache, in Gemma Scope 2's layout (config.json + params.safetensors).
    SAE Lens' Gemma 3 loader asks the hub for the tensor shapes by an HTTP range request even when the file is
    cached: any request fails the test, so the load must read the cached file (loading.offline.no_range_requests)."""
    from offline_hub import save_gemma_scope_2_transcoder, use_offline_cache

    save_gemma_scope_2_transcoder(root, SAE_ID, 0, weights)
    use_offline_cache(root, monkeypatch)


def test_gemma_scope_2_transcoder_is_spliced_where_it_was_trained(tmp_path, monkeypatch):
    from pytest_saecheck import load_sae

    hf = tiny_hf("Gemma3ForCausalLM")
    serve_gemma_scope_2(tmp_path, exact_gemma_transcoder(hf), monkeypatch)
    sae = load_sae(f"{RELEASE}/{SAE_ID}", device="cpu")
    assert (
        sae.cfg.metadata.hook_name == "blocks.0.hook_mlp_in"
    )  # SAE Lens' label: the residual before the norm
    record = HookRecord.of(sae)
    assert record.hf_hook_name == "model.layers.0.pre_feedforward_layernorm.output"

    # Hugging Face module tree: the trained point wins, and the result says so
    points = resolve_points(record, hf)
    assert points.read.point == ModulePoint("model.layers.0.pre_feedforward_layernorm", "output", 0)
    assert points.write.point == ModulePoint("model.layers.0.post_feedforward_layernorm", "output", 0)
    assert points.read.source == "hf_hook_name" and "'blocks.0.hook_mlp_in'" in points.read.reason
    assert "another tensor" in points.read.reason
    assert points.to_dict()["read"]["point"] == "model.layers.0.pre_feedforward_layernorm.output"
    ids = tokens(4, 16)
    with torch.no_grad():
        original = hf(ids).logits
    logits, seen = spliced_logits(hf, points.read.point, points.write.point, sae, ids)  # type: ignore[arg-type]
    assert r2(seen["out"], seen["rec"]) == pytest.approx(1, abs=1e-5)
    assert kl(original, logits) == pytest.approx(0, abs=1e-6)
    # the label's tensor (the residual entering the norm) is not what it was trained on
    label = ModulePoint("model.layers.0.pre_feedforward_layernorm", "input", 0)
    _, wrong = spliced_logits(hf, label, points.write.point, sae, ids)  # type: ignore[arg-type]
    assert r2(wrong["out"], wrong["rec"]) < 0.9

    # through the engine's Hugging Face backend: the same splice, scored
    result = evaluate(hf, sae, ids, progress=False, exclude_bos=False, exclude_special_tokens=False)
    assert result.metrics["explained_variance"] == pytest.approx(1, abs=1e-5)
    assert result.metrics["kl_sae"] == pytest.approx(0, abs=1e-6)
    assert result.metrics["delta_ce"] == pytest.approx(0, abs=1e-5)
    assert result.dictionary["points"]["read"]["point"] == "model.layers.0.pre_feedforward_layernorm.output"
    assert result.dictionary["points"]["read"]["source"] == "hf_hook_name"

    # HookedTransformer: no hook at the gained norm output, so a refusal naming the backend that has one
    tl = tl_twin(hf)
    with pytest.raises(
        NoFaithfulPointError, match=r"pre_feedforward_layernorm\.output.*hook_mlp_in.*backend=\"hf\""
    ):
        evaluate(tl, sae, ids, progress=False)


# ---------------------------------------------------------------------------------------------------------
# TransformerLens 4 bridge names on a HookedTransformer, and refusals


def test_a_bridge_name_evaluates_at_its_own_tensor():
    model = make_engine_model()
    ids = make_tokens(4)
    bridge = evaluate(model, identity_sae("blocks.1.hook_out"), ids, progress=False)
    tl = evaluate(model, identity_sae("blocks.1.hook_resid_post"), ids, progress=False)
    assert bridge.hook_name == "blocks.1.hook_resid_post"
    assert bridge.metrics == tl.metrics


def test_on_a_hooked_transformer_the_hf_record_wins_and_the_result_says_why():
    hf = tiny_hf("GPT2LMHeadModel")
    tl = tl_twin(hf)
    ids = tokens(4, 16)
    labelled = identity_sae("blocks.1.hook_resid_pre", d_in=D_MODEL)
    labelled.cfg.metadata.hf_hook_name = "transformer.h.1"  # where it was trained: layer 1's output
    result = evaluate(tl, labelled, ids, progress=False)
    reference = evaluate(tl, identity_sae("blocks.1.hook_resid_post", d_in=D_MODEL), ids, progress=False)
    assert result.hook_name == "blocks.1.hook_resid_post"
    assert result.metrics == reference.metrics
    read = result.dictionary["points"]["read"]
    assert read["source"] == "hf_hook_name" and "'blocks.1.hook_resid_pre'" in read["reason"]
    agreeing = identity_sae("blocks.1.hook_resid_post", d_in=D_MODEL)
    agreeing.cfg.metadata.hf_hook_name = "transformer.h.1.output"
    assert evaluate(tl, agreeing, ids, progress=False).dictionary["points"]["read"]["reason"] == (
        "hook_name and hf_hook_name 'transformer.h.1.output' name the same tensor"
    )


def test_gemma_scope_1_transcoders_keep_their_transformer_lens_point():
    """Gemma Scope 1 transcoders read blocks.L.ln2.hook_normalized (no hf_hook_name): TransformerLens has that
    tensor; a module tree has no point before the norm's gain, so it is refused there, not moved."""
    tl = tl_twin(tiny_hf("Gemma3ForCausalLM"))
    record = HookRecord("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    points = resolve_points(record, tl)
    assert (points.read.point, points.write.point) == (
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
    )
    with pytest.raises(NoFaithfulPointError, match="TransformerLens backend"):
        resolve_points(record, tiny_hf("Gemma3ForCausalLM"))


def test_raw_mlp_output_has_no_hook_where_a_post_norm_follows():
    gemma, llama = tl_twin(tiny_hf("Gemma3ForCausalLM")), tl_twin(tiny_hf("LlamaForCausalLM"))
    with pytest.raises(NoFaithfulPointError, match="before any post-MLP norm"):
        resolve_points(HookRecord("blocks.1.mlp.hook_out"), gemma, transcoder=False)
    assert resolve_points(HookRecord("blocks.1.mlp.hook_out"), llama, transcoder=False).read.point == (
        "blocks.1.hook_mlp_out"
    )
    assert resolve_points(HookRecord("blocks.1.ln2_post.hook_out"), gemma, transcoder=False).read.point == (
        "blocks.1.hook_mlp_out"
    )


def test_an_unknown_name_lists_faithful_candidates_not_lookalikes():
    model = make_engine_model()
    with pytest.raises(HookNotFoundError) as error:
        resolve_points(HookRecord("blocks.1.hook_outt"), model, transcoder=False)
    message = str(error.value)
    assert "blocks.1.hook_resid_post (the residual stream leaving the layer)" in message
    assert "Closest" not in message and "hf_hook_name" in message


def test_an_unknown_module_path_lists_nearest_modules_of_its_kind():
    model = tiny_hf("LlamaForCausalLM")
    with pytest.raises(
        HookNotFoundError, match=r"nearest MLP modules: model\.layers\.1\.mlp, model\.layers\.0\.mlp"
    ):
        resolve_points(HookRecord(None, None, "model.layers.1.mlpp"), model, transcoder=False)
    with pytest.raises(
        HookNotFoundError, match=r"nearest residual modules: model\.layers\.1, model\.layers\.0"
    ):
        resolve_points(HookRecord("model.layer.1"), model, transcoder=False)


def test_an_architecture_without_a_map_says_what_it_resolves():
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    model = Tiny()
    with pytest.raises(HookNotFoundError, match=r"no hook map for Tiny.*GPT2LMHeadModel.*hf_hook_name"):
        resolve_points(HookRecord("blocks.1.hook_resid_post"), model, transcoder=False)
    explicit = resolve_points(HookRecord(None, None, "layers.1"), model, transcoder=False)
    assert explicit.read.point == ModulePoint("layers.1", "output", 1)


def test_a_norm_input_is_not_a_write_point():
    model = tiny_hf("LlamaForCausalLM")
    with pytest.raises(NoFaithfulPointError, match="TransformerLens backend"):
        resolve_points(HookRecord("blocks.1.hook_resid_mid"), model, transcoder=False)
    read_only = resolve_points(HookRecord("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"), model)
    assert read_only.read.point == ModulePoint("model.layers.1.post_attention_layernorm", "input", 1)


# ---------------------------------------------------------------------------------------------------------
# a hook_name setting that contradicts the SAE's own record


def test_a_hook_name_setting_that_moves_an_sae_needs_the_override(tmp_path):
    from pytest_saecheck import load_sae
    from pytest_saecheck.errors import ConfigError

    identity_sae("blocks.1.hook_resid_pre").save_model(tmp_path / "sae")
    with pytest.raises(
        ConfigError, match=r"'blocks\.2\.hook_resid_pre' contradicts.*hook_name='blocks\.1\.hook_resid_pre'"
    ):
        load_sae(str(tmp_path / "sae"), "cpu", hook_name="blocks.2.hook_resid_pre")
    same = load_sae(
        str(tmp_path / "sae"), "cpu", hook_name="blocks.0.hook_resid_post"
    )  # one tensor, two names
    assert same.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    moved = load_sae(
        str(tmp_path / "sae"), "cpu", hook_name="blocks.2.hook_resid_pre", hook_name_override=True
    )
    points = resolve_points(HookRecord.of(moved), make_engine_model(), transcoder=False)
    assert points.read.point == "blocks.2.hook_resid_pre"
    assert points.read.source == "hook_name (override)" and "hook_name_override" in points.read.reason


def test_an_override_replaces_a_contradicting_hf_record():
    model = tiny_hf("Gemma3ForCausalLM")
    record = HookRecord(
        "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "model.layers.0.pre_feedforward_layernorm.output"
    )
    assert resolve_points(record, model).read.point.path.endswith("pre_feedforward_layernorm")  # type: ignore[union-attr]
    overridden = HookRecord(record.hook_name, record.hook_name_out, record.hf_hook_name, override=True)
    point = resolve_points(overridden, model).read.point
    assert point == ModulePoint("model.layers.0.pre_feedforward_layernorm", "input", 0)


def test_a_sparsify_directory_is_placed_at_its_module_path(tmp_path):
    """A sparsify SAE trained on an HF Llama's ``layers.1.mlp``: loaded with that record, placed at
    ``model.layers.1.mlp`` (HF) and ``hook_mlp_out`` (TransformerLens), and spliced it equals sparsify's forward."""
    from pytest_saecheck import load_sae

    coder = make_sparse_coder()
    coder.save_to_disk(tmp_path / "run" / "layers.1.mlp")
    sae = load_sae(str(tmp_path / "run" / "layers.1.mlp"), "cpu")
    assert sae.cfg.metadata.hook_name == "layers.1.mlp"
    hf = tiny_hf("LlamaForCausalLM")
    points = resolve_points(HookRecord.of(sae), hf, transcoder=False)
    assert (
        points.read.point == ModulePoint("model.layers.1.mlp", "output", 1)
        and points.read.site is Site.MLP_OUT
    )
    ids = tokens()
    _, seen = spliced_logits(hf, points.read.point, points.write.point, sae, ids)  # type: ignore[arg-type]
    with torch.no_grad():
        own = coder(seen["in"].flatten(0, 1)).sae_out.reshape(seen["in"].shape)
        torch.testing.assert_close(seen["rec"], own, atol=1e-5, rtol=1e-5)
    assert (
        resolve_points(HookRecord.of(sae), tl_twin(hf), transcoder=False).read.point
        == "blocks.1.hook_mlp_out"
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES + ALSO_MAPPED)
def test_what_each_sublayer_adds_sums_to_the_layer_output(architecture):
    """On every mapped architecture (Gemma 2 and Qwen3-MoE included, which have no TransformerLens twin here):
    ``layers.0`` output is the model's own hidden state 1, and for layer 1 the residual entering it plus what
    attention and MLP add (the points of hook_attn_out and hook_mlp_out) is its output."""
    model = tiny_hf(architecture)
    names = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    points = [resolve_points(HookRecord(f"blocks.1.{n}"), model, transcoder=False).read.point for n in names]
    first = resolve_points(HookRecord("blocks.0.hook_resid_post"), model, transcoder=False).read.point
    with torch.no_grad(), captured(model, [*points, first]) as found:  # type: ignore[list-item]
        hidden = model(tokens(), output_hidden_states=True).hidden_states
    resid_pre, attn_out, mlp_out, resid_post = (found[p] for p in points)  # type: ignore[index]
    torch.testing.assert_close(found[first], hidden[1], atol=1e-6, rtol=1e-6)  # type: ignore[index]
    torch.testing.assert_close(resid_pre + attn_out + mlp_out, resid_post, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attn_out, torch.zeros_like(attn_out)) and not torch.allclose(
        mlp_out, 0 * mlp_out
    )


def test_an_ini_wide_hook_name_does_not_silently_move_an_sae(tiny_pytester):
    """ini ``saecheck_hook_name`` (documented for sparsify folders) against an SAE Lens SAE that records its own
    hook: an error naming both, unless the override is set."""
    tiny_pytester.makeini("[pytest]\nsaecheck_hook_name = blocks.0.hook_resid_pre\n")
    tiny_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens=64)
        def test_moved(saecheck):
            assert saecheck.metrics
        """
    )
    result = tiny_pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*ConfigError: the hook_name setting 'blocks.0.hook_resid_pre' contradicts the SAE's own record*"]
    )
    result = tiny_pytester.runpytest_inprocess("-p", "no:cacheprovider", "--saecheck-hook-name-override=true")
    result.assert_outcomes(passed=1)


def test_the_mlp_input_is_hook_normalized_only_where_the_norm_has_a_unit_gain():
    unit = make_engine_model()  # LayerNorm weights 1, biases 0
    assert resolve_points(HookRecord("blocks.1.mlp.hook_in"), unit, transcoder=False).read.point == (
        "blocks.1.ln2.hook_normalized"
    )
    from transformer_lens import HookedTransformer

    folded = HookedTransformer(unit.cfg.to_dict() | {"normalization_type": "LNPre"})  # gain folded away
    with pytest.raises(NoFaithfulPointError):
        resolve_points(HookRecord("blocks.1.mlp.hook_in"), folded, transcoder=False)
    with torch.no_grad():
        unit.blocks[1].ln2.w.mul_(2)
    with pytest.raises(NoFaithfulPointError):
        resolve_points(HookRecord("blocks.1.mlp.hook_in"), unit, transcoder=False)


@pytest.mark.parametrize(
    ("hook_name", "hf_hook_name"),
    [  # the pairs SAE Lens' Gemma 3 loader writes for Gemma Scope 2 SAEs (res, att, mlp): they agree
        ("blocks.1.hook_resid_post", "model.layers.1.output"),
        ("blocks.1.attn.hook_z", "model.layers.1.self_attn.o_proj.input"),
        ("blocks.1.hook_mlp_out", "model.layers.1.post_feedforward_layernorm.output"),
    ],
)
def test_gemma_scope_2_sae_records_agree_on_both_backends(hook_name, hf_hook_name):
    hf = tiny_hf("Gemma3ForCausalLM")
    record = HookRecord(hook_name, None, hf_hook_name)
    on_tl = resolve_points(record, tl_twin(hf), transcoder=False)
    on_hf = resolve_points(record, hf, transcoder=False)
    assert on_tl.read.point == on_tl.write.point == hook_name and "name the same tensor" in on_tl.read.reason
    assert str(on_hf.read.point) == hf_hook_name and "another tensor" not in on_hf.read.reason


def test_a_branch_input_is_read_as_the_residual_but_written_as_the_branch():
    """Bridge ``ln1.hook_in``: reading it is reading the layer's input; writing it changes attention's input only,
    which a HookedTransformer has no hook for (hook_attn_in is per head)."""
    tl = make_engine_model()
    read = resolve_points(HookRecord("blocks.1.ln1.hook_in", "blocks.1.hook_mlp_out"), tl).read
    assert read.point == "blocks.1.hook_resid_pre"
    with pytest.raises(NoFaithfulPointError):
        resolve_points(HookRecord("blocks.1.ln1.hook_in"), tl, transcoder=False)
    hf = resolve_points(HookRecord("blocks.1.ln1.hook_in"), tiny_hf("LlamaForCausalLM"), transcoder=False)
    assert hf.read.point == hf.write.point == ModulePoint("model.layers.1.input_layernorm", "input", 1)
