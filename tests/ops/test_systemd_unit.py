"""The shipped systemd unit: notify + watchdog + restart semantics, a group-only socket
directory, hardening that keeps the GPUs visible and JIT working, and (where systemd's tools
are installed) a clean `systemd-analyze verify` and a sysusers file that creates the user."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cgtree.config import DaemonConfig

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT_PATH = SYSTEMD_DIR / "cgtreed.service"
SYSUSERS_PATH = SYSTEMD_DIR / "cgtree.sysusers.conf"

TRUE_VALUES = {"1", "yes", "true", "on"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: [Section], Key=Value, #/; comments, backslash continuations,
    repeated keys kept in order (Environment= may appear many times)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT_PATH.read_text())


@pytest.fixture(scope="module")
def service(unit) -> dict[str, list[str]]:
    return unit["Service"]


def only(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once, got {values}"
    return values[0]


def environment(service: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for value in service.get("Environment", []):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|ms)?", value)
    assert match, f"unexpected time span {value!r}"
    number, unit_name = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1, "sec": 1, "min": 60, "ms": 0.001}[unit_name]


def test_parser_reads_continuations_duplicates_and_comments():
    parsed = parse_unit("# c\n[A]\nX=1\n; c\nX=2\nY=a\\\n  b\n")
    assert parsed == {"A": {"X": ["1", "2"], "Y": ["a b"]}}


def test_service_reports_readiness_through_sd_notify(service):
    assert only(service, "Type") == "notify"
    assert only(service, "NotifyAccess") == "main"


def test_watchdog_and_restart_on_failure(service):
    assert seconds(only(service, "WatchdogSec")) == 30
    assert only(service, "Restart") == "on-failure"
    assert seconds(only(service, "RestartSec")) == 2


def test_stop_timeout_leaves_room_for_the_default_graceful_shutdown(service):
    stop_timeout = seconds(only(service, "TimeoutStopSec"))
    assert stop_timeout > DaemonConfig().shutdown_timeout_s
    assert stop_timeout <= DaemonConfig().shutdown_timeout_s + 30  # "a bit above", not forever


def test_exec_start_runs_cgtreed_with_the_system_config_and_the_run_socket(service):
    argv = shlex.split(only(service, "ExecStart"))
    assert argv[:3] == ["/usr/local/bin/cgtreed", "--config", "/etc/cgtree/config.toml"]
    endpoint = argv[argv.index("--endpoint") + 1]
    endpoint = endpoint.replace("${CGTREE_ENDPOINT}", environment(service)["CGTREE_ENDPOINT"])
    runtime_dir = "/run/" + only(service, "RuntimeDirectory") + "/"
    # The socket must live in the group-accessible runtime directory, not in a private /tmp.
    assert endpoint.startswith("ipc://" + runtime_dir)


def test_reload_sends_sighup_to_the_main_process(service):
    assert only(service, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_runs_as_cgtree_with_a_socket_only_the_group_can_reach(service):
    assert only(service, "User") == "cgtree"
    assert only(service, "Group") == "cgtree"
    assert only(service, "RuntimeDirectory") == "cgtree"
    assert only(service, "RuntimeDirectoryMode") == "0770"
    umask = int(only(service, "UMask"), 8)
    assert umask & 0o070 == 0, "group members need write permission on the socket to connect"
    assert umask & 0o007 == 0o007, "other users must not reach the socket"


def test_state_and_cache_directories_hold_home_and_compile_caches(service):
    assert only(service, "StateDirectory") == "cgtree"
    assert only(service, "CacheDirectory") == "cgtree"
    env = environment(service)
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/var/cache/cgtree/")
    assert env["TRITON_CACHE_DIR"].startswith("/var/cache/cgtree/")
    assert env["HOME"] == "/var/lib/cgtree"


def test_allocator_config_never_enables_expandable_segments(service):
    alloc_conf = environment(service).get("PYTORCH_CUDA_ALLOC_CONF", "")
    assert "expandable_segments:true" not in alloc_conf.replace(" ", "").lower()


def test_hardening_is_on(service):
    assert only(service, "NoNewPrivileges") in TRUE_VALUES
    assert only(service, "ProtectSystem") == "strict"
    for key in (
        "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
        "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality", "RestrictNamespaces",
    ):
        assert only(service, key) in TRUE_VALUES, key


def test_no_option_hides_the_gpus(service):
    # A private /dev or any device allow-list makes /dev/nvidia* unreachable.
    assert all(v.lower() not in TRUE_VALUES for v in service.get("PrivateDevices", []))
    assert all(v not in ("closed", "strict") for v in service.get("DevicePolicy", []))
    assert "DeviceAllow" not in service
    # ProtectClock= implies DeviceAllow=char-rtc, an allow-list on systemd < 253.
    assert all(v.lower() not in TRUE_VALUES for v in service.get("ProtectClock", []))


def test_jit_compilers_may_map_writable_executable_memory(service):
    assert all(v.lower() not in TRUE_VALUES for v in service.get("MemoryDenyWriteExecute", []))


def test_client_processes_stay_visible_in_proc(service):
    # Dead sessions are found by looking up client PIDs (processes of other users).
    assert all(v not in ("invisible", "noaccess", "ptraceable") for v in service.get("ProtectProc", []))
    assert all(v != "pid" for v in service.get("ProcSubset", []))


def test_installed_into_multi_user_target(unit):
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_sysusers_creates_user_cgtree_with_the_state_directory_as_home(service):
    entries = [
        shlex.split(line)
        for line in SYSUSERS_PATH.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert entries == [["u", "cgtree", "-", "cgtree CUDA graph daemon", "/var/lib/cgtree", "/usr/sbin/nologin"]]
    assert entries[0][4] == "/var/lib/" + only(service, "StateDirectory")


def unit_with_runnable_exec(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart binary exists here (verify checks it is executable)."""
    copy = tmp_path / "cgtreed.service"
    copy.write_text(UNIT_PATH.read_text().replace("/usr/local/bin/cgtreed", shutil.which("true") or "/bin/true"))
    return copy


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not on PATH (apt-get install systemd)")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit_with_runnable_exec(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    # verify exits 0 even for unknown keys and unparsable values ("..., ignoring"): any
    # diagnostic line counts as a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


def test_systemd_analyze_security_rates_the_unit_well_hardened(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not on PATH (apt-get install systemd)")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit_with_runnable_exec(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for cgtreed\.service: (\d+(?:\.\d+)?)", output)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security review: {output[-300:]}")
    # 10 is "UNSAFE", below 5 is "OK" or better; losing several hardening options crosses 5.
    assert float(match.group(1)) < 5.0, output


def test_systemd_sysusers_creates_user_and_group_in_a_scratch_root(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers not on PATH (apt-get install systemd)")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS_PATH)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    group = (tmp_path / "etc" / "group").read_text().splitlines()
    [user] = [line.split(":") for line in passwd if line.startswith("cgtree:")]
    [grp] = [line.split(":") for line in group if line.startswith("cgtree:")]
    assert user[3] == grp[2], "the user's primary group is group cgtree"
    assert user[5:] == ["/var/lib/cgtree", "/usr/sbin/nologin"]
