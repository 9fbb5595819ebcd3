"""Short display names for specs (test ids, table rows, report labels). Pure standard library."""

from __future__ import annotations

import os

JOINT_SEPARATOR = " + "
"""Between the specs of SAEs spliced jointly, in one label (``"a/l4 + a/l8"``)."""


def joined(specs: str | tuple[str, ...] | None) -> str | None:
    """One label for one spec or several spliced jointly (:data:`JOINT_SEPARATOR` between them)."""
    return JOINT_SEPARATOR.join(specs) if isinstance(specs, tuple) else specs


def short_id(spec: str) -> str:
    """A short name for a model, SAE or token spec in test ids and tables: a local path's last component.

    A spec written as a path (absolute, ``./``, ``../``, ``~``) becomes its last component
    (``/data/runs/run-42/`` -> ``run-42``); anything else (``gpt2``, ``release/id``, ``saes/L2``, ``hf:...``,
    ``demo/good``) is returned as it is. It reads only the text, never the file system, so test ids and
    baseline file names do not depend on the directory pytest starts in. The specs of a joint splice
    (``"/runs/l4 + /runs/l8"``) are shortened one by one (``"l4 + l8"``).
    """
    text = str(spec)
    if JOINT_SEPARATOR in text:
        return JOINT_SEPARATOR.join(short_id(part) for part in text.split(JOINT_SEPARATOR))
    path = os.path.expanduser(text)
    path_like = os.path.isabs(path) or text.startswith(("./", "../", ".\\", "..\\", "~"))
    if not path_like:
        return text
    return os.path.basename(os.path.normpath(path)) or text
