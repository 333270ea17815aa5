"""Device profiles: what a target is (RAM, cores, memory bandwidth) and how to reach it, as TOML files.

The built-in profiles live in ``edgeq/devices/profiles/*.toml`` (``local``, ``raspberry-pi-5``,
``jetson-orin-nano``, ``jetson-agx-orin``, ``android-phone``); users add their own with
``--device path/to/mine.toml``. A profile is flat TOML; unknown keys and ill-typed values are refused
with one line naming the key, the value and what was expected, so a typo never silently falls back to
a default::

    name = "my-pi"                       # default: the file's stem
    description = "Pi 5 on my desk"
    transport = "ssh"                    # local | ssh | adb
    ram_gb = 8                           # hardware figures: used by emulation and the roofline
    cores = 4
    memory_bandwidth_gb_per_s = 17.1     # theoretical peak, 1e9 bytes/s
    has_python = true                    # false: the device cannot run ``python -m edgeq.runtime``
    python = "python3"                   # the device's interpreter (with edgeq's base package)
    llama_bin_dir = "/data/local/tmp/llama.cpp/bin"   # has_python = false: where llama-bench and
                                         # llama-perplexity lie on the device (edgeq.runtime.backends.native)
    workdir = "/tmp"                     # where the remote temp dir (mktemp -d) is created
    host = "pi@192.168.1.20"             # ssh: default --host; port, identity, known_hosts likewise
    serial = "R58M123ABC"                # adb: default --serial

torch-free: the host reads profiles before anything heavy is imported.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

from edgeq.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 hosts need the tomli backport
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

#: Where the built-in profiles live (shipped as package data).
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
TRANSPORTS = ("local", "ssh", "adb")


@dataclass(frozen=True)
class DeviceProfile:
    """One target device. Hardware figures are None where unknown (``local``: measured on the spot)."""

    name: str
    transport: str  # "local" | "ssh" | "adb"
    description: str = ""
    ram_gb: float | None = None
    cores: int | None = None
    memory_bandwidth_gb_per_s: float | None = None  # theoretical peak DRAM bandwidth
    has_python: bool = True
    python: str | None = None  # None: "python3" on a remote device, this interpreter locally
    workdir: str | None = None  # parent dir of the remote temp dir; None: /tmp (ssh), /data/local/tmp (adb)
    host: str | None = None  # ssh: [user@]address
    port: int | None = None  # ssh: None = the ssh client's default (22 or ~/.ssh/config)
    identity: str | None = None  # ssh: private key file
    known_hosts: str | None = None  # ssh: known_hosts file; None = the user's
    connect_timeout_s: float = 10.0  # ssh: ConnectTimeout
    serial: str | None = None  # adb: device serial; None = the only connected device
    llama_bin_dir: str | None = None  # device dir of llama.cpp's llama-bench / llama-perplexity (no Python)
    path: str | None = None  # the file it was read from (not a TOML key)

    def __post_init__(self) -> None:
        _check_str(self, "name", self.name)
        if self.transport not in TRANSPORTS:
            raise ConfigError(
                f"profile {self.name!r}: transport={self.transport!r} is invalid; expected one of {list(TRANSPORTS)}"
            )
        _check_str(self, "description", self.description, allow_empty=True)
        _check_number(self, "ram_gb", self.ram_gb)
        _check_int(self, "cores", self.cores, 1, 4096)
        _check_number(self, "memory_bandwidth_gb_per_s", self.memory_bandwidth_gb_per_s)
        _check_number(self, "connect_timeout_s", self.connect_timeout_s, optional=False)
        _check_int(self, "port", self.port, 1, 65535)
        if not isinstance(self.has_python, bool):
            raise ConfigError(
                f"profile {self.name!r}: has_python={self.has_python!r} is invalid; expected true or false"
            )
        for key in ("python", "host", "identity", "known_hosts", "serial", "path"):
            _check_str(self, key, getattr(self, key), optional=True)
        for key, example in (("workdir", "/tmp"), ("llama_bin_dir", "/data/local/tmp/llama.cpp/bin")):
            value = getattr(self, key)
            if value is not None:
                _check_str(self, key, value)
                if not PurePosixPath(value).is_absolute():
                    raise ConfigError(
                        f"profile {self.name!r}: {key}={value!r} is invalid; expected an absolute device path "
                        f"such as {example!r}"
                    )

    @property
    def remote_python(self) -> str:
        """The interpreter to run on a remote device."""
        return self.python or "python3"

    def to_dict(self) -> dict[str, Any]:
        """The profile as recorded in a result (identity and hardware figures, no file path)."""
        keys = ("name", "transport", "description", "ram_gb", "cores", "memory_bandwidth_gb_per_s", "has_python")
        return {k: getattr(self, k) for k in keys}


def _where(profile: DeviceProfile) -> str:
    return f"profile {profile.name!r}" + (f" ({profile.path})" if profile.path else "")


def _check_str(profile: DeviceProfile, key: str, value: Any, optional: bool = False, allow_empty: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or (not allow_empty and not value.strip()) or "\n" in value or "\0" in value:
        raise ConfigError(
            f"{_where(profile)}: {key}={value!r} is invalid; expected a non-empty one-line string"
            + (" or no key" if optional else "")
        )


def _check_number(profile: DeviceProfile, key: str, value: Any, optional: bool = True) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise ConfigError(f"{_where(profile)}: {key}={value!r} is invalid; expected a number > 0")


def _check_int(profile: DeviceProfile, key: str, value: Any, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{_where(profile)}: {key}={value!r} is invalid; expected an integer in [{low}, {high}]")


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped with edgeq."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def _profile_file(name_or_path: str | os.PathLike) -> Path:
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or os.sep in text or path.exists():
        if not path.is_file():
            raise ConfigError(f"device profile file {text!r} does not exist; expected a .toml file")
        return path
    builtin = PROFILES_DIR / f"{text}.toml"
    if not builtin.is_file():
        raise ConfigError(
            f"unknown device profile {text!r}; expected one of {builtin_profiles()} or a path to a .toml file"
        )
    return builtin


def profile_from_dict(data: dict[str, Any], where: str, default_name: str) -> DeviceProfile:
    """A profile from parsed TOML, refusing unknown keys with the list of known ones."""
    known = {f.name for f in fields(DeviceProfile)} - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in device profile {where}; expected some of {sorted(known)}")
    if "transport" not in data:
        raise ConfigError(f'device profile {where} has no transport; add transport = "local", "ssh" or "adb"')
    values = {"name": default_name, **data, "path": where}
    return DeviceProfile(**values)


def load_profile(name_or_path: str | os.PathLike | DeviceProfile) -> DeviceProfile:
    """The profile named ``name_or_path`` (a built-in name) or read from that ``.toml`` file."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    path = _profile_file(name_or_path)
    if tomllib is None:  # pragma: no cover
        raise ConfigError("reading device profiles needs tomllib (Python >= 3.11) or `pip install tomli`")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read device profile {str(path)!r} ({exc}); check the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"device profile {str(path)!r} is not valid TOML ({exc}); fix the syntax") from None
    return profile_from_dict(data, str(path), path.stem)
