"""Short display names for specs (test ids, table rows, report labels). Pure standard library."""

from __future__ import annotations

import os


def short_id(spec: str) -> str:
    """A short name for a model, SAE or token spec in test ids and tables: a local path's last component.

    A spec written as a path (absolute, ``./``, ``../``, ``~``) becomes its last component
    (``/data/runs/run-42/`` -> ``run-42``); anything else (``gpt2``, ``release/id``, ``saes/L2``, ``hf:...``,
    ``demo/good``) is returned as it is. It reads only the text, never the file system, so test ids and
    baseline file names do not depend on the directory pytest starts in.
    """
    text = str(spec)
    path = os.path.expanduser(text)
    path_like = os.path.isabs(path) or text.startswith(("./", "../", ".\\", "..\\", "~"))
    if not path_like:
        return text
    return os.path.basename(os.path.normpath(path)) or text
