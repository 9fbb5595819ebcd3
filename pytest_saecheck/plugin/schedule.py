"""Release scheduling in the plugin: the memory budget of a pass, shapes read from configs (no weights), the CI
shard a run keeps (``--saecheck-shard=K/N``) and the plan printed before any work (``--saecheck-plan``).

The cost of a pass and its grouping are :mod:`pytest_saecheck.engine.cost`'s (``pass_cost``, ``memory_groups``);
this module only feeds them what the plugin knows. Imports no torch at import time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_saecheck import extensions, loading
from pytest_saecheck.errors import SAECheckError
from pytest_saecheck.naming import short_id

if TYPE_CHECKING:
    from pytest_saecheck.engine.cost import ModelShape, SAEShape
    from pytest_saecheck.plugin.settings import SAECheckSettings


# -- memory ---------------------------------------------------------------------------------------------------


def free_memory_bytes(device: str) -> int | None:
    """The memory free for a pass on ``device`` now: CUDA's free memory (``torch.cuda.mem_get_info``) for a
    ``cuda`` device, ``MemAvailable`` of ``/proc/meminfo`` for any other (the host's RAM); None when unknown."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def budget_bytes(settings: SAECheckSettings, device: str, resident_bytes: int = 0) -> int | None:
    """The memory budget of one release pass: ``release_group_mib`` MiB, or with ``auto`` the device's free
    memory plus ``resident_bytes`` (the model's weights when they are already loaded there: the pass's cost counts
    them); None when ``auto`` finds no figure (then each pass holds what the evaluation cache keeps)."""
    if settings.release_group_mib is not None:
        return settings.release_group_mib * 2**20
    free = free_memory_bytes(device)
    return None if free is None else free + resident_bytes


# -- shapes from configs ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sae_config(spec: str) -> tuple[Path, Mapping[str, Any]] | None:
    """The ``cfg.json`` of an SAE Lens directory (a local one, or the directory a plug-in names for the spec) and its path, read without the
    weights; None for any other spec (a release id, a custom loader's, a cross-layer transcoder's directory)."""
    path = loading.local_path(spec)
    if path is None:  # a name a plug-in knows (the demo's "demo/<name>"): its directory, without the weights
        path = extensions.relay().pytest_saecheck_sae_directory(spec=spec)
    if path is None or not path.is_dir() or loading.sae_directory_format(path) != "sae_lens":
        return None
    cfg = _read_json(path / "cfg.json")
    return (path / "cfg.json", cfg) if isinstance(cfg, Mapping) else None


def sae_config_shape(spec: str, model: ModelShape, dtype: str | None) -> SAEShape | None:
    """One SAE's :class:`~pytest_saecheck.engine.cost.SAEShape` from its ``cfg.json`` (SAE Lens 6 nested
    ``metadata`` or the older flat layout; ``dtype`` the dtype setting, else the config's); None when ``spec``
    has no readable config (:func:`sae_config`) or it lacks the widths or the hook."""
    from pytest_saecheck.engine.cost import DTYPE_BYTES, sae_shape

    found = sae_config(spec)
    if found is None:
        return None
    _, cfg = found
    nested = cfg.get("metadata")
    metadata: Mapping[str, Any] = nested if isinstance(nested, Mapping) else {}

    def value(key: str) -> Any:
        return metadata.get(key, cfg.get(key))

    hook_out = value("hook_name_out") or value("hook_name")
    d_in, d_sae, d_out = cfg.get("d_in"), cfg.get("d_sae"), cfg.get("d_out")
    if not isinstance(hook_out, str) or not isinstance(d_in, int) or not isinstance(d_sae, int):
        return None
    named = str(dtype or cfg.get("dtype") or "float32").removeprefix("torch.")
    return sae_shape(
        model,
        d_in=int(d_in),
        d_sae=int(d_sae),
        hook_name_out=hook_out,
        d_out=d_out if isinstance(d_out, int) else None,
        dtype_bytes=DTYPE_BYTES.get(named, 4),
    )


def model_config_shape(spec: str | None, dtype: str | None) -> ModelShape | None:
    """The model's :class:`~pytest_saecheck.engine.cost.ModelShape` from its config, without its weights: the
    config a plug-in gives (the demo's recorded one), or a local Hugging Face directory's ``config.json``; None for any other spec."""
    from pytest_saecheck.engine.cost import model_shape_from_config

    if spec is None:
        return None
    path = loading.local_path(spec)
    if path is None:  # a model a plug-in knows (the demo's): its config, without the weights
        known = extensions.relay().pytest_saecheck_model_config(spec=spec)
        return model_shape_from_config(known, dtype) if isinstance(known, Mapping) else None
    if not (path / "config.json").is_file():
        return None
    config = _read_json(path / "config.json")
    return model_shape_from_config(config, dtype) if isinstance(config, Mapping) else None


def release_model_spec(settings: SAECheckSettings, first: str) -> str | None:
    """The model of a release from configs only: the ``model`` setting, a plug-in's default model for the SAE
    spec (the demo model for ``"demo/<name>"``), else None (the SAE's record names a hub model, whose config the plan does not fetch)."""
    if settings.model is not None:
        return settings.model
    return extensions.relay().pytest_saecheck_default_model(sae_spec=first, sae=None)


def context_size_of(settings: SAECheckSettings, first: str) -> int:
    """Tokens per sequence from configs only: the ``context_size`` setting, else the SAE config's, else the
    default (what :func:`pytest_saecheck.loading.default_context_size` gives a loaded SAE)."""
    from pytest_saecheck.defaults import DEFAULT_CONTEXT_SIZE

    if settings.context_size is not None:
        return settings.context_size
    found = sae_config(first)
    if found is not None:
        cfg = found[1]
        nested = cfg.get("metadata")
        metadata: Mapping[str, Any] = nested if isinstance(nested, Mapping) else {}
        recorded = metadata.get("context_size", cfg.get("context_size"))
        if isinstance(recorded, int) and recorded >= 2:
            return recorded
    return DEFAULT_CONTEXT_SIZE


# -- shards ---------------------------------------------------------------------------------------------------


def shard_units(
    items: Sequence[pytest.Item], resolve: Callable[[pytest.Item], Any]
) -> dict[tuple[str, ...], list[int]]:
    """The indices of ``items`` by the unit a shard keeps whole, units in a deterministic order (independent of
    the collection's order, which plugins such as pytest-randomly shuffle per run).

    A unit is one SAE of a release (every test of it), one joint splice, or one test without an SAE.
    ``resolve(item)`` gives a test's settings, raising for a malformed marker (the test is then a unit alone).
    """
    from pytest_saecheck.plugin.settings import release_group_key

    units: dict[tuple[str, ...], list[int]] = {}
    for index, item in enumerate(items):
        key: tuple[str, ...] = ("test", item.nodeid)
        if "saecheck" in getattr(item, "fixturenames", ()):
            try:
                settings = resolve(item)
            except (SAECheckError, TypeError, ValueError):
                settings = None
            if settings is not None and isinstance(settings.sae, str):
                key = ("sae", repr(release_group_key(settings)), settings.sae)
            elif settings is not None and settings.sae is not None:
                key = ("joint", repr(release_group_key(settings)), repr(settings.sae))
        units.setdefault(key, []).append(index)
    order = sorted(
        units, key=lambda key: (key[0] == "test", key[1:-1], min(items[i].nodeid for i in units[key]))
    )
    return {key: units[key] for key in order}


def shard_indices(weights: Sequence[float], n: int) -> list[int]:
    """The shard (0-based, of ``n``) of each unit, in order, each with its cost ``weights[i]``: contiguous runs
    balanced by cumulative cost (unit ``i`` goes to the shard its cost's midpoint falls in), so each release's
    SAEs stay runs of neighbours; units of zero weight go round-robin."""
    total = float(sum(weights))
    shards = []
    before = 0.0
    round_robin = 0
    for weight in weights:
        if weight > 0 and total > 0:
            shards.append(min(int(n * (before + weight / 2) / total), n - 1))
            before += weight
        else:
            shards.append(round_robin % n)
            round_robin += 1
    return shards


@dataclass(frozen=True)
class GroupCost:
    """One xdist group's work in the cost model's units: ``shared`` (the pass's original forward, paid once per
    pass, so once per chunk when the group is cut) and ``per_sae`` (each SAE's share, in the group's order);
    ``splittable``: a release group, which may be cut into chunks of its SAEs (any other group stays whole)."""

    shared: float
    per_sae: tuple[float, ...]
    splittable: bool = True


def chunk_costs(group: GroupCost, k: int) -> tuple[list[int], list[float]]:
    """``group`` cut into ``k`` contiguous chunks balanced by its SAEs' costs (:func:`shard_indices`): the chunk of
    each SAE and the cost of each chunk that holds any (its SAEs' costs plus its own ``shared`` forward)."""
    chunks = shard_indices(group.per_sae, k) if k > 1 else [0] * len(group.per_sae)
    sums: dict[int, float] = {}
    for chunk, cost in zip(chunks, group.per_sae, strict=True):
        sums[chunk] = sums.get(chunk, 0.0) + cost
    return chunks, [group.shared + sums[chunk] for chunk in sorted(sums)] or [group.shared]


def makespan(units: Iterable[float], workers: int) -> float:
    """The busiest worker's load when ``units`` of work go, largest first, each to the worker that is least
    loaded: the greedy list scheduling that pytest-xdist's scope scheduler approximates (it hands the next unit,
    largest first by tests, to the worker that runs out of work)."""
    loads = [0.0] * workers
    for unit in sorted(units, reverse=True):
        least = min(range(workers), key=loads.__getitem__)
        loads[least] += unit
    return max(loads)


def chunk_counts(groups: Sequence[GroupCost], workers: int) -> list[int]:
    """How many chunks each group is cut into so that ``workers`` are loaded evenly, by the cost model.

    Every group starts whole; each splittable group in turn takes the count (1 to ``min(SAEs, 2·workers)``) that
    lowers the :func:`makespan` of all units most, the others held, until no group changes. A cut pays its
    ``shared`` forward once more per chunk, so a group is cut only where that shortens the busiest worker's
    load (by more than one part in 10⁹); among equal loads the fewest chunks win, so groups that already balance
    the workers stay whole. Deterministic: every worker computes the same counts from the same collection.
    """
    counts = [1] * len(groups)
    if workers < 2:
        return counts
    units = [chunk_costs(group, 1)[1] for group in groups]
    scale = makespan((unit for chunks in units for unit in chunks), workers) or 1.0

    def score(trial: list[list[float]]) -> tuple[int, int]:
        span = makespan((unit for chunks in trial for unit in chunks), workers)
        return round(span / scale * 1e9), sum(len(chunks) for chunks in trial)

    best = score(units)
    changed = True
    while changed:  # every change lowers the (load, chunks) score, of which there are finitely many
        changed = False
        for index, group in enumerate(groups):
            if not group.splittable or len(group.per_sae) < 2:
                continue
            for k in range(1, min(len(group.per_sae), 2 * workers) + 1):
                trial = [*units[:index], chunk_costs(group, k)[1], *units[index + 1 :]]
                found = score(trial)
                if found < best:
                    best, units[index], counts[index], changed = found, trial[index], k, True
    return counts


def pass_flops(settings: SAECheckSettings, specs: Sequence[str]) -> tuple[float, list[float]] | None:
    """One pass of ``specs`` under ``settings`` in the cost model's FLOPs (:func:`~pytest_saecheck.engine.cost.
    pass_cost`, from configs): the shared forward and each SAE's share; None when the model's or an SAE's config
    cannot be read without loading."""
    from pytest_saecheck.engine.cost import pass_cost

    if not specs:
        return None
    model = model_config_shape(release_model_spec(settings, specs[0]), settings.dtype)
    if model is None:
        return None
    shapes = [sae_config_shape(spec, model, settings.dtype) for spec in specs]
    known = [shape for shape in shapes if shape is not None]
    if len(known) < len(shapes):
        return None
    seq_len = context_size_of(settings, specs[0])
    cost = pass_cost(model, known, settings.n_tokens, seq_len, settings.batch_size)
    return cost.flops_shared, list(cost.flops_per_sae)


def worker_chunks(
    releases: Mapping[Hashable, Iterable[str]],
    others: Sequence[tuple[SAECheckSettings, Sequence[str]]],
    workers: int,
) -> dict[tuple[Hashable, str], int]:
    """Under pytest-xdist: the chunk of each ``(release key, SAE spec)`` of the releases the cost model cuts
    (:func:`chunk_counts`; a release is cut into contiguous chunks of its sorted SAEs), ``{}`` when none is cut.

    ``releases``: each release group's key (its settings, less the SAE) and SAE specs; ``others``: every other
    xdist group, as the settings and SAE specs of its pass, kept whole. Costs come from
    :func:`pass_flops`; when any group's cannot be read from configs, every SAE weighs 1 and a pass's shared
    forward 0 (as :func:`select_shard` weighs them). Every worker computes the same chunks from the same
    collection.
    """
    if workers < 2:
        return {}
    ordered = {key: sorted(set(specs)) for key, specs in releases.items()}
    read: list[tuple[float, list[float]] | None] = [
        pass_flops(key, specs)  # type: ignore[arg-type]  # release_group_key: the settings less the SAE
        for key, specs in ordered.items()
    ] + [pass_flops(settings, specs) for settings, specs in others]
    sizes = [len(specs) for specs in ordered.values()] + [len(specs) for _, specs in others]
    if None in read:
        read = [(0.0, [1.0] * size) for size in sizes]
    groups = [
        GroupCost(shared, tuple(per_sae), splittable=index < len(ordered))
        for index, (shared, per_sae) in enumerate(cost for cost in read if cost is not None)
    ]
    chunks: dict[tuple[Hashable, str], int] = {}
    for (key, specs), group, count in zip(
        ordered.items(), groups, chunk_counts(groups, workers), strict=False
    ):
        if count > 1:
            chunks.update(zip(((key, spec) for spec in specs), chunk_costs(group, count)[0], strict=True))
    return chunks


def sae_unit_cost(settings: SAECheckSettings, spec: str) -> float | None:
    """A shard's weight of one SAE: the cost model's FLOPs of its share of a pass, from configs; None when its
    model's or its own config cannot be read without loading."""
    found = pass_flops(settings, [spec])
    return None if found is None else found[1][0]


def select_shard(config: pytest.Config, items: list[pytest.Item], k: int, n: int) -> None:
    """Keep the tests of shard ``k`` of ``n`` in ``items`` (the others are deselected, as ``-k`` does)."""
    from pytest_saecheck.plugin.settings import resolve_for_item

    units = shard_units(items, resolve_for_item)
    costs: dict[tuple[str, ...], float | None] = {
        key: sae_unit_cost(resolve_for_item(items[units[key][0]]), key[2]) for key in units if key[0] == "sae"
    }
    known = None not in costs.values()  # else every SAE weighs alike: one scale for all
    weights = [((costs[key] or 0.0) if known else 1.0) if key in costs else 0.0 for key in units]
    keep = {
        i
        for key, shard in zip(units, shard_indices(weights, n), strict=True)
        if shard == k - 1
        for i in units[key]
    }
    dropped = [item for i, item in enumerate(items) if i not in keep]
    items[:] = [item for i, item in enumerate(items) if i in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)


# -- the plan -------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The schedule of a run's releases: its lines (one per release and one per pass), the passes' FLOPs summed
    (the cost model's count), the number of passes and SAEs (and of SAEs refused as too big), and the shape of the matrix product that stands
    for a pass when no rate is recorded (rows of a batch, the model's width, its MLP's width; dtype, device)."""

    lines: list[str] = field(default_factory=list)
    flops: float = 0.0
    n_passes: int = 0
    n_saes: int = 0
    n_refused: int = 0
    product: tuple[int, int, int, str, str] | None = None


def tests_outside_releases(
    items: Sequence[pytest.Item], release_plan: Mapping[Hashable, Sequence[str]]
) -> int:
    """How many saecheck tests evaluate a subject outside the planned releases (their passes are not costed)."""
    from pytest_saecheck.plugin.settings import release_group_key, saecheck_items

    return sum(
        settings.sae not in release_plan.get(release_group_key(settings), ())
        for _, settings in saecheck_items(items)
    )


def plan_releases(
    release_plan: Mapping[Hashable, Sequence[str]], device: Callable[[SAECheckSettings], str], max_saes: int
) -> Plan:
    """The schedule of every planned release (``SessionCache.release_plan``: settings without the SAE → specs),
    from configs only: one line per release and one per pass (SAEs, peak memory, FLOPs)."""
    from pytest_saecheck.engine.cost import memory_groups, pass_cost, too_big

    plan = Plan()
    lines = plan.lines
    for key, specs in release_plan.items():
        settings: SAECheckSettings = key  # type: ignore[assignment]  # release_group_key: settings less the SAE
        first = specs[0]
        model_spec = release_model_spec(settings, first)
        model = model_config_shape(model_spec, settings.dtype)
        seq_len = context_size_of(settings, first)
        n_tokens = (settings.n_tokens // seq_len) * seq_len or seq_len
        head = (
            f"saecheck plan: {len(specs)} SAE{'s' if len(specs) != 1 else ''} on "
            f"{model_spec or 'the model their configs name'}, {n_tokens:,} tokens in rows of {seq_len}, "
            f"batch {settings.batch_size}"
        )
        if model is None:
            lines.append(
                f"{head}: the model's shape is not readable without loading it; passes formed at run time"
            )
            continue
        read = {spec: sae_config_shape(spec, model, settings.dtype) for spec in specs}
        known = {spec: shape for spec, shape in read.items() if shape is not None}
        unknown = [spec for spec in specs if spec not in known]
        budget = budget_bytes(settings, device(settings))
        refused = {}
        for spec, shape in known.items():
            reason = (
                None
                if budget is None
                else too_big(model, shape, n_tokens, seq_len, settings.batch_size, budget)
            )
            if reason is not None:
                refused[spec] = reason
        fitting = [spec for spec in known if spec not in refused]
        plan.n_refused += len(refused)
        shapes = [known[spec] for spec in fitting]
        if settings.release_group_mib == 0:
            groups = [[i] for i in range(len(fitting))]
        else:
            groups = memory_groups(
                model,
                shapes,
                n_tokens,
                seq_len,
                settings.batch_size,
                budget or 2**62,
                max_saes,
            )
        where = "no budget figure" if budget is None else f"budget {budget / 2**20:,.0f} MiB"
        plan.n_passes += len(groups)
        plan.n_saes += sum(map(len, groups))
        if plan.product is None:
            dtype = str(settings.dtype or "float32").removeprefix("torch.")
            plan.product = (
                settings.batch_size * seq_len,
                model.d_model,
                model.d_mlp,
                dtype,
                device(settings),
            )
        lines.append(f"{head}: {len(groups)} pass{'es' if len(groups) != 1 else ''} ({where})")
        for number, group in enumerate(groups, 1):
            cost = pass_cost(model, [shapes[i] for i in group], n_tokens, seq_len, settings.batch_size)
            plan.flops += cost.flops
            names = ", ".join(short_id(fitting[i]) for i in group)
            lines.append(
                f"  pass {number}/{len(groups)}: {len(group)} SAE{'s' if len(group) != 1 else ''} "
                f"(peak about {cost.peak_bytes / 2**20:,.1f} MiB, {cost.flops / 1e12:,.3g} TFLOP): {names}"
            )
        for spec, reason in refused.items():
            lines.append(f"  refused: {short_id(spec)} {reason}")
        if unknown:
            lines.append(
                f"  {len(unknown)} SAE{'s' if len(unknown) != 1 else ''} without a config readable before loading "
                f"(grouped when loaded): {', '.join(short_id(spec) for spec in unknown)}"
            )
    return plan
