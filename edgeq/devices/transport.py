"""The one protocol every device speaks: push files, run a command, pull files, clean up.

A transport owns a work directory on the device. ``remote`` paths are relative to it (an absolute or
escaping path is refused), so a bench never writes outside the space it was given and ``cleanup()``
removes everything it pushed. Commands are argv lists, never shell strings: arguments such as file
names cannot be re-interpreted by a shell on either side. ``local``, ``ssh`` and ``adb`` implement it;
the bench driver is written once over this protocol.

torch-free and numpy-free: it runs on the host but must import fast and anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Protocol, runtime_checkable

from edgeq.errors import DeviceError


class RunResult(NamedTuple):
    """A finished command: exit status and its decoded stdout/stderr (unpacks as a 3-tuple)."""

    rc: int
    stdout: str
    stderr: str


@runtime_checkable
class Transport(Protocol):
    name: str  # "local" | "ssh" | "adb"

    @property
    def workdir(self) -> str:
        """The device-side work directory (absolute, in the device's path syntax)."""

    def push(self, local: str | os.PathLike, remote: str) -> str:
        """Copy a local file or directory to ``remote`` (relative to ``workdir``); its device path."""

    def run(self, argv: Sequence[str], timeout: float | None = None) -> RunResult:
        """Run ``argv`` with ``workdir`` as the working directory; DeviceError on timeout."""

    def pull(self, remote: str, local: str | os.PathLike) -> str:
        """Copy ``remote`` (relative to ``workdir``) to the local path ``local``; that path."""

    def cleanup(self) -> None:
        """Remove ``workdir`` and everything in it. Safe to call twice."""


def check_remote(remote: str) -> PurePosixPath:
    """``remote`` as a relative path inside the work dir; refuses absolute paths and ``..`` escapes."""
    path = PurePosixPath(remote)
    if not remote or path.is_absolute() or ".." in path.parts:
        raise DeviceError(
            f"remote path {remote!r} is not inside the transport's work dir; expected a relative path "
            "without '..' such as 'artifact/model.gguf'"
        )
    return path


def check_argv(argv: Sequence[str]) -> list[str]:
    """A non-empty list of strings; a single shell string is refused (no shell is ever used)."""
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, (str, os.PathLike)) for a in argv):
        raise DeviceError(f"command {argv!r} is not an argv list; expected e.g. ['python', '-m', 'edgeq.runtime', ...]")
    return [os.fspath(a) for a in argv]


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (a runtime's one-line error), or '' when there is none."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def push_pairs(local: str | os.PathLike, remote: str) -> list[tuple[Path, PurePosixPath]]:
    """(local file, relative remote path) for every file a push of ``local`` to ``remote`` sends."""
    src, rel = Path(local), check_remote(remote)
    if src.is_dir():
        return [(p, rel / p.relative_to(src).as_posix()) for p in sorted(src.rglob("*")) if p.is_file()]
    if src.is_file():
        return [(src, rel)]
    raise DeviceError(f"cannot push {str(src)!r}: no such file or directory; check the path")


@contextmanager
def partial_file(local: str | os.PathLike) -> Iterator[Path]:
    """A ``.NAME.part`` path beside ``local``: renamed onto ``local`` when the block succeeds, removed
    otherwise, so an interrupted pull never leaves a file that looks complete."""
    dst = Path(local)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f".{dst.name}.part")
    try:
        yield part
        os.replace(part, dst)
    finally:
        part.unlink(missing_ok=True)
