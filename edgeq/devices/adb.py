"""The Android device: a phone reached with the system ``adb`` client (USB debugging or ``adb connect``).

Every call is one ``adb`` process from an argv list. ``adb push`` / ``adb pull`` send paths as data
over adb's sync protocol (no shell sees them); ``adb shell`` joins its arguments and hands them to the
device's ``sh``, so a shell command is built here as one string with every word ``shlex.quote``-d.

The device is chosen by serial (``-s``); without one, the only connected device in state ``device`` is
used, and none, several, or an unusable one (unauthorized, offline, no permissions) is a one-line
``DeviceError`` saying what to do. ``adb devices -l`` output is parsed by :func:`parse_devices`.

Exit statuses of remote commands need adb's shell protocol (Android 7+, adb 1.0.36+); older devices
report 0 for everything.

The first ``adb`` call starts the adb server (a daemon on ``server_port``, default 5037) if none runs;
it keeps running afterwards, as with any adb use. ``kill_server()`` stops it.

torch-free.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from edgeq.devices.transport import RunResult, check_argv, check_remote, last_line, partial_file, push_pairs
from edgeq.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 60.0
WORKDIR_PREFIX = "edgeq-"
_MKTEMP_XS = "XXXXXXXXXX"
NO_DEVICE = "no Android device connected (adb devices lists none); connect one with USB debugging or pass --serial"
_STATE_HINTS = {
    "unauthorized": "unlock the phone and accept its 'Allow USB debugging' prompt",
    "offline": "reconnect the cable or run `adb reconnect`",
    "no permissions": "give your user access to the USB device (udev rule for the vendor id) or run adb as root",
}
#: adb's own failures (as opposed to the remote command's): the device went away or never was there.
_ADB_FAILURE = re.compile(
    r"^(adb: )?error: (device .* not found|no devices/emulators found|device offline|device unauthorized|closed"
    r"|protocol fault|failed to get feature set|more than one device)",
    re.MULTILINE,
)
_PROP = re.compile(r"\s+([a-z_]+):(\S+)$")


class AdbDevice(NamedTuple):
    """One line of ``adb devices -l``: serial, state (device, unauthorized, offline, ...), properties."""

    serial: str
    state: str
    properties: dict[str, str]


def parse_devices(output: str) -> list[AdbDevice]:
    """The devices in ``adb devices -l`` output (daemon start-up chatter and the header are skipped)."""
    devices = []
    for raw in output.splitlines():
        line = raw.strip()
        if not line or line.startswith("*") or line.startswith("List of devices"):
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        serial, rest = parts
        props: dict[str, str] = {}
        while (m := _PROP.search(rest)) is not None:  # key:value tokens trail the (possibly spaced) state
            props = {m.group(1): m.group(2), **props}
            rest = rest[: m.start()]
        state = rest.strip()
        if state.startswith("no permissions"):
            state = "no permissions"
        devices.append(AdbDevice(serial, state, props))
    return devices


def select_device(devices: Sequence[AdbDevice], serial: str | None) -> str:
    """The serial to use: ``serial`` if it is connected and usable, else the only usable device."""
    listing = ", ".join(f"{d.serial} ({d.state})" for d in devices) or "none"
    if serial is not None:
        for dev in devices:
            if dev.serial == serial:
                if dev.state == "device":
                    return serial
                hint = _STATE_HINTS.get(dev.state, "boot it into Android with USB debugging on")
                raise DeviceError(f"Android device {serial!r} is {dev.state!r}, not ready; {hint}")
        raise DeviceError(
            f"Android device {serial!r} is not connected (adb devices lists {listing}); check the cable and --serial"
        )
    if not devices:
        raise DeviceError(NO_DEVICE)
    usable = [d.serial for d in devices if d.state == "device"]
    if len(usable) == 1:
        return usable[0]
    if not usable:
        first = devices[0]
        hint = _STATE_HINTS.get(first.state, "boot it into Android with USB debugging on")
        raise DeviceError(f"no usable Android device (adb devices lists {listing}); {hint}")
    raise DeviceError(f"{len(usable)} Android devices connected ({', '.join(usable)}); pass --serial to choose one")


def _check_word(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or value.startswith("-") or any(c.isspace() for c in value):
        raise ConfigError(f"{what} {value!r} is invalid; expected one word not starting with '-'")
    return value


class AdbTransport:
    """A transport onto an Android device through ``adb``.

    ``serial``: the device (None: the only connected one). ``base_dir``: where the temp dir is created
    (``/data/local/tmp`` is writable by adb's shell user). ``server_port``: the adb server's port
    (``adb -P``; None: adb's default). ``transfer_timeout_s``: limit per push/pull (None: none).
    """

    name = "adb"

    def __init__(
        self,
        serial: str | None = None,
        *,
        base_dir: str = "/data/local/tmp",
        adb: str = "adb",
        server_port: int | None = None,
        transfer_timeout_s: float | None = None,
    ) -> None:
        self._serial = None if serial is None else _check_word(serial, "adb serial")
        if not PurePosixPath(base_dir).is_absolute():
            raise ConfigError(
                f"device work dir {base_dir!r} is invalid; expected an absolute path such as /data/local/tmp"
            )
        self.base_dir = str(PurePosixPath(base_dir))
        self._adb = adb
        self.server_port = server_port
        self.transfer_timeout_s = transfer_timeout_s
        self._workdir: str | None = None
        self._closed = False
        self.leftover_workdir: str | None = None

    # -- argv construction -------------------------------------------------------------------------------

    def adb_argv(self, *args: str, serial: str | None = None) -> list[str]:
        """``adb [-P PORT] [-s SERIAL] ARGS...``."""
        argv = [self._adb]
        if self.server_port is not None:
            argv += ["-P", str(self.server_port)]
        if serial is not None:
            argv += ["-s", serial]
        return [*argv, *args]

    def shell_argv(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """The ``adb shell`` argv running ``argv`` (each word quoted for the device's sh) in ``cwd``."""
        command = shlex.join(check_argv(argv))
        if cwd is not None:
            command = f"cd {shlex.quote(cwd)} && exec {command}"
        return self.adb_argv("shell", command, serial=self.serial)

    # -- calls -------------------------------------------------------------------------------------------

    def _call(self, argv: list[str], what: str, timeout: float | None) -> RunResult:
        if shutil.which(self._adb) is None:
            raise DeviceError(
                f"adb client {self._adb!r} not found; install it (Debian/Ubuntu: apt-get install adb; "
                "elsewhere: Android SDK platform-tools) or put it on PATH"
            )
        log.debug("adb: %s", argv)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{what} on {self._where} timed out after {timeout} s; check the device") from None
        out = proc.stdout.decode("utf-8", errors="replace")
        err = proc.stderr.decode("utf-8", errors="replace")
        failure = _ADB_FAILURE.search(err)
        if proc.returncode != 0 and failure:
            raise DeviceError(
                f"adb lost or cannot reach {self._where} while {what} ({failure.group(0)}); "
                "check the cable and `adb devices`, then rerun (finished work is kept)"
            )
        return RunResult(proc.returncode, out, err)

    def devices(self) -> list[AdbDevice]:
        """The devices the adb server sees (``adb devices -l``)."""
        rc, out, err = self._call(self.adb_argv("devices", "-l"), "listing devices", CONTROL_TIMEOUT_S)
        if rc != 0:
            raise DeviceError(f"`adb devices` failed (exit {rc}: {last_line(err)}); try `adb kill-server` and rerun")
        return parse_devices(out)

    @property
    def serial(self) -> str:
        """The device's serial (chosen on first use when none was given)."""
        if self._serial is None:
            self._serial = select_device(self.devices(), None)
        return self._serial

    @property
    def target(self) -> str:
        """Where this transport goes, as recorded in results (``adb://SERIAL``; resolves the serial)."""
        return f"adb://{self.serial}"

    @property
    def _where(self) -> str:
        return f"adb://{self._serial}" if self._serial else "the Android device"

    def kill_server(self) -> None:
        """Stop the adb server (on ``server_port``)."""
        self._call(self.adb_argv("kill-server"), "stopping the adb server", CONTROL_TIMEOUT_S)

    # -- the work dir ------------------------------------------------------------------------------------

    def is_own_workdir(self, path: str) -> bool:
        prefix = str(PurePosixPath(self.base_dir) / WORKDIR_PREFIX)
        return re.fullmatch(re.escape(prefix) + rf"[A-Za-z0-9]{{{len(_MKTEMP_XS)}}}", path) is not None

    @property
    def workdir(self) -> str:
        if self._closed:
            raise DeviceError(f"adb transport to {self._where} was cleaned up; open a new AdbTransport")
        if self._workdir is None:
            self._serial = select_device(self.devices(), self._serial)  # a clear error before anything else
            template = str(PurePosixPath(self.base_dir) / (WORKDIR_PREFIX + _MKTEMP_XS))
            rc, out, err = self._call(
                self.shell_argv(["mktemp", "-d", template]), "creating its temp dir", CONTROL_TIMEOUT_S
            )
            path = out.strip()
            if rc != 0 or not self.is_own_workdir(path):
                raise DeviceError(
                    f"cannot create a temp dir under {self.base_dir!r} on {self._where} (mktemp exit {rc}: "
                    f"{last_line(err) or path!r}); check the profile's workdir is writable by adb's shell"
                )
            self._workdir = path
        return self._workdir

    def _remote(self, remote: str | PurePosixPath) -> str:
        return str(PurePosixPath(self.workdir) / check_remote(str(remote)))

    # -- the protocol ------------------------------------------------------------------------------------

    def push(self, local: str | os.PathLike, remote: str) -> str:
        pairs = push_pairs(local, remote)
        for path, dest in pairs:  # adb's sync protocol creates missing parent dirs
            argv = self.adb_argv("push", str(path), self._remote(dest), serial=self.serial)
            rc, out, err = self._call(argv, f"pushing {path.name!r}", self.transfer_timeout_s)
            if rc != 0:
                raise DeviceError(
                    f"cannot push {path.name!r} to {self._where} (exit {rc}: {last_line(err) or last_line(out)}); "
                    "check free space on the device"
                )
        return self._remote(remote)

    def pull(self, remote: str, local: str | os.PathLike) -> str:
        src = self._remote(remote)
        with partial_file(local) as part:
            rc, out, err = self._call(
                self.adb_argv("pull", src, str(part), serial=self.serial),
                f"pulling {remote!r}",
                self.transfer_timeout_s,
            )
            if rc != 0:
                raise DeviceError(
                    f"cannot pull {remote!r} from {self._where} (exit {rc}: {last_line(err) or last_line(out)}); "
                    "did the command write it?"
                )
        return str(Path(local))

    def run(self, argv: Sequence[str], timeout: float | None = None) -> RunResult:
        return self._call(self.shell_argv(argv, cwd=self.workdir), f"running {check_argv(argv)[0]!r}", timeout)

    def remove_stale_workdir(self, path: str) -> bool:
        """Remove a temp dir an earlier, interrupted bench left behind; refuses anything else."""
        if not self.is_own_workdir(path):
            return False
        return self._call(self.shell_argv(["rm", "-rf", path]), "removing an old temp dir", CONTROL_TIMEOUT_S).rc == 0

    def cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        workdir, self._workdir = self._workdir, None
        if workdir is None:
            return
        try:
            rc, _, err = self._call(self.shell_argv(["rm", "-rf", workdir]), "removing its temp dir", CONTROL_TIMEOUT_S)
        except DeviceError:
            self.leftover_workdir = workdir
            raise
        if rc != 0:
            self.leftover_workdir = workdir
            raise DeviceError(f"cannot remove {workdir!r} on {self._where} ({last_line(err)}); remove it by hand")

    def __enter__(self) -> AdbTransport:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.cleanup()
        except DeviceError as err:
            if exc_type is None:
                raise
            log.warning("%s", err)
