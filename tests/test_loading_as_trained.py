"""Models loaded the way the SAE was trained: an offline Hugging Face cache holding a tiny GPT-2 named "gpt2".

The plugin's numbers on that model equal SAE Lens' ``run_evals`` on
``HookedTransformer.from_pretrained_no_processing("gpt2", **model_from_pretrained_kwargs)`` and differ
measurably from a load with TransformerLens' weight processing. huggingface_hub reads ``HF_HOME`` and
``HF_HUB_OFFLINE`` when it is imported, so the runs happen in a subprocess (``runpytest_subprocess``).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from offline_hub import apply_offline_hub_env, build_offline_hub

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"

# Runs inside the subprocess: builds an SAE on unprocessed activations (a PCA projection fitted there), and
# gives SAE Lens' run_evals through benchmarks/bench_engine.py (its stand-in activation store and EvalConfig).
SUBPROCESS_CONFTEST = textwrap.dedent(
    f"""
    import importlib.util
    import sys
    from pathlib import Path

    import numpy as np
    import pytest
    import torch
    from sae_lens import SAE, StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformer

    HOOK = "blocks.1.hook_resid_pre"
    TRAINED_WITH = {{"center_writing_weights": False}}
    PROCESSED = {{"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}}
    BATCH = 8
    ROOT = Path(__file__).parent


    def bench():
        spec = importlib.util.spec_from_file_location("bench_engine", {str(BENCH_PATH)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_engine"] = module
        spec.loader.exec_module(module)
        return module


    def sae_lens_metrics(model, tokens):
        b = bench()
        sae = SAE.load_from_disk(ROOT / "sae")
        n_batches = len(tokens) // BATCH
        all_metrics, _ = b.run_anchor(model, sae, tokens, BATCH, b.anchor_config(BATCH, n_batches))
        return {{ours: float(all_metrics[group][name]) for ours, group, name in b.SHARED_METRICS}}


    def pytest_sessionstart(session):
        model = HookedTransformer.from_pretrained_no_processing("gpt2", **TRAINED_WITH)
        # no id 0 (BOS = EOS = PAD here) anywhere, so no token policy leaves any position out on either side
        tokens = torch.randint(1, model.cfg.d_vocab, (32, 16), generator=torch.Generator().manual_seed(0))
        np.save(ROOT / "tokens.npy", tokens.numpy())
        acts = model.run_with_cache(tokens, names_filter=HOOK)[1][HOOK].reshape(-1, model.cfg.d_model)
        mean = acts.mean(0)
        basis = torch.linalg.svd(acts - mean, full_matrices=False).Vh[:8].T  # [d_model, 8]
        sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=16, apply_b_dec_to_input=True))
        with torch.no_grad():
            sae.W_enc.copy_(torch.cat([basis, -basis], dim=1))
            sae.W_dec.copy_(sae.W_enc.T)
            sae.b_enc.zero_()
            sae.b_dec.copy_(mean)
        sae.cfg.metadata.model_name = "gpt2"
        sae.cfg.metadata.hook_name = HOOK
        sae.cfg.metadata.model_from_pretrained_kwargs = TRAINED_WITH
        sae.cfg.metadata.context_size = 16
        sae.cfg.metadata.prepend_bos = False
        sae.save_model(ROOT / "sae")
    """
)

SUBPROCESS_TESTS = textwrap.dedent(
    """
    import json

    import pytest
    import torch
    from conftest import PROCESSED, TRAINED_WITH, sae_lens_metrics
    from transformer_lens import HookedTransformer

    from pytest_saecheck.loading import PROCESSING_FLAGS, TL_LOADER

    pytestmark = pytest.mark.saecheck(sae="sae", tokens="tokens.npy", n_tokens=512, batch_size=8, exclude_bos=False)


    def close(ours, theirs):
        # On this random model zero ablation barely changes the loss, so the ratio scores are undefined
        # (not resolved from zero); the CEs they are built from are compared.
        assert set(theirs) - set(ours) <= {"ce_loss_score", "kl_div_score"}, set(theirs) - set(ours)
        return {
            name: (ours[name], theirs[name])
            for name in theirs
            if name in ours and abs(ours[name] - theirs[name]) > 1e-4 * max(1.0, abs(theirs[name]))
        }


    def test_as_trained_equals_run_evals_on_no_processing(saecheck):
        ours = saecheck.metrics
        assert saecheck.model_spec == "gpt2"  # named by the SAE config
        load = saecheck.model_loading
        assert load.loader == TL_LOADER
        assert dict(load.kwargs) == {**{flag: False for flag in PROCESSING_FLAGS}, **TRAINED_WITH, "dtype": "float32"}
        unprocessed = sae_lens_metrics(HookedTransformer.from_pretrained_no_processing("gpt2", **TRAINED_WITH), saecheck.tokens)
        assert not close(ours, unprocessed)
        processed = sae_lens_metrics(HookedTransformer.from_pretrained("gpt2"), saecheck.tokens)
        assert ours["explained_variance"] > 0.5
        assert ours["explained_variance"] - processed["explained_variance"] > 0.2
        assert ours["mse"] < 0.5 * processed["mse"]


    @pytest.mark.saecheck(model_from_pretrained_kwargs=PROCESSED)
    def test_the_setting_overrides_the_sae_kwargs(saecheck):
        ours = saecheck.metrics
        assert saecheck.model_loading.loader == TL_LOADER
        assert {k: saecheck.model_loading.kwargs[k] for k in PROCESSED} == PROCESSED
        processed = sae_lens_metrics(HookedTransformer.from_pretrained("gpt2"), saecheck.tokens)
        assert not close(ours, processed)
        assert saecheck._cache.loads["model"] == 2  # the kwargs are part of the model's cache key
    """
)


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_offline_hub(tmp_path_factory.mktemp("hf_home"))


def test_gpt2_from_an_offline_cache_is_loaded_as_trained(
    pytester: pytest.Pytester, offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply_offline_hub_env(offline_hub, monkeypatch)
    pytester.makeconftest(SUBPROCESS_CONFTEST)
    pytester.makepyfile(test_as_trained=SUBPROCESS_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-s", "--saecheck-json=result.json", "-W", "ignore"
    )
    result.assert_outcomes(passed=2)
    document = json.loads((pytester.path / "result.json").read_text())
    loads = sorted(
        (entry["model"]["loading"]["loader"], entry["model"]["loading"]["kwargs"]["center_writing_weights"])
        for entry in document["saes"]
    )
    assert loads == [
        ("HookedTransformer.from_pretrained_no_processing", False),
        ("HookedTransformer.from_pretrained_no_processing", True),
    ]
