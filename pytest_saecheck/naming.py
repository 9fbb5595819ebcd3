"""Short display names for specs (test ids, table rows, report labels). Pure standard library."""

from __future__ import annotations

import os


def short_id(spec: str) -> str:
    """A short name for a model, SAE or token spec in test ids and tables: a local path's last component.

    A spec that is a path (absolute, ``./``, ``../``, ``~``, or an existing file or directory) becomes its last
    component (``/data/runs/run-42/`` -> ``run-42``); anything else (``gpt2``, ``release/id``, ``hf:...``,
    ``demo/good``) is returned as it is.
    """
    text = str(spec)
    path = os.path.expanduser(text)
    path_like = os.path.isabs(path) or text.startswith(("./", "../", ".\\", "..\\", "~"))
    if not path_like and not os.path.exists(path):
        return text
    return os.path.basename(os.path.normpath(path)) or text
