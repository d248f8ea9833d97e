"""Process supervision for the local stack: the lock, port checks, start, readiness and stop.

Each service runs in its own session and process group. One signal to the group reaches the
processes it forks (the LocalExecutor's workers, the log servers, web server workers). Ctrl-C in
the launcher's terminal reaches only the launcher, which then stops the groups itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO

from local_stack.config import HttpCheck, PortBinding, ServiceSpec, StackConfigError

logger = logging.getLogger(__name__)

STOP_GRACE_S = 20.0
LOG_TAIL_CHARS = 4000
POLL_INTERVAL_S = 0.5
# State code of a listening socket in /proc/net/tcp (TCP_LISTEN in the kernel's tcp_states.h).
TCP_LISTEN = "0A"


class StackError(RuntimeError):
    """The local stack could not start, or a service of it failed."""


class PortInUseError(StackError):
    """A port the stack needs is already bound by another process."""


class StackLockedError(StackError):
    """Another launcher holds the state folder's lock."""


class ServiceStartError(StackError):
    """A service exited or did not become ready within its timeout."""


def check_ports_free(services: Iterable[ServiceSpec]) -> None:
    """Raise PortInUseError naming the first port that some other process already listens on."""
    for spec in services:
        for binding in spec.ports:
            if not _port_is_free(binding):
                raise PortInUseError(
                    f"port {binding.port} on {binding.host}, needed by {spec.name}, is already in "
                    f"use; stop the process that listens on it (for example a stack started "
                    f"elsewhere) or set {binding.env_var} to a free port"
                )


def _port_is_free(binding: PortBinding) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The servers set SO_REUSEADDR too, so a port that only has connections in TIME_WAIT
        # counts as free, and only a socket bound to it counts as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((binding.host, binding.port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


class StackLock:
    """An exclusive ``flock`` on ``stack.lock`` in the state folder, held while the stack runs.

    The kernel drops the lock when its holder exits, so a lock file left by a dead launcher is
    not locked and the next start takes it over. The file contains the holder's pid, for the
    error message of a second start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> bool:
        """Take the lock; return True when it was taken over from a dead launcher.

        Raises StackLockedError, naming the running pid, when a live launcher holds it.
        """
        if self._handle is not None:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StackLockedError(
                f"the local stack in {self.path.parent} is already running (pid {holder}); stop "
                f"it with Ctrl-C in its terminal or `kill {holder}`, or use another state folder "
                f"by setting ML_LOOP_STATE_DIR"
            ) from None
        handle.seek(0)
        previous = handle.read().strip()
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        stale = bool(previous) and previous != str(os.getpid())
        if stale:
            logger.warning(
                "took over the stale lock %s of pid %s, which is gone", self.path, previous
            )
        return stale

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self._handle.seek(0)
            self._handle.truncate()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


@dataclasses.dataclass
class RunningService:
    """A started service: its process, its log file and when it started."""

    spec: ServiceSpec
    process: subprocess.Popen
    log_path: Path
    log_offset: int
    started_at: dt.datetime
    started_monotonic: float
    ready: bool = False

    @property
    def pgid(self) -> int:
        """Process group id; the service's pid, because each service leads its own session."""
        return self.process.pid

    def log_tail(self, max_chars: int = LOG_TAIL_CHARS) -> str:
        """Return the end of what this start of the service wrote to its log."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.log_offset)
                text = handle.read().decode(errors="replace")
        except OSError as err:
            return f"(log {self.log_path} not readable: {err})"
        return text[-max_chars:] if text else "(the log is empty)"


def start_service(spec: ServiceSpec, env: Mapping[str, str], logs_dir: Path) -> RunningService:
    """Start one service in a new session, with stdout and stderr appended to its log file."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = logs_dir / f"{spec.name}.log"
    started_at = dt.datetime.now(dt.UTC)
    with log_path.open("ab") as log:
        offset = log.tell()
        log.write(f"=== {started_at.isoformat()} start: {' '.join(spec.argv)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, **spec.env},
                start_new_session=True,
            )
        except OSError as err:
            raise ServiceStartError(
                f"service {spec.name} could not start {spec.argv[0]!r}: {err}; check that the "
                "virtual environment's bin folder contains it"
            ) from err
    logger.info("started %s (pid %s), log %s", spec.name, process.pid, log_path)
    return RunningService(spec, process, log_path, offset, started_at, time.monotonic())


def start_all(
    specs: list[ServiceSpec],
    env: Mapping[str, str],
    logs_dir: Path,
    started: list[RunningService],
    on_started: Callable[[list[RunningService]], None] | None = None,
) -> None:
    """Start every service once the services it comes after are ready; wait until all are ready.

    Each started service is appended to ``started`` at once, and ``on_started`` is called with
    the list, so the caller can record and stop them all when this raises ServiceStartError
    (a service exited, or was not ready within its timeout).
    """
    names = {spec.name for spec in specs}
    for spec in specs:
        missing = [name for name in spec.after if name not in names]
        if missing:
            raise StackConfigError(
                f"service {spec.name} starts after {', '.join(missing)}, which is not in the "
                f"service list {sorted(names)}; add it or drop {spec.name}"
            )
    pending = list(specs)
    while True:
        ready = {service.spec.name for service in started if service.ready}
        for spec in [spec for spec in pending if set(spec.after) <= ready]:
            pending.remove(spec)
            started.append(start_service(spec, env, logs_dir))
            if on_started is not None:
                on_started(started)
        waiting = [service for service in started if not service.ready]
        if not waiting and not pending:
            return
        for service in waiting:
            _check_ready(service)
        time.sleep(POLL_INTERVAL_S)


def _check_ready(service: RunningService) -> None:
    name = service.spec.name
    code = service.process.poll()
    if service.spec.one_shot and code == 0:
        service.ready = True
        logger.info("%s finished in %.1f s", name, time.monotonic() - service.started_monotonic)
        return
    if code is not None:
        raise ServiceStartError(
            f"service {name} exited with code {code} during startup; "
            f"log {service.log_path} ends with:\n{service.log_tail()}"
        )
    probe = service.spec.ready
    if not service.spec.one_shot and (probe is None or probe(service.started_at)):
        if not _probe_reached_service(service):
            return
        service.ready = True
        logger.info("%s is ready after %.1f s", name, time.monotonic() - service.started_monotonic)
        return
    if time.monotonic() - service.started_monotonic > service.spec.timeout_s:
        raise ServiceStartError(
            f"service {name} was not ready within {service.spec.timeout_s:.0f} s; raise "
            f"ML_LOOP_STARTUP_TIMEOUT_S on a slow machine; log {service.log_path} ends with:\n"
            f"{service.log_tail()}"
        )


def _probe_reached_service(service: RunningService) -> bool:
    """Check that the process that responded to the readiness probe belongs to the service.

    A server that is still importing its code, or that is about to fail with "address already
    in use", is alive while another process responds on its port. So an HttpCheck only counts
    when a process of the service's group listens on the probed port. Returns False when the
    service exited meanwhile or nothing listens on the port any more (the next poll decides),
    and raises ServiceStartError when a process outside the group listens on it.
    """
    if service.process.poll() is not None:
        return False
    probe = service.spec.ready
    if not isinstance(probe, HttpCheck):
        return True
    port = probe.port
    listeners = listening_socket_inodes(port)
    if listeners is None:
        # Without /proc/net (not Linux) the owner of a socket cannot be looked up.
        return True
    if not listeners:
        return False
    if listeners & group_socket_inodes(service.pgid):
        return True
    variables = [binding.env_var for binding in service.spec.ports if binding.port == port]
    move = f"set {variables[0]} to a free port" if variables else "move the service to a free port"
    raise ServiceStartError(
        f"the readiness probe of {service.spec.name} ({probe.url}) got a response, but no "
        f"process of {service.spec.name} (process group {service.pgid}) listens on port {port}: "
        f"another process took the port; stop that process or {move}; log {service.log_path} "
        f"ends with:\n{service.log_tail()}"
    )


def listening_socket_inodes(port: int) -> set[int] | None:
    """Return the inodes of TCP sockets that listen on ``port``, or None without /proc/net.

    Reads ``/proc/net/tcp`` and ``/proc/net/tcp6``, which list the sockets of this process's
    network namespace, the one the stack's services run in.
    """
    inodes: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            # Fields: sl, local_address (hex IP:port), rem_address, st (0A = LISTEN), tx_queue
            # and rx_queue, tr and tm->when, retrnsmt, uid, timeout, inode, ...
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes if readable else None


def group_socket_inodes(pgid: int) -> set[int]:
    """Return the inodes of the sockets that the live processes of a process group hold open."""
    inodes: set[int] = set()
    for pid in group_members(pgid):
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target.removeprefix("socket:[").removesuffix("]")))
    return inodes


def find_exited(services: Iterable[RunningService]) -> RunningService | None:
    """Return the first server (not one-shot service) whose main process has exited, if any."""
    for service in services:
        if not service.spec.one_shot and service.process.poll() is not None:
            return service
    return None


def stop_all(services: list[RunningService], grace_s: float = STOP_GRACE_S) -> None:
    """Send SIGTERM to every service's process group, then SIGKILL what is left after grace_s."""
    started = time.monotonic()
    for service in services:
        _signal_group(service.pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for service in services:
        _wait_group(service, deadline)
    for service in services:
        if group_members(service.pgid):
            logger.warning(
                "%s (process group %s) did not stop within %.0f s; sending SIGKILL",
                service.spec.name,
                service.pgid,
                grace_s,
            )
            _signal_group(service.pgid, signal.SIGKILL)
    for service in services:
        _wait_group(service, time.monotonic() + 5)
        left = group_members(service.pgid)
        if left:
            logger.error(
                "%s (process group %s) still has processes %s after SIGKILL",
                service.spec.name,
                service.pgid,
                left,
            )
    servers = [service for service in services if not service.spec.one_shot]
    logger.info(
        "stopped %s in %.1f s",
        ", ".join(f"{service.spec.name} (pid {service.pgid})" for service in servers),
        time.monotonic() - started,
    )


def _wait_group(service: RunningService, deadline: float) -> None:
    while time.monotonic() < deadline:
        service.process.poll()
        if service.process.returncode is not None and not group_members(service.pgid):
            return
        time.sleep(0.1)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Return the pids of live (not zombie) processes in a process group.

    Reads ``/proc`` where it exists, because orphaned zombies that no process reaps still count
    as group members for ``kill``. Elsewhere it falls back to ``killpg(pgid, 0)``.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None and stat["pgrp"] == pgid and stat["state"] != "Z":
            members.append(int(entry.name))
    return members


def process_start_ticks(pid: int) -> int | None:
    """Return a process's start time in clock ticks since boot, or None when it is gone.

    Together with the pid it identifies a process, because the kernel reuses pids.
    """
    stat = _read_stat(pid)
    return None if stat is None else stat["starttime"]


def _read_stat(pid: int) -> dict[str, int | str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces, so split after the last one.
    fields = text[text.rindex(")") + 2 :].split()
    return {"state": fields[0], "pgrp": int(fields[2]), "starttime": int(fields[19])}


class ProcessRecord:
    """``processes.json``: the process groups of the running stack, for cleanup after a crash.

    When a launcher dies without stopping its services (SIGKILL, a crash), the next start finds
    this file beside the stale lock and stops those groups. It skips a group whose leader runs
    with another start time than the recorded one, because that pid was reused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, services: Iterable[RunningService]) -> None:
        entries = [
            {
                "name": service.spec.name,
                "pgid": service.pgid,
                "start_ticks": process_start_ticks(service.pgid),
            }
            for service in services
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=2) + "\n")
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def stop_leftovers(self, grace_s: float = STOP_GRACE_S) -> list[str]:
        """Stop the recorded groups that are still running; return their service names."""
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError:
            logger.warning("ignoring unreadable %s", self.path)
            self.clear()
            return []
        leftovers = []
        for entry in entries:
            pgid = entry["pgid"]
            ticks = process_start_ticks(pgid)
            leader_matches = ticks is None or ticks == entry.get("start_ticks")
            if leader_matches and group_members(pgid):
                leftovers.append((entry["name"], pgid))
        for name, pgid in leftovers:
            logger.warning("stopping %s (process group %s) left by a dead launcher", name, pgid)
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _name, pgid in leftovers:
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if group_members(pgid):
                _signal_group(pgid, signal.SIGKILL)
        self.clear()
        return [name for name, _ in leftovers]
