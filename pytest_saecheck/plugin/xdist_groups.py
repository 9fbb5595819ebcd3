"""Which saecheck tests share a pytest-xdist group, and how the group travels with a test's node id.

One SAE's tests (one release group's, when SAEs are evaluated together) form one group: under ``--dist
loadgroup`` as ``xdist_group`` marks, under ``--dist load`` (what ``-n N`` implies) as an ``@<group>`` suffix of
the node ids a worker reports (read by :mod:`pytest_saecheck.plugin.xdist`'s scheduler). Imports neither
pytest-xdist nor torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Generator
from typing import Any

import pytest

from pytest_saecheck.errors import ConfigError
from pytest_saecheck.naming import joined
from pytest_saecheck.plugin import settings as settings_config
from pytest_saecheck.plugin.settings import release_group_key

XDIST_GROUP_KEY = pytest.StashKey[str]()
"""A worker's test's group under ``--dist load`` (suffixed to its node id while the collection is reported)."""
XDIST_GROUPS_INPUT = "saecheck_xdist_groups"
"""Set by ``xdist.pytest_configure_node`` in a worker's ``workerinput``: the controller schedules by group."""
SAE_FIXTURES = frozenset({"saecheck", "saecheck_sae", "saecheck_model", "saecheck_tokens"})
"""The fixtures that load an SAE: tests using one of them are grouped per SAE under pytest-xdist."""


@contextlib.contextmanager
def ids_with_groups(items: list[pytest.Item]) -> Generator[None, None, None]:
    changed: list[tuple[pytest.Item, str, Any]] = []
    try:
        for item in items:
            group = item.stash.get(XDIST_GROUP_KEY, None)
            if group is None:
                continue
            suffixed = f"{item.nodeid}@{group}"
            identity = getattr(item, "_id", None)
            parse = getattr(type(identity), "parse", None)
            if callable(parse):  # pytest 9 keeps a NodeId in Item._id
                attribute, value = "_id", parse(suffixed)
            elif "_nodeid" in vars(item):  # earlier pytest: a string in Item._nodeid
                attribute, value = "_nodeid", suffixed
            else:
                continue  # a pytest that keeps the id elsewhere: these tests are load-balanced one by one
            changed.append((item, attribute, getattr(item, attribute)))
            setattr(item, attribute, value)
        yield
    finally:
        for item, attribute, previous in changed:
            setattr(item, attribute, previous)


def suffix_xdist_groups(items: list[pytest.Item]) -> None:
    """Make sure each grouped test's node id ends in ``@<group>``, which is what ``--dist loadgroup`` schedules by.

    pytest-xdist appends it by assigning ``Item._nodeid``; pytest versions that keep the node id elsewhere (a
    ``NodeId`` in ``Item._id``) ignore that assignment, and every group would be spread over the workers.
    """
    for item in items:
        names = sorted(
            {
                str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                for mark in item.iter_markers("xdist_group")
            }
        )
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix):
            continue
        identity = getattr(item, "_id", None)
        parse = getattr(type(identity), "parse", None)
        if callable(parse):
            item._id = parse(item.nodeid + suffix)


def group_name(settings: settings_config.SAECheckSettings) -> str:
    """The pytest-xdist group of a test's SAE: its release group when SAEs are evaluated together (every setting
    but the SAE), else its spec (and model), as characters safe in a node id suffix."""
    sae = joined(settings.sae)
    if isinstance(settings.sae, str) and settings.splice == "separate" and settings.release_group_mib != 0:
        key: str | None = repr(release_group_key(settings))
        slug = "release"
    else:
        key = sae if settings.model is None else f"{sae}@{settings.model}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings_config.short_id(sae or "none"))[:40]
    return f"saecheck-{slug}-{hashlib.sha1(str(key).encode()).hexdigest()[:8]}"


def sae_groups(config: pytest.Config, items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """The xdist group of every test that uses an SAE fixture and has an SAE (not one the user grouped).

    Release groups that would leave workers unevenly loaded (one release alone, or one far bigger than the
    others) are cut into chunks by the cost model (:func:`pytest_saecheck.plugin.schedule.worker_chunks`), each
    chunk a group of its own; the chunks are kept in the session cache, and each worker's release passes stay
    within its chunk.
    """
    from pytest_saecheck.plugin import schedule
    from pytest_saecheck.plugin.fixtures import session_cache

    groups = {}
    members: dict[pytest.Item, tuple[Any, str]] = {}
    others: dict[str, tuple[settings_config.SAECheckSettings, list[str]]] = {}
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue  # the user grouped it
        if not SAE_FIXTURES & set(getattr(item, "fixturenames", ())):
            continue
        try:
            settings = settings_config.resolve_for_item(item)
        except ConfigError:
            continue
        if settings.sae is not None:
            groups[item] = group_name(settings)
            if "-release-" in groups[item] and isinstance(settings.sae, str):
                members[item] = (release_group_key(settings), settings.sae)
            else:
                specs = [settings.sae] if isinstance(settings.sae, str) else list(settings.sae)
                others.setdefault(groups[item], (settings, specs))
    releases: dict[Any, list[str]] = {}
    for key, spec in sorted(members.values(), key=repr):  # in an order independent of the collection's
        releases.setdefault(key, []).append(spec)
    workers = int((getattr(config, "workerinput", None) or {}).get("workercount", 1))
    chunks = schedule.worker_chunks(releases, [others[name] for name in sorted(others)], workers)
    session_cache(config).release_chunks = chunks
    for item, member in members.items():
        if member in chunks:
            groups[item] = f"{groups[item]}-{chunks[member]}"
    return groups


def group_by_sae(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item, group in sae_groups(config, items).items():
        item.add_marker(pytest.mark.xdist_group(group))


__all__ = [
    "SAE_FIXTURES",
    "XDIST_GROUPS_INPUT",
    "XDIST_GROUP_KEY",
    "group_by_sae",
    "group_name",
    "ids_with_groups",
    "sae_groups",
    "suffix_xdist_groups",
]
