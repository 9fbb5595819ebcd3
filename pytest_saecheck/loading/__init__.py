"""Loaders for models, SAEs and evaluation tokens, behind the ``pytest_saecheck_load_*`` hooks.

Spec resolution, after the ``pytest_saecheck_load_*`` hooks (a ``conftest.py``'s, then the plug-ins' defaults,
:mod:`pytest_saecheck.extensions`: the bundled demo's ``"demo"`` model and tokens and ``"demo/<name>"`` SAEs):

* model: an existing local directory holding a Hugging Face model (``config.json``); otherwise a
  TransformerLens model name (``"gpt2"``, ``"EleutherAI/pythia-70m"``).
* SAE: an existing local SAE Lens directory (``cfg.json`` + weights); otherwise an SAE Lens ``release/id`` pair,
  split at the first ``/``.
* tokens: ``"hf:<dataset>[?split=...&name=...&column=...]"`` (streamed); an existing local ``.txt``, ``.jsonl``,
  ``.parquet``, ``.npy`` or ``.pt`` file or a ``datasets.save_to_disk`` directory.

The built-in loaders run when every hook returns None. Torch and the model libraries are imported inside
functions only.

The package's modules, one job each: :mod:`.specs` (spec parsing and the defaults an SAE implies),
:mod:`.offline` (is the hub reachable), :mod:`.resolve` (hooks first, then built-ins), :mod:`.models`,
:mod:`.saes` and :mod:`.tokens` (the built-in loaders and file readers); :mod:`pytest_saecheck.validate`
checks what an artefact says before it is believed.
"""

from __future__ import annotations

from pytest_saecheck.loading.clt import (
    CLT_RELEASE_CONVERTERS,
    clt_directory_format,
    load_clt_directory,
    load_clt_release,
)
from pytest_saecheck.loading.models import (
    HF_DIRECTORY_LOADER,
    HOOK_LOADER,
    PROCESSING_FLAGS,
    TL_LOADER,
    LoadedModel,
    ModelLoad,
    builtin_load_model,
    builtin_load_model_recorded,
    equivalent_load_kwargs,
    load_hf_directory,
    load_hf_model,
    load_model,
    load_model_recorded,
    load_transformer_lens_model,
    model_loader_kwargs,
    usable_tokenizer,
)
from pytest_saecheck.loading.offline import (
    hub_offline,
    is_unavailable_error,
    offline_state,
    quiet_deprecations,
)
from pytest_saecheck.loading.saes import (
    DICTIONARY_LEARNING_WEIGHTS,
    SPARSIFY_WEIGHTS,
    builtin_load_sae,
    load_sae,
    load_sae_directory,
    load_sae_release,
    load_sparsify_directory,
    sae_directory_format,
    safe_keys,
)
from pytest_saecheck.loading.specs import (
    DEFAULT_CONTEXT_SIZE,
    absolute_path,
    default_context_size,
    default_model_spec,
    default_token_source,
    local_path,
    looks_like_path,
    prepend_bos,
    sae_metadata,
    split_release,
)
from pytest_saecheck.loading.tokens import (
    TEXT_COLUMNS,
    TOKEN_COLUMNS,
    as_token_tensor,
    builtin_load_tokens,
    hf_documents,
    load_tokens,
    local_documents,
    n_sequences_for,
    pack_documents,
)
from pytest_saecheck.validate import (
    ARTEFACT_MODEL_KWARGS,
    KNOWN_LOADER_BUGS,
    artefact_model_kwargs,
    check_loaded,
    check_sparsity,
    validate_sae_config,
)

__all__ = [
    "ARTEFACT_MODEL_KWARGS",
    "CLT_RELEASE_CONVERTERS",
    "DEFAULT_CONTEXT_SIZE",
    "DICTIONARY_LEARNING_WEIGHTS",
    "HF_DIRECTORY_LOADER",
    "HOOK_LOADER",
    "KNOWN_LOADER_BUGS",
    "PROCESSING_FLAGS",
    "SPARSIFY_WEIGHTS",
    "TEXT_COLUMNS",
    "TL_LOADER",
    "TOKEN_COLUMNS",
    "LoadedModel",
    "ModelLoad",
    "absolute_path",
    "artefact_model_kwargs",
    "as_token_tensor",
    "builtin_load_model",
    "builtin_load_model_recorded",
    "builtin_load_sae",
    "builtin_load_tokens",
    "check_loaded",
    "check_sparsity",
    "clt_directory_format",
    "default_context_size",
    "default_model_spec",
    "default_token_source",
    "equivalent_load_kwargs",
    "hf_documents",
    "hub_offline",
    "is_unavailable_error",
    "load_clt_directory",
    "load_clt_release",
    "load_hf_directory",
    "load_hf_model",
    "load_model",
    "load_model_recorded",
    "load_sae",
    "load_sae_directory",
    "load_sae_release",
    "load_sparsify_directory",
    "load_tokens",
    "load_transformer_lens_model",
    "local_documents",
    "local_path",
    "looks_like_path",
    "model_loader_kwargs",
    "n_sequences_for",
    "offline_state",
    "pack_documents",
    "prepend_bos",
    "quiet_deprecations",
    "sae_directory_format",
    "sae_metadata",
    "safe_keys",
    "split_release",
    "usable_tokenizer",
    "validate_sae_config",
]
