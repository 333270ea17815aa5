"""The device layer: profiles, the SSH transport against a real sshd on 127.0.0.1, the remote bench, adb.

The SSH tests start their own ``sshd`` (host keys, client key, authorized_keys and known_hosts in a temp
dir; only 127.0.0.1) and measure real GGUF artifacts of the bundled model through it, with the venv's
interpreter as the "device" Python. The device's work dirs live in per-test temp dirs, so a test can
check that nothing was left behind. adb is tested against the real client with no device attached.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgeq.devices.adb import NO_DEVICE, AdbDevice, AdbTransport, parse_devices, select_device
from edgeq.devices.local import EDGEQ_SOURCE_ROOT
from edgeq.devices.profile import DeviceProfile, builtin_profiles, load_profile
from edgeq.devices.remote import LEFTOVERS, bench_on_device, bench_remote, open_transport
from edgeq.devices.ssh import SshTransport
from edgeq.devices.transport import Transport
from edgeq.errors import ConfigError, DeviceError
from edgeq.runtime.plan import Plan

SMALL_PLAN = Plan(prompt_tokens=8, decode_tokens=8, repeat=1, warmup=0, eval_tokens=128, ctx=64, bandwidth_probe=False)
SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:" + os.environ.get("PATH", ""))


# -- profiles -----------------------------------------------------------------------------------------


def test_builtin_profiles_load_with_their_figures():
    assert builtin_profiles() == ["android-phone", "jetson-agx-orin", "jetson-orin-nano", "local", "raspberry-pi-5"]
    profiles = {name: load_profile(name) for name in builtin_profiles()}
    bandwidth = {n: p.memory_bandwidth_gb_per_s for n, p in profiles.items()}
    assert bandwidth["jetson-orin-nano"] == 68.0 and bandwidth["jetson-agx-orin"] == 204.8
    assert 16 <= bandwidth["raspberry-pi-5"] <= 18 and 50 <= bandwidth["android-phone"] <= 60
    assert {n: p.transport for n, p in profiles.items()} == {
        "android-phone": "adb",
        "jetson-agx-orin": "ssh",
        "jetson-orin-nano": "ssh",
        "local": "local",
        "raspberry-pi-5": "ssh",
    }
    assert not profiles["android-phone"].has_python and profiles["android-phone"].workdir == "/data/local/tmp"
    for name, p in profiles.items():
        assert p.name == name and p.description and p.path
        if name != "local":
            assert p.ram_gb and p.cores and p.workdir
    with pytest.raises(AttributeError):
        profiles["local"].cores = 3  # type: ignore[misc]  # frozen


def test_profile_from_a_user_file(tmp_path):
    path = tmp_path / "my-board.toml"
    path.write_text('transport = "ssh"\nhost = "me@10.0.0.2"\nport = 2222\nram_gb = 4\ncores = 4\n')
    profile = load_profile(path)
    assert (profile.name, profile.host, profile.port, profile.remote_python) == (
        "my-board",
        "me@10.0.0.2",
        2222,
        "python3",
    )
    assert load_profile(str(path)) == profile and load_profile(profile) is profile


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('transport = "ssh"\nram = 4\n', r"unknown key\(s\) \['ram'\] in device profile .*expected some of"),
        ('transport = "telnet"\n', r"transport='telnet' is invalid; expected one of \['local', 'ssh', 'adb'\]"),
        ('transport = "ssh"\nram_gb = -1\n', r"ram_gb=-1 is invalid; expected a number > 0"),
        ('transport = "ssh"\ncores = 1.5\n', r"cores=1.5 is invalid; expected an integer"),
        ('transport = "ssh"\nhas_python = "yes"\n', r"has_python='yes' is invalid; expected true or false"),
        ('transport = "ssh"\nworkdir = "tmp"\n', r"workdir='tmp' is invalid; expected an absolute"),
        ('transport = "ssh"\nport = 70000\n', r"port=70000 is invalid; expected an integer in \[1, 65535\]"),
        ('transport = "ssh"\nmemory_bandwidth_gb_per_s = true\n', r"memory_bandwidth_gb_per_s=True is invalid"),
        ("ram_gb = 4\n", r"has no transport; add transport"),
        ('transport = "ssh"\nram_gb = \n', r"is not valid TOML"),
    ],
)
def test_bad_profiles_are_refused_with_one_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_unknown_profile_names_the_builtin_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown device profile 'jetson-nano'; expected one of \['android-phone'"):
        load_profile("jetson-nano")
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.toml")


def test_device_modules_import_no_torch():
    code = (
        "import importlib, json, sys\n"
        "for m in ['edgeq.devices.profile', 'edgeq.devices.ssh', 'edgeq.devices.adb', 'edgeq.devices.remote']:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(EDGEQ_SOURCE_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# -- a real sshd on 127.0.0.1 ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    """A new ed25519 key pair at ``path``; its public key as "TYPE BASE64"."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


class Sshd:
    """An sshd of its own on 127.0.0.1: its host key, one client key, a known_hosts for it."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.user = root, _free_port(), getpass.getuser()
        self.host_key = _keygen(root / "host_key")
        self.other_key = _keygen(root / "other_host_key")
        _keygen(root / "client_key")
        self.identity = root / "client_key"
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        self.known_hosts = self.write_known_hosts(root / "known_hosts", self.host_key)
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\n"
            f"AuthorizedKeysFile {root}/authorized_keys\nPidFile {root}/sshd.pid\n"
            "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nAllowTcpForwarding no\n"
            "X11Forwarding no\nPrintMotd no\nMaxStartups 100\nLogLevel INFO\n"
        )
        self.proc: subprocess.Popen | None = None

    def write_known_hosts(self, path: Path, key: str) -> Path:
        path.write_text(f"[127.0.0.1]:{self.port} {key}\n")
        return path

    def start(self) -> None:
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sshd exited {self.proc.returncode}: {(self.root / 'sshd.log').read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 15 s")

    def _sessions(self) -> list[int]:
        """Pids of the listener's descendants: the per-connection sshd processes and what they run."""
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        found, frontier = [], [self.proc.pid] if self.proc else []
        while frontier:
            children = [pid for pid, ppid in parents.items() if ppid in frontier]
            found += children
            frontier = children
        return found

    def stop(self) -> None:
        """Stop listening and cut every open connection (as when the device goes away)."""
        for pid in self._sessions():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def transport(self, base_dir: Path, known_hosts: Path | None = None) -> SshTransport:
        return SshTransport(
            f"{self.user}@127.0.0.1",
            port=self.port,
            identity=self.identity,
            known_hosts=known_hosts or self.known_hosts,
            base_dir=str(base_dir),
            connect_timeout_s=5,
            transfer_timeout_s=60,
        )


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip(
            "OpenSSH server/client missing; install them with `apt-get install -y openssh-server openssh-client`"
        )
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    except OSError as exc:
        if os.geteuid() == 0:
            pytest.skip(f"cannot create /run/sshd for sshd ({exc})")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> str:
    """The device's interpreter: this venv's, running this checkout of edgeq (like bench_local does)."""
    path = tmp_path_factory.mktemp("device-python") / "python3"
    path.write_text(
        f'#!/bin/sh\nexec env PYTHONPATH={shlex.quote(str(EDGEQ_SOURCE_ROOT))} {shlex.quote(sys.executable)} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def device_dir(tmp_path) -> Path:
    """The device-side base dir (the profile's workdir) for one test: empty again after a clean bench."""
    path = tmp_path / "device"
    path.mkdir()
    return path


def test_ssh_argv_keeps_host_key_checking_on(sshd, tmp_path):
    t = sshd.transport(tmp_path)
    argv = t.ssh_argv("true")
    t.cleanup()
    opts = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]
    assert "ControlMaster=auto" in opts and any(o.startswith('ControlPath="/') for o in opts)
    assert "BatchMode=yes" in opts and "StrictHostKeyChecking=yes" in opts and "ConnectTimeout=5" in opts
    assert f'UserKnownHostsFile="{sshd.known_hosts}"' in opts and "IdentitiesOnly=yes" in opts
    assert not any("StrictHostKeyChecking=no" in a or "accept-new" in a for a in argv)
    assert argv[-3:] == ["--", f"{sshd.user}@127.0.0.1", "true"] and argv[argv.index("-p") + 1] == str(sshd.port)
    for bad in ("-oProxyCommand=touch /tmp/x", "a b", ""):
        with pytest.raises(ConfigError, match="ssh host"):
            SshTransport(bad)
    weird = tmp_path / "kh%d"
    weird.write_text("")
    with pytest.raises(ConfigError, match="character ssh would expand"):
        SshTransport("h", known_hosts=weird)


def test_ssh_transport_push_run_pull_cleanup(sshd, device_dir, tmp_path):
    name = "a b 'c' \"d\" $(echo no) `echo no`;|&.txt"
    (tmp_path / "src" / "sub dir").mkdir(parents=True)
    (tmp_path / "src" / "sub dir" / name).write_text("hello $HOME\n")
    with sshd.transport(device_dir) as t:
        assert isinstance(t, Transport) and t.target == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
        workdir = Path(t.workdir)
        assert workdir.parent == device_dir and workdir.name.startswith("edgeq-")
        t.push(tmp_path / "src", "in")
        assert (workdir / "in" / "sub dir" / name).read_text() == "hello $HOME\n"
        rc, out, err = t.run(["printf", "%s|", "x y", "$(echo no)", "'q'", "`echo no`", "*"])
        assert (rc, out, err) == (0, "x y|$(echo no)|'q'|`echo no`|*|", "")
        rc, out, _ = t.run(["cat", f"in/sub dir/{name}"])
        assert (rc, out) == (0, "hello $HOME\n")
        rc, _, err = t.run(["sh", "-c", "echo 'error: boom' >&2; exit 3"])
        assert rc == 3 and err.strip() == "error: boom"
        assert Path(t.pull(f"in/sub dir/{name}", tmp_path / "back" / name)).read_text() == "hello $HOME\n"
        with pytest.raises(DeviceError, match="cannot pull 'nope'"):
            t.pull("nope", tmp_path / "nope")
        assert not (tmp_path / "nope").exists() and not list(tmp_path.glob(".nope*"))
        with pytest.raises(DeviceError, match="not inside the transport's work dir"):
            t.push(tmp_path / "back" / name, "../escape")
        with pytest.raises(DeviceError, match="timed out after 0.5 s"):
            t.run(["sleep", "5"], timeout=0.5)
        # the command kills its own sshd session process: the connection drops mid-command
        with pytest.raises(
            DeviceError, match=r"failed while running 'sh' \(ssh exit 255: .*\); the connection dropped"
        ):
            t.run(["sh", "-c", "kill -9 $PPID; sleep 5"])
    assert not workdir.exists() and list(device_dir.iterdir()) == []


def test_key_files_in_a_directory_with_spaces(sshd, device_dir, tmp_path):
    keys = tmp_path / "my keys" / "s p a c e"
    keys.mkdir(parents=True)
    for src in (sshd.identity, sshd.known_hosts):
        shutil.copy(src, keys / src.name)
    (keys / "client_key").chmod(0o600)
    t = SshTransport(
        f"{sshd.user}@127.0.0.1", port=sshd.port, identity=keys / "client_key",
        known_hosts=keys / "known_hosts", base_dir=str(device_dir),
    )  # fmt: skip
    with t:
        assert t.run(["echo", "ok"]) == (0, "ok\n", "")
    assert list(device_dir.iterdir()) == []


@pytest.mark.parametrize("case", ["wrong key", "no entry"])
def test_host_key_checking_refuses_an_unknown_key(sshd, device_dir, tmp_path, case):
    known = sshd.write_known_hosts(tmp_path / "known_hosts", sshd.other_key) if case == "wrong key" else None
    if known is None:
        known = tmp_path / "known_hosts"
        known.write_text("")
    t = sshd.transport(device_dir, known_hosts=known)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(
        DeviceError, match=r"Host key verification failed\.\); the device's host key is not in known_hosts"
    ) as info:
        t.push(tmp_path / "f.txt", "f.txt")
    assert "\n" not in str(info.value) and str(info.value).startswith(
        f"ssh to {sshd.user}@127.0.0.1:{sshd.port} failed while creating"
    )
    assert list(device_dir.iterdir()) == []  # nothing pushed, not even a temp dir
    t.cleanup()


def test_unreachable_port_is_a_clear_device_error(sshd, device_dir):
    t = SshTransport("127.0.0.1", port=_free_port(), known_hosts=sshd.known_hosts, base_dir=str(device_dir))
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=r"Connection refused\); the device is unreachable: check it is on"):
        t.run(["true"])
    assert time.monotonic() - t0 < 10
    t.cleanup()


# -- the remote bench, end to end over ssh ---------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(make_run, tmp_path_factory) -> dict[str, Path]:
    """GGUF q4_0 and q8_0 of the bundled model (RTN w4g32 sym) and q4_0 under a hostile path."""
    from edgeq.api import export
    from edgeq.config import ExportConfig

    run = make_run(bits=4, group_size=32, sym=True)
    root = tmp_path_factory.mktemp("artifacts")
    marker = Path(f"/tmp/PWNED_{uuid.uuid4().hex[:12]}")
    hostile = root / f"dir with 'quotes' \"dq\" {_payload(marker)}"
    hostile.mkdir()
    out = {
        "q4_0": export(run, ExportConfig("gguf", "q4_0", parity=False), root / "model.q4_0.gguf").path,
        "q8_0": export(run, ExportConfig("gguf", "q8_0", parity=False), root / "model.q8_0.gguf").path,
        "hostile": export(
            run, ExportConfig("gguf", "q4_0", parity=False), hostile / f"m {_payload(marker)};'x'.gguf"
        ).path,
    }
    return {**out, "marker": marker}


def _payload(marker: Path) -> str:
    """Shell code that creates ``marker`` if any shell ever evaluates it (no '/' so it fits a file name)."""
    octal = str(marker).replace("/", "\\057")
    return f"$(touch \"$(printf '{octal}')\") `printf '{octal}' | xargs touch`"


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    from edgeq.bundled import heldout_text

    path = tmp_path_factory.mktemp("eval") / "heldout.txt"
    path.write_text(heldout_text(max_chars=20_000))
    return path


def _check_result(result: dict, sshd: Sshd, manifest: Path) -> None:
    gen = result["generation"]
    for value in (result["load_time_ms"], gen["decode_tokens_per_s"], gen["ttft_ms"], result["memory"]["peak_rss_mb"]):
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    assert (gen["prompt_tokens"], gen["decode_tokens"], gen["repeat"]) == (8, 8, 1)
    assert result["perplexity"]["ppl"] > 1 and result["perplexity"]["eval_text"] == "eval.txt"
    assert result["artifact"]["path"] == str(manifest.resolve()) and result["artifact"]["format"] == "gguf"
    assert result["device"]["target"] == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"


def test_bench_over_ssh_end_to_end_and_resume(sshd, artifacts, eval_text, device_dir, device_python, tmp_path):
    measured: list[int] = []
    kwargs = {"eval_text": eval_text, "python": device_python, "timeout_s": 120}
    results = bench_remote(
        sshd.transport(device_dir), [artifacts["q4_0"]], SMALL_PLAN, tmp_path / "results", **kwargs,
        on_result=lambda i, r: measured.append(i),
    )  # fmt: skip
    _check_result(results[0], sshd, artifacts["q4_0"])
    assert measured == [0] and list(device_dir.iterdir()) == []  # remote temp dir removed
    assert results[0]["artifact"]["device_path"] == f"a0/{artifacts['q4_0'].name}"
    # a rerun with the same inputs keeps the result and connects to nothing (no ssh client needed)
    offline = SshTransport(f"{sshd.user}@127.0.0.1", port=sshd.port, base_dir=str(device_dir), ssh="/nonexistent/ssh")
    offline_results = bench_remote(offline, [artifacts["q4_0"]], SMALL_PLAN, tmp_path / "results", **kwargs)
    assert offline_results[0]["created_utc"] == results[0]["created_utc"] and offline_results[0]["resume_key"]


def test_hostile_file_names_run_nothing(sshd, artifacts, eval_text, device_dir, device_python, tmp_path):
    marker = artifacts["marker"]
    canary = Path(f"{marker}_canary")
    subprocess.run(["sh", "-c", ": " + _payload(canary)], check=True, timeout=30)
    assert canary.exists(), "the payload must be live shell code for this test to mean anything"
    canary.unlink()
    hostile_text = tmp_path / f"eval {_payload(marker)} 'x'.txt"
    shutil.copy(eval_text, hostile_text)
    results = bench_remote(
        sshd.transport(device_dir), [artifacts["hostile"]], SMALL_PLAN, tmp_path / f"res {_payload(marker)}",
        eval_text=hostile_text, python=device_python, timeout_s=120,
    )  # fmt: skip
    _check_result(results[0], sshd, artifacts["hostile"])
    assert results[0]["artifact"]["device_path"] == f"a0/{artifacts['hostile'].name}"  # the name arrived intact
    assert not marker.exists() and list(device_dir.iterdir()) == []


def test_dropped_connection_keeps_what_was_measured_and_resumes(
    sshd, artifacts, eval_text, device_dir, device_python, tmp_path
):
    arts, results_dir = [artifacts["q4_0"], artifacts["q8_0"]], tmp_path / "results"
    kwargs = {"eval_text": eval_text, "python": device_python, "timeout_s": 120}
    measured: list[int] = []

    def drop_after_first(i: int, result: dict) -> None:
        measured.append(i)
        sshd.stop()

    try:
        with pytest.raises(DeviceError) as info:
            bench_remote(
                sshd.transport(device_dir), arts, SMALL_PLAN, results_dir, **kwargs, on_result=drop_after_first
            )
    finally:
        sshd.start()
    message = str(info.value)
    # refused (the listener is gone) or cut (the old connection was still being torn down): both are exit 255
    assert "\n" not in message and "(ssh exit 255: " in message and "1 of 2 artifact(s) measured and kept" in message
    assert measured == [0] and len(list(results_dir.glob("model.q4_0-*.json"))) == 1
    leftovers = json.loads((results_dir / LEFTOVERS).read_text())
    assert [Path(e["workdir"]).parent for e in leftovers] == [device_dir]  # could not be removed: recorded
    measured.clear()
    results = bench_remote(
        sshd.transport(device_dir), arts, SMALL_PLAN, results_dir, **kwargs, on_result=lambda i, r: measured.append(i)
    )
    assert measured == [1]  # only the second artifact was measured again
    for result, art in zip(results, arts, strict=True):
        _check_result(result, sshd, art)
    assert not (results_dir / LEFTOVERS).exists() and list(device_dir.iterdir()) == []  # old temp dir removed too


def test_cli_bench_over_ssh(sshd, artifacts, eval_text, device_dir, device_python, tmp_path):
    profile = tmp_path / "loopback.toml"
    profile.write_text(f'transport = "ssh"\npython = "{device_python}"\nworkdir = "{device_dir}"\ncores = 2\n')
    out = tmp_path / "bench.json"
    args = [artifacts["q4_0"], "--device", profile, "--host", f"{sshd.user}@127.0.0.1", "--port", sshd.port]
    args += ["--identity", sshd.identity, "--known-hosts", sshd.known_hosts, "--json", out, "--eval-text", eval_text]
    args += ["--repeat", "1", "--prompt-tokens", "8", "--decode-tokens", "8", "--eval-tokens", "256"]
    proc = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "bench", *map(str, args)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["device"]["name"] == "loopback" and result["device"]["cores"] == 2
    assert result["device"]["target"] == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    assert result["label"] == str(artifacts["q4_0"]) and result["generation"]["decode_tokens_per_s"] > 0
    assert len(list((tmp_path / "bench.results").glob("*.json"))) == 1 and list(device_dir.iterdir()) == []


def test_profiles_and_options_that_do_not_fit_are_refused(artifacts, tmp_path):
    with pytest.raises(DeviceError, match=r"profile 'android-phone' has no Python \(has_python = false\)"):
        bench_on_device(load_profile("android-phone"), [artifacts["q4_0"]], SMALL_PLAN, tmp_path)
    with pytest.raises(ConfigError, match="names no host; pass --host"):
        open_transport(load_profile("jetson-orin-nano"))
    with pytest.raises(ConfigError, match="--serial applies to adb devices"):
        open_transport(load_profile("raspberry-pi-5"), host="pi@10.0.0.2", serial="X")
    with pytest.raises(ConfigError, match="--host applies to ssh devices"):
        open_transport(load_profile("android-phone"), host="pi@10.0.0.2")
    assert isinstance(open_transport(load_profile("jetson-agx-orin"), host="nv@10.0.0.3", port=2200), SshTransport)
    from edgeq.api import bench

    with pytest.raises(ConfigError, match="--host: for remote devices only"):
        bench(artifacts["q4_0"], host="pi@10.0.0.2")


# -- adb --------------------------------------------------------------------------------------------------

ADB_LISTING = """\
* daemon not running; starting now at tcp:5037
* daemon started successfully
List of devices attached
emulator-5554          device product:sdk_gphone64_x86_64 model:sdk_gphone64_x86_64 device:emu64xa transport_id:1
R58M123ABC             unauthorized usb:1-1 transport_id:2
192.168.1.20:5555      offline transport_id:3
0123456789ABCDEF       no permissions (user in plugdev group; are your udev rules wrong?); see [http://developer.android.com/tools/device.html] usb:1-1.3 transport_id:4

"""


def test_parse_adb_devices_output():
    devices = parse_devices(ADB_LISTING)
    assert [(d.serial, d.state) for d in devices] == [
        ("emulator-5554", "device"),
        ("R58M123ABC", "unauthorized"),
        ("192.168.1.20:5555", "offline"),
        ("0123456789ABCDEF", "no permissions"),
    ]
    assert devices[0].properties == {
        "product": "sdk_gphone64_x86_64",
        "model": "sdk_gphone64_x86_64",
        "device": "emu64xa",
        "transport_id": "1",
    }
    assert devices[3].properties == {"usb": "1-1.3", "transport_id": "4"}
    assert parse_devices("List of devices attached\n\n") == []


def test_select_adb_device():
    devices = parse_devices(ADB_LISTING)
    assert (
        select_device(devices, None) == "emulator-5554" and select_device(devices, "emulator-5554") == "emulator-5554"
    )
    with pytest.raises(DeviceError, match="'R58M123ABC' is 'unauthorized', not ready; unlock the phone and accept"):
        select_device(devices, "R58M123ABC")
    with pytest.raises(DeviceError, match=r"'X' is not connected \(adb devices lists emulator-5554 \(device\), "):
        select_device(devices, "X")
    with pytest.raises(DeviceError, match=r"^no Android device connected \(adb devices lists none\); connect one"):
        select_device([], None)
    two = [AdbDevice("a", "device", {}), AdbDevice("b", "device", {})]
    with pytest.raises(DeviceError, match=r"2 Android devices connected \(a, b\); pass --serial"):
        select_device(two, None)
    with pytest.raises(DeviceError, match="no usable Android device .* reconnect the cable"):
        select_device([AdbDevice("c", "offline", {})], None)


def test_adb_argv_construction_and_quoting():
    t = AdbTransport("SER123", server_port=5099)
    hostile = "a b 'c' $(touch /tmp/x) `id`;|&"
    argv = t.shell_argv(["python3", "-m", "edgeq.runtime", hostile], cwd="/data/local/tmp/edgeq-abc def")
    assert argv[:6] == ["adb", "-P", "5099", "-s", "SER123", "shell"] and len(argv) == 7
    # the device's sh splits the one command string back into exactly these words
    assert shlex.split(argv[6]) == [
        "cd",
        "/data/local/tmp/edgeq-abc def",
        "&&",
        "exec",
        "python3",
        "-m",
        "edgeq.runtime",
        hostile,
    ]
    assert t.adb_argv("push", "/x y", "/data/local/tmp/z", serial="S") == [
        "adb",
        "-P",
        "5099",
        "-s",
        "S",
        "push",
        "/x y",
        "/data/local/tmp/z",
    ]
    assert t.target == "adb://SER123"
    for bad in ("-s", "a b", ""):
        with pytest.raises(ConfigError, match="adb serial"):
            AdbTransport(bad)
    with pytest.raises(DeviceError, match="not an argv list"):
        t.shell_argv("rm -rf /")  # type: ignore[arg-type]


def test_adb_missing_names_the_package(tmp_path):
    t = AdbTransport(adb=str(tmp_path / "no-adb"))
    with pytest.raises(DeviceError, match=r"adb client .* not found; install it \(Debian/Ubuntu: apt-get install adb"):
        t.devices()


@pytest.fixture
def adb_server():
    """A private adb server port; the server the test starts is killed afterwards."""
    if shutil.which("adb") is None:
        pytest.skip("adb missing; install it with `apt-get install -y adb`")
    port = _free_port()
    yield port
    AdbTransport(server_port=port).kill_server()


def test_real_adb_with_no_device(adb_server, tmp_path):
    t = AdbTransport(server_port=adb_server)
    assert t.devices() == []
    with pytest.raises(DeviceError) as info:
        t.push(tmp_path, "x")  # needs the work dir: picks the device first
    assert str(info.value) == NO_DEVICE
    with pytest.raises(DeviceError, match=r"Android device 'FOO' is not connected \(adb devices lists none\)"):
        _ = AdbTransport("FOO", server_port=adb_server).workdir
    # adb's own "device not found" on a shell command is a DeviceError, not a remote exit status
    t = AdbTransport("FOO", server_port=adb_server)
    with pytest.raises(DeviceError, match=r"adb lost or cannot reach adb://FOO .*error: device 'FOO' not found"):
        t._call(t.shell_argv(["true"]), "running 'true'", 30)
    assert isinstance(open_transport(DeviceProfile("p", "adb"), serial="FOO"), AdbTransport)
