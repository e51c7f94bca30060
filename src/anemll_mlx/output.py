"""One way every command writes its output: check the target first, build beside it, swap it in last.

Exports, compare results, probe reports and plots all go through here, because a user lost files
to ``export --out . --force`` (the old code built inside the target and then deleted it).  The rules:

- The target is checked before any work starts: not the working directory or a folder above it,
  not the source model nor a folder holding or inside it, not a mount point, not a symbolic link,
  a folder where a folder is asked for and a file where a file is, and its parent writable (tried
  for real: a temporary folder is made and removed, which also answers for read-only file systems
  and for root, whom permission bits do not stop).
- A folder is built under the hidden sibling name ``.NAME.partial-PID`` and renamed to the target
  only when complete; a file is written as ``.NAME.partial-PID.SUFFIX`` and renamed over it.  On any
  error or signal the partial is removed and the target is as it was.
- Nothing the program did not create is ever deleted.  A folder we write carries a marker file
  listing what we put in it; ``--force`` replaces an existing folder only when it is empty or holds
  nothing but what its marker lists, and names the strangers otherwise.  A file is replaced only
  with ``--force`` (the user named that very file).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import interrupts
from .errors import BadArgumentError, UserError

MARKER = ".anemll-mlx.json"


def _absolute(path: str | Path) -> Path:
    """Absolute and normalised, symbolic links kept (so a link can be seen as one)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _encloses(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Target:
    """What both kinds of output share: the checks and the partial's name."""

    path: Path  # absolute, as the user named it
    force: bool
    flag: str

    def _common_checks(self, protect: Iterable[str | Path | None]) -> None:
        real = self.path.resolve()
        shown = f"{self.flag} {self.path}"
        cwd = Path.cwd().resolve()
        if _encloses(real, cwd):
            raise BadArgumentError(
                f"{shown} is the working directory or a folder above it: name a new folder for the output"
            )
        for source in protect:
            if source is None:
                continue
            source = Path(source).expanduser().resolve()
            if _encloses(real, source):
                raise BadArgumentError(f"{shown} would replace the source model {source}")
            if source.is_dir() and _encloses(source, real):
                raise BadArgumentError(f"{shown} is inside the source model folder {source}")
        if self.path.is_symlink():
            raise BadArgumentError(f"{shown} is a symbolic link: name the real path")
        if self.path.exists() and os.path.ismount(self.path):
            raise BadArgumentError(f"{shown} is a mount point, which cannot be replaced: name a folder inside it")
        self._check_writable()

    def _check_writable(self) -> None:
        base = _nearest_existing(self.path.parent)
        if not base.is_dir():
            raise BadArgumentError(f"{self.flag} {self.path}: {base} is a file, not a folder")
        try:
            probe = base / f".{self.path.name}.check-{os.getpid()}"
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            raise UserError(f"{self.flag} {self.path}: cannot write in {base} ({e.strerror})") from None

    def _partial(self, suffix: str = "") -> Path:
        return self.path.parent / f".{self.path.name}.partial-{os.getpid()}{suffix}"

    def _sweep_stale(self) -> None:
        """Remove partials of this target left by runs that were killed outright (kill -9)."""
        for stale in self.path.parent.glob(f".{self.path.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1].split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _remove(stale)

    @contextmanager
    def _parents(self) -> Iterator[list[Path]]:
        """Create missing parent folders; remove the ones made here if the body fails."""
        made: list[Path] = []
        folder = self.path.parent
        while not folder.exists():
            made.append(folder)
            folder = folder.parent
        try:
            for folder in reversed(made):
                folder.mkdir()
            yield made
        except BaseException:
            with interrupts.deferred():
                for folder in made:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            raise


@dataclass(frozen=True)
class OutputFolder(_Target):
    """A folder output (an export, compare results, a QAT checkpoint, a KD cache)."""

    kind: str = "output"

    @classmethod
    def check(
        cls,
        path: str | Path,
        *,
        kind: str,
        force: bool = False,
        protect: Iterable[str | Path | None] = (),
        flag: str = "--out",
    ) -> OutputFolder:
        """Check ``path`` as a folder to be (re)written; raises a one-line error when it may not be."""
        target = cls(_absolute(path), force, flag, kind)
        shown = f"{flag} {target.path}"
        if target.path.exists() and not target.path.is_dir():
            raise BadArgumentError(f"{shown} is a file, not a folder")
        target._common_checks(protect)
        target._check_replaceable()
        return target

    def _check_replaceable(self) -> None:
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return
        if not self.force:
            raise BadArgumentError(f"{self.path} exists and is not empty: pass --force to replace it")
        strangers = foreign_entries(self.path)
        if strangers:
            listed = ", ".join(strangers[:4]) + (", ..." if len(strangers) > 4 else "")
            raise BadArgumentError(
                f"{self.flag} {self.path} holds files anemll-mlx did not write ({listed}): --force only "
                "replaces an earlier anemll-mlx output; choose another folder"
            )

    @contextmanager
    def build(self) -> Iterator[Path]:
        """Yield a fresh partial folder beside the target; on success it becomes the target."""
        with self._parents():
            self._sweep_stale()
            partial = self._partial()
            _remove(partial)
            partial.mkdir()
            try:
                yield partial
                with interrupts.deferred():
                    self._commit(partial)
            except BaseException:
                with interrupts.deferred():
                    _remove(partial)
                raise

    def _commit(self, partial: Path) -> None:
        """Mark the partial as ours and swap it in; the previous output is removed only after."""
        entries = sorted(p.name for p in partial.iterdir() if p.name != MARKER)
        (partial / MARKER).write_text(marker_text(self.kind, entries), encoding="utf-8")
        self._check_replaceable()  # again: files may have appeared in the target meanwhile
        if not self.path.exists() or not any(self.path.iterdir()):
            os.replace(partial, self.path)  # rename(2) replaces an empty folder in one step
            return
        previous = self.path.parent / f".{self.path.name}.replaced-{os.getpid()}"
        os.rename(self.path, previous)
        try:
            os.rename(partial, self.path)
        except BaseException:
            os.rename(previous, self.path)
            raise
        shutil.rmtree(previous, ignore_errors=True)


def marker_text(kind: str, entries: list[str]) -> str:
    """The marker file's text: what anemll-mlx put in a folder, so ``--force`` may replace it later.
    A folder grown in place (a KD cache, resumable shard by shard) rewrites it as it grows."""
    from . import __version__

    marker = {"written_by": "anemll-mlx", "version": __version__, "kind": kind, "entries": sorted(entries)}
    return json.dumps(marker, indent=2) + "\n"


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that its anemll-mlx marker does not list (all of them without a marker)."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    try:
        listed = set(json.loads((folder / MARKER).read_text(encoding="utf-8"))["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return names
    return [n for n in names if n not in listed]


@dataclass(frozen=True)
class OutputFile(_Target):
    """A single-file output (a probe report, a plot)."""

    @classmethod
    def check(
        cls, path: str | Path, *, force: bool = False, protect: Iterable[str | Path | None] = (), flag: str = "--out"
    ) -> OutputFile:
        target = cls(_absolute(path), force, flag)
        shown = f"{flag} {target.path}"
        if target.path.is_dir():
            raise BadArgumentError(f"{shown} is a folder; name a file")
        if target.path.exists() and not force:
            raise BadArgumentError(f"{target.path} exists: pass --force to replace it")
        target._common_checks(protect)
        return target

    @contextmanager
    def build(self) -> Iterator[Path]:
        """Yield a partial path (same suffix, so writers that go by it still do); renamed over the target."""
        with self._parents():
            self._sweep_stale()
            partial = self._partial(self.path.suffix)
            try:
                yield partial
                with interrupts.deferred():
                    os.replace(partial, self.path)
            except BaseException:
                with interrupts.deferred():
                    partial.unlink(missing_ok=True)
                raise

    def write_text(self, text: str) -> None:
        with self.build() as partial:
            partial.write_text(text, encoding="utf-8")
