"""Files: atomic writes, commits of several files at once, run locks, paths given as options or ini keys, and
installed package versions.

Standard library plus ``filelock`` (imported when a lock is taken); shared by the report writer and the
baseline store. What these guarantee is stated in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The text goes to a temporary file in the same directory (same file system), is flushed to disk, and
    replaces ``path`` in one ``os.replace``. If anything fails (or the process is killed) before that, ``path``
    is untouched and the temporary file is removed (or, after a kill, left as a hidden ``.*.tmp`` file).
    """
    target = Path(path)
    temporary = _temporary_beside(target, text)
    try:
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


def _temporary_beside(target: Path, text: str) -> Path:
    """``text`` written and flushed to disk in a new hidden temporary file in ``target``'s directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(OSError):
            os.chmod(temporary, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return Path(temporary)


@dataclass
class Written:
    """The outcome of one file of a :func:`commit_files`: ``error`` is ``None`` when it was written."""

    path: Path
    error: str | None = None
    removed_stale: bool = False


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, so a Ctrl-C cannot fall between steps that must happen
    together.

    A signal that arrives inside the block is recorded by a temporary handler and, once the previous handlers
    are back, handed to them (SIGINT's default raises ``KeyboardInterrupt``; SIGTERM's default ends the
    process). Python handles signals in the main thread only; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def record(signum: int, frame: Any) -> None:
        arrived.append(signum)

    previous = {number: signal.signal(number, record) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for signum in dict.fromkeys(arrived):
            handler = previous[signal.Signals(signum)]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def commit_files(files: Sequence[tuple[str | os.PathLike[str], str]]) -> list[Written]:
    """Write several files as one commit: every file to a temporary beside it first, then all replacements.

    Readers never see a file of this commit beside a file of an earlier one that the commit also wrote:

    - every text is written and flushed to disk before any target is replaced, so a full disk or another write
      error costs nothing already there;
    - the replacements (``os.replace``, atomic each) run back to back with SIGINT and SIGTERM held
      (:func:`signals_deferred`), so a Ctrl-C lands before or after all of them;
    - a file whose temporary could not be written is reported in its :class:`Written` (one line: the path and
      the error), the others are still written, and the failed file's previous version is removed (so it cannot
      be read as this commit's); a kill -9 between two replacements is the one case left, and readers detect it
      by the run id the files share (:func:`pytest_saecheck.report.files.check_pair`).

    Returns one :class:`Written` per file, in order. Raises nothing for an ``OSError``; other exceptions
    (``KeyboardInterrupt`` while the temporaries are written) propagate after the temporaries are removed.
    """
    results = [Written(Path(path)) for path, _ in files]
    temporaries: list[Path | None] = []
    try:
        for result, (_, text) in zip(results, files, strict=True):
            try:
                temporaries.append(_temporary_beside(result.path, text))
            except OSError as error:
                result.error = _describe(error)
                temporaries.append(None)
        with signals_deferred():
            for result, temporary in zip(results, temporaries, strict=True):
                if temporary is None:
                    with contextlib.suppress(OSError):
                        if result.path.is_file():
                            result.path.unlink()
                            result.removed_stale = True
                    continue
                try:
                    os.replace(temporary, result.path)
                except OSError as error:
                    result.error = _describe(error)
            temporaries = []
    finally:
        for temporary in temporaries:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
    return results


def _describe(error: OSError) -> str:
    """An ``OSError`` as one line: its message, without a traceback."""
    reason = error.strerror or str(error) or type(error).__name__
    name = error.filename if error.filename is not None else ""
    return f"{reason}: {name}" if name else reason


#: pytest's exit status when tests failed: also the status of a run whose results could not be recorded.
TESTS_FAILED = 1


def failed_exit_status(status: int) -> int:
    """The exit status of a run whose result could not be recorded (or cannot be trusted): 1 (pytest's "tests
    failed") when pytest would have exited 0 or 5 (no tests), else pytest's own status (a failure, an
    interruption or a usage error says more)."""
    return TESTS_FAILED if int(status) in (0, 5) else int(status)


class RunLock:
    """An exclusive lock that one live pytest run holds on an output path (a report file, a baseline
    directory) for the whole run, so that a second run aimed at the same path is refused instead of mixing its
    results with this one's.

    The lock is ``flock`` on a hidden file beside the path (``.NAME.saecheck-lock``, via ``filelock``); the
    operating system releases it when the process ends however it ends, so a crashed run never leaves a stale
    lock. The lock file itself stays (removing it would race with a run that is opening it).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.parent / f".{self.path.name}.saecheck-lock"
        self._lock: Any = None
        self._holder = ""

    def acquire(self) -> bool:
        """Take the lock without waiting: True when taken (or when no lock file can be made there: the write
        itself will then fail and say so), False when another live run holds it."""
        import filelock

        with contextlib.suppress(OSError):  # read first: a failed attempt empties the file
            self._holder = self.lock_path.read_text(encoding="utf-8").strip()
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(self.lock_path), timeout=0)
            lock.acquire()
        except filelock.Timeout:
            return False
        except OSError:
            return True
        self._lock = lock
        with contextlib.suppress(OSError):  # who holds it, for the refusal message of the next run
            self.lock_path.write_text(f"{os.getpid()}\n", encoding="utf-8")
        return True

    def holder(self) -> str:
        """The process id written by the run that holds the lock (read before the failed attempt)."""
        return self._holder or "unknown"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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
