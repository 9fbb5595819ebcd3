"""Files: atomic writes, paths given as options or ini keys, and installed package versions.

Pure standard library; shared by the report writer and the baseline store.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The text goes to a temporary file in the same directory (same file system), is flushed to disk, and
    replaces ``path`` in one ``os.replace``. If anything fails (or the process is killed) before that, ``path``
    is untouched and the temporary file is removed (or, after a kill, left as a hidden ``.*.tmp`` file).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(OSError):
            os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


def option_path(config: pytest.Config, option: str) -> Path | None:
    """The path given by the command-line option ``option`` (relative to the invocation directory), else by the
    ini key of the same name (relative to the ini file's directory), else None."""
    value = config.getoption(option, default=None)
    if value:
        return Path(config.invocation_params.dir, os.path.expanduser(str(value)))
    try:
        ini = config.getini(option)
    except ValueError:
        return None
    if isinstance(ini, list):
        ini = " ".join(ini)
    if not ini or not str(ini).strip():
        return None
    base = config.inipath.parent if config.inipath is not None else config.rootpath
    return Path(base, os.path.expanduser(str(ini).strip()))


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (from its metadata; imports nothing), or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
