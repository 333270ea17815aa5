"""The SSH device: a Jetson, a Pi or any POSIX machine, reached with the system ``ssh`` client.

Every call is one ``ssh`` process started from an argv list (never a local shell). The remote side
does run a shell (sshd hands the command string to the login shell), so every remote argument is
quoted with ``shlex.quote``; file names travel only as quoted words or as data, never as code.

Security and robustness choices, all in :meth:`SshTransport.ssh_argv`:

- host key checking stays on: ``StrictHostKeyChecking=yes`` against the user's known_hosts (or the
  file passed as ``known_hosts``); an unknown or changed host key is a ``DeviceError``, never a prompt
  and never an automatic accept;
- ``BatchMode=yes``: nothing ever prompts (no password, no passphrase, no host-key question);
- ``ConnectTimeout`` and ``ServerAliveInterval``/``CountMax``: an unreachable host fails in seconds and
  a dropped link is noticed in ~15 s instead of hanging on TCP timeouts;
- one connection for all calls (``ControlMaster=auto`` with a socket in a private local temp dir,
  ``ControlPersist=60``): a bench makes ~10 calls per artifact, and a key exchange costs 0.1-1 s on a
  small board. ``cleanup()`` closes the master (``ssh -O exit``); if the link drops, the next call
  finds no master and connects afresh (or fails with the reason).

Files are streamed through the ssh channel (``cat > FILE`` with the file on stdin, ``cat FILE`` back)
rather than with ``scp``: scp interprets remote paths differently in its SFTP mode (the default since
OpenSSH 9.0: glob patterns are expanded) and in its legacy mode (``-O``: a remote shell parses them), so
hostile names would need two different escapings depending on the client's version. ``cat`` over ssh
needs only the shell quoting above and works against any remote with a POSIX shell (BusyBox included).

A command that times out has its local ``ssh`` killed; without a pty the remote process is not
signalled and may run on until it next writes (``cleanup()`` still removes its files).

``ssh`` exits with 255 when the connection fails (refused, timed out, host key, authentication,
dropped); that becomes a one-line ``DeviceError`` naming the cause and the fix. A remote command that
itself exits 255 is reported the same way (ssh cannot tell them apart).

torch-free.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import IO

from edgeq.devices.transport import RunResult, check_argv, check_remote, last_line, partial_file, push_pairs
from edgeq.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

SSH_CONNECTION_ERROR = 255  # ssh's exit status for its own failures
CONTROL_TIMEOUT_S = 60.0  # mktemp, rm: small commands that must not hang
WORKDIR_PREFIX = "edgeq-"
_MKTEMP_XS = "XXXXXXXXXX"
#: Characters ssh's option parser expands or splits on in file-name options (% tokens, ${ENV}, quotes).
_OPTION_UNSAFE = set('"\\$%')

_CAUSES = (  # (stderr fragment, hint); the first that matches names the fix
    (
        ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED", "host key is known"),
        "the device's host key is not in known_hosts or does not match it: verify the fingerprint, then add "
        "it (ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts) or pass --known-hosts FILE",
    ),
    (
        ("Permission denied", "Too many authentication failures"),
        "authentication failed: pass --identity KEY or install your public key on the device (ssh-copy-id)",
    ),
    (
        ("Could not resolve hostname", "Name or service not known"),
        "the host name does not resolve: check --host",
    ),
    (
        ("Connection refused", "timed out", "No route to host", "Network is unreachable"),
        "the device is unreachable: check it is on, the address and --port, and that sshd runs on it",
    ),
)
_DROPPED_HINT = "the connection dropped: check the network and the device, then rerun (finished work is kept)"


def ssh_failure(target: str, what: str, stderr: str) -> DeviceError:
    """The ``DeviceError`` for an ssh exit status 255: what failed, ssh's message, and the fix."""
    hint = _DROPPED_HINT
    for fragments, cause_hint in _CAUSES:
        if any(f in stderr for f in fragments):
            hint = cause_hint
            break
    line = last_line(stderr.replace("\r", "")) or "no message"
    return DeviceError(f"ssh to {target.removeprefix('ssh://')} failed while {what} (ssh exit 255: {line}); {hint}")


def check_host(host: str) -> str:
    """``[user@]address`` that cannot be read as an ssh option or split into two words."""
    if not isinstance(host, str) or not host or host.startswith("-") or any(c.isspace() or ord(c) < 32 for c in host):
        raise ConfigError(
            f"ssh host {host!r} is invalid; expected [user@]address such as pi@192.168.1.20 "
            "(no spaces, not starting with '-')"
        )
    return host


def option_path(path: str | os.PathLike, what: str) -> str:
    """An absolute file path that ssh passes through unchanged (no %-tokens, ${ENV} or quotes to expand)."""
    text = str(Path(path).expanduser().resolve())
    if any(c in _OPTION_UNSAFE or ord(c) < 32 for c in text):
        raise ConfigError(
            f'{what} {text!r} contains a character ssh would expand (" \\ $ % or a control character); '
            "use a path without them (a symlink will do)"
        )
    if not Path(text).is_file():
        raise ConfigError(f"{what} {text!r} does not exist; expected a file")
    return text


def _check_base_dir(base_dir: str) -> str:
    base = PurePosixPath(base_dir)
    if not base.is_absolute() or any(ord(c) < 32 for c in base_dir):
        raise ConfigError(f"device work dir {base_dir!r} is invalid; expected an absolute path such as '/tmp'")
    return str(base)


class SshTransport:
    """A transport onto ``host`` (``[user@]address``; ssh_config aliases work) through ``ssh``.

    ``base_dir``: where the remote temp dir is created (``mktemp -d BASE/edgeq-XXXXXXXXXX``, on first
    use). ``known_hosts``: a known_hosts file to check the host key against (default: the user's).
    ``transfer_timeout_s``: limit per file copy (None: none; a dead link is still caught by keepalives).
    """

    name = "ssh"

    def __init__(
        self,
        host: str,
        *,
        port: int | None = None,
        identity: str | os.PathLike | None = None,
        known_hosts: str | os.PathLike | None = None,
        base_dir: str = "/tmp",
        connect_timeout_s: float = 10.0,
        transfer_timeout_s: float | None = None,
        ssh: str = "ssh",
        multiplex: bool = True,
    ) -> None:
        self.host = check_host(host)
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ConfigError(f"ssh port {port!r} is invalid; expected an integer in [1, 65535]")
        self.port = port
        self.identity = None if identity is None else option_path(identity, "ssh identity file")
        self.known_hosts = None if known_hosts is None else option_path(known_hosts, "known_hosts file")
        self.base_dir = _check_base_dir(base_dir)
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._ssh = ssh
        self.multiplex = multiplex
        self._mux_dir: str | None = None  # local private dir holding the ControlMaster socket
        self._workdir: str | None = None
        self._closed = False
        #: The remote temp dir a failed ``cleanup`` could not remove (the bench driver records it).
        self.leftover_workdir: str | None = None

    @property
    def target(self) -> str:
        """Where this transport goes, as recorded in results (``ssh://user@host:port``)."""
        return f"ssh://{self.host}" + (f":{self.port}" if self.port else "")

    def _control_path(self) -> str | None:
        """The ControlMaster socket (its private dir made on first use), or None without multiplexing."""
        if not self.multiplex:
            return None
        if self._mux_dir is None:
            mux_dir = tempfile.mkdtemp(prefix="edgeq-ssh-")  # mode 0700: only this user reaches the socket
            if len(mux_dir) > 80 or any(c in _OPTION_UNSAFE or c.isspace() for c in mux_dir):
                log.debug("no ssh multiplexing: temp dir %r is unfit for a socket path", mux_dir)
                os.rmdir(mux_dir)
                self.multiplex = False
                return None
            self._mux_dir = mux_dir
        return f"{self._mux_dir}/master"

    def ssh_argv(self, command: str) -> list[str]:
        """The ``ssh`` argv that runs the remote shell ``command`` (already quoted) on the device."""
        return [*self._options(), "--", self.host, command]

    def _options(self) -> list[str]:
        argv = [self._ssh, "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        argv += ["-o", f"ConnectTimeout={max(1, math.ceil(self.connect_timeout_s))}"]
        argv += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if self.known_hosts:
            argv += ["-o", f'UserKnownHostsFile="{self.known_hosts}"']
        if self.identity:
            argv += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.port:
            argv += ["-p", str(self.port)]
        control = self._control_path()
        if control:
            argv += ["-o", "ControlMaster=auto", "-o", f'ControlPath="{control}"', "-o", "ControlPersist=60"]
        return argv

    def _close_master(self) -> None:
        """Stop the ControlMaster connection (if one runs) and remove its socket dir."""
        if self._mux_dir is None:
            return
        if os.path.exists(f"{self._mux_dir}/master"):
            argv = [*self._options(), "-O", "exit", "--", self.host]
            try:
                subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("could not stop the ssh master connection to %s (%s)", self.target, exc)
        shutil.rmtree(self._mux_dir, ignore_errors=True)
        self._mux_dir = None

    def _call(
        self,
        command: str,
        what: str,
        timeout: float | None,
        stdin: IO[bytes] | int = subprocess.DEVNULL,
        stdout: IO[bytes] | int = subprocess.PIPE,
    ) -> RunResult:
        argv = self.ssh_argv(command)
        log.debug("ssh: %s", argv)
        try:
            proc = subprocess.run(
                argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise DeviceError(
                f"ssh client {self._ssh!r} not found; install OpenSSH's client (Debian/Ubuntu: apt-get install openssh-client)"
            ) from None
        except subprocess.TimeoutExpired:
            raise DeviceError(
                f"{what} on {self.target} timed out after {timeout} s; check the device, raise the timeout or shrink the plan"
            ) from None
        err = proc.stderr.decode("utf-8", errors="replace")
        if proc.returncode == SSH_CONNECTION_ERROR:
            raise ssh_failure(self.target, what, err)
        out = proc.stdout.decode("utf-8", errors="replace") if isinstance(proc.stdout, bytes) else ""
        return RunResult(proc.returncode, out, err)

    # -- the work dir ------------------------------------------------------------------------------------

    def is_own_workdir(self, path: str) -> bool:
        """Whether ``path`` is a temp dir this kind of transport creates under ``base_dir``."""
        prefix = str(PurePosixPath(self.base_dir) / WORKDIR_PREFIX)
        return re.fullmatch(re.escape(prefix) + rf"[A-Za-z0-9]{{{len(_MKTEMP_XS)}}}", path) is not None

    @property
    def workdir(self) -> str:
        if self._closed:
            raise DeviceError(f"ssh transport to {self.target} was cleaned up; open a new SshTransport")
        if self._workdir is None:
            template = str(PurePosixPath(self.base_dir) / (WORKDIR_PREFIX + _MKTEMP_XS))
            rc, out, err = self._call(f"mktemp -d {shlex.quote(template)}", "creating its temp dir", CONTROL_TIMEOUT_S)
            path = out.strip()
            if rc != 0 or not self.is_own_workdir(path):
                raise DeviceError(
                    f"cannot create a temp dir under {self.base_dir!r} on {self.target} (mktemp exit {rc}: "
                    f"{last_line(err) or path!r}); check the profile's workdir exists and is writable"
                )
            self._workdir = path
            log.info("work dir on %s: %s", self.target, path)
        return self._workdir

    def _remote(self, remote: str | PurePosixPath) -> str:
        return str(PurePosixPath(self.workdir) / check_remote(str(remote)))

    # -- the protocol ------------------------------------------------------------------------------------

    def push(self, local: str | os.PathLike, remote: str) -> str:
        pairs = push_pairs(local, remote)
        for path, dest in pairs:
            dest_abs = PurePosixPath(self._remote(dest))
            command = f"mkdir -p -- {shlex.quote(str(dest_abs.parent))} && cat > {shlex.quote(str(dest_abs))}"
            with open(path, "rb") as f:
                rc, _, err = self._call(command, f"pushing {path.name!r}", self.transfer_timeout_s, stdin=f)
            if rc != 0:
                raise DeviceError(
                    f"cannot write {str(dest)!r} on {self.target} (exit {rc}: {last_line(err) or 'no message'}); "
                    f"check free space and permissions under {self.base_dir!r}"
                )
        return self._remote(remote)

    def pull(self, remote: str, local: str | os.PathLike) -> str:
        src = self._remote(remote)
        with partial_file(local) as part:
            with open(part, "wb") as f:
                rc, _, err = self._call(
                    f"cat -- {shlex.quote(src)}", f"pulling {remote!r}", self.transfer_timeout_s, stdout=f
                )
            if rc != 0:
                raise DeviceError(
                    f"cannot pull {remote!r} from {self.target} (exit {rc}: {last_line(err) or 'no message'}); "
                    "did the command write it?"
                )
        return str(Path(local))

    def run(self, argv: Sequence[str], timeout: float | None = None) -> RunResult:
        args = check_argv(argv)
        command = f"cd {shlex.quote(self.workdir)} && exec {shlex.join(args)}"
        return self._call(command, f"running {args[0]!r}", timeout)

    def remove_stale_workdir(self, path: str) -> bool:
        """Remove a temp dir an earlier, interrupted bench left behind; refuses anything else."""
        if not self.is_own_workdir(path):
            log.warning("not removing %r on %s: not an edgeq temp dir under %s", path, self.target, self.base_dir)
            return False
        rc, _, err = self._call(f"rm -rf -- {shlex.quote(path)}", "removing an old temp dir", CONTROL_TIMEOUT_S)
        if rc != 0:
            log.warning("could not remove %s on %s: %s", path, self.target, last_line(err))
        return rc == 0

    def cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        workdir, self._workdir = self._workdir, None
        try:
            if workdir is None:
                return
            try:
                rc, _, err = self._call(f"rm -rf -- {shlex.quote(workdir)}", "removing its temp dir", CONTROL_TIMEOUT_S)
            except DeviceError:
                self.leftover_workdir = workdir
                raise
            if rc != 0:
                self.leftover_workdir = workdir
                raise DeviceError(
                    f"cannot remove the temp dir {workdir!r} on {self.target} (exit {rc}: {last_line(err)}); "
                    "remove it by hand"
                )
        finally:
            self._close_master()

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.cleanup()
        except DeviceError as err:
            if exc_type is None:
                raise
            log.warning("%s", err)
