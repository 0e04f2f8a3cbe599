"""The ssh backend: shards on hosts the clinic lists (its own cluster, or EC2 instances), via paramiko.

Everything per host happens on all hosts at once (one thread each): connect, stage the sealed
bundle by SFTP (once per host; a bundle already in S3 is fetched by the worker itself), launch the
worker, collect the sealed tally by SFTP, and remove the host's work folder. That is what keeps
the per-node overhead (beta) flat. Retries, deadlines and progress: base.Backend.run; this module
starts a shard on a free host slot (each on its own thread: run, then collect) and stops it.

The data key goes to each worker on its channel's standard input; it is never on a command line
and never in a file. Host keys are checked against a known-hosts file (paramiko's RejectPolicy);
``strict_host_keys=False`` accepts unknown keys, for test setups only. A shard that fails (worker
exit status, lost connection, deadline) runs again on another host while there is one.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import socket
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paramiko

from cloud.backends.base import Attempt, Backend
from cloud.errors import DispatchError
from cloud.worker import ShardTask

LOGGER = logging.getLogger(__name__)

POLL_S = 0.02  # how often Backend.run looks for ended shards (a look at futures: cheap)
CHANNEL_WAIT_S = 0.25  # at most this late a shard thread sees a stop (deadline, cancel)
EOF_WAIT_S = 5.0  # at most this long for a finished worker's last output after its exit status


@dataclass(frozen=True)
class SshHost:
    """One worker host. `command` starts the worker there; the task's arguments are appended."""

    host: str
    port: int = 22
    user: str = "mcnode"
    key_file: str | None = None
    work_dir: str = "/tmp/mcnode"
    command: str = "mcnode worker"
    slots: int = 1  # shards this host runs at the same time

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}:{self.work_dir}"


def _is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


def _local_path(uri: str) -> Path:
    return Path(urlparse(uri).path)


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = [p for p in path.split("/") if p]
    current = ""
    for part in parts:
        current += "/" + part
        try:
            sftp.stat(current)
        except FileNotFoundError:
            sftp.mkdir(current, mode=0o700)


def _sftp_rmtree(sftp: paramiko.SFTPClient, path: str) -> None:
    for entry in sftp.listdir_attr(path):
        child = f"{path}/{entry.filename}"
        if entry.st_mode is not None and stat.S_ISDIR(entry.st_mode):
            _sftp_rmtree(sftp, child)
        else:
            sftp.remove(child)
    sftp.rmdir(path)


@dataclass(eq=False)
class _Conn:
    """A connected host: its client, one SFTP session, its work folder for this run."""

    host: SshHost
    client: paramiko.SSHClient
    folder: str
    sftp: paramiko.SFTPClient | None = None
    staged: dict[str, str] = field(default_factory=dict)  # local bundle URI -> remote path
    alive: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def exec(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        _stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
        code = stdout.channel.recv_exit_status()
        return code, stderr.read().decode(errors="replace").strip()


class _Pool:
    """Open connections (client + SFTP session) kept between runs, so a job on warm hosts skips the
    TCP connect, key exchange and authentication that dominate a cold run's per-node cost
    (BENCHMARKS.md, "Scale"). A connection is lent to one run at a time; one idle longer than the
    backend's `keep_connections_s` is closed."""

    def __init__(self) -> None:
        self._idle: dict[tuple[object, ...], list[tuple[float, paramiko.SSHClient, paramiko.SFTPClient]]] = {}
        self._lock = threading.Lock()

    def take(self, key: tuple[object, ...], keep_s: float) -> tuple[paramiko.SSHClient, paramiko.SFTPClient] | None:
        self.close_idle(keep_s)
        with self._lock:
            entries = self._idle.get(key, [])
            while entries:
                _since, client, sftp = entries.pop()
                transport = client.get_transport()
                if transport is not None and transport.is_active():
                    return client, sftp
                sftp.close()
                client.close()
        return None

    def give(self, key: tuple[object, ...], client: paramiko.SSHClient, sftp: paramiko.SFTPClient) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append((time.monotonic(), client, sftp))

    def close_idle(self, keep_s: float = 0.0) -> None:
        """Close the connections idle for keep_s or longer (all of them with 0)."""
        now = time.monotonic()
        closing = []
        with self._lock:
            for key, entries in list(self._idle.items()):
                keep = [e for e in entries if now - e[0] < keep_s]
                closing += [e for e in entries if now - e[0] >= keep_s]
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        for _since, client, sftp in closing:
            sftp.close()
            client.close()


POOL = _Pool()


@dataclass(frozen=True)
class _Shard:
    """A shard running on a host's slot, on its own thread."""

    conn: _Conn
    stop: threading.Event
    future: Future[str | None]


class SshBackend(Backend):
    name = "ssh"

    def __init__(self, retries: int = 2, deadline_s: float = 3600.0, *,
                 hosts: Sequence[SshHost | Mapping[str, Any]] = (), known_hosts: str | Path | None = None,
                 strict_host_keys: bool = True, connect_timeout_s: float = 10.0,
                 keep_connections_s: float = 0.0) -> None:
        super().__init__(retries, deadline_s)
        self.hosts = [h if isinstance(h, SshHost) else SshHost(**h) for h in hosts]
        if not self.hosts:
            raise DispatchError("the ssh backend needs at least one host ([[cloud.ssh.hosts]])")
        self.known_hosts = Path(known_hosts) if known_hosts else None
        self.strict_host_keys = strict_host_keys
        self.connect_timeout_s = connect_timeout_s
        # > 0: connections stay open this long after a run, for the next run to the same host
        self.keep_connections_s = keep_connections_s
        # (phase, seconds) of the last run, per host or shard: connect, stage, exec, collect, close.
        # For the overhead benchmark's profile; appended from many threads (list.append is atomic).
        self.phases: list[tuple[str, float]] = []
        self.last_argv: list[list[str]] = []  # worker argv as launched (no secrets), for audit and tests
        self.poll_s = POLL_S
        self._conns: list[_Conn] = []
        self._free: list[_Conn] = []  # one entry per free slot
        self._pool: ThreadPoolExecutor | None = None

    def workers(self) -> int:
        return sum(h.slots for h in self.hosts)

    # --- per host, all hosts at once -------------------------------------------------------

    def _pool_key(self, host: SshHost) -> tuple[object, ...]:
        return (host.host, host.port, host.user, host.key_file, str(self.known_hosts), self.strict_host_keys)

    def _connect(self, host: SshHost, job_id: str) -> _Conn:
        if self.keep_connections_s > 0:
            warm = POOL.take(self._pool_key(host), self.keep_connections_s)
            if warm is not None:
                try:
                    return self._new_folder(host, *warm)
                except (paramiko.SSHException, OSError, EOFError):
                    warm[1].close()
                    warm[0].close()  # a stale connection: connect afresh below
        client = paramiko.SSHClient()
        if self.known_hosts is not None:
            if self.known_hosts.exists():
                client.load_host_keys(str(self.known_hosts))
        else:
            client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.RejectPolicy() if self.strict_host_keys
                                           else paramiko.AutoAddPolicy())
        try:
            # TCP_NODELAY: SFTP's small request/answer pairs otherwise meet delayed ACKs (~40 ms each)
            sock = socket.create_connection((host.host, host.port), timeout=self.connect_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.connect(host.host, port=host.port, username=host.user, key_filename=host.key_file, sock=sock,
                           timeout=self.connect_timeout_s, banner_timeout=self.connect_timeout_s,
                           auth_timeout=self.connect_timeout_s, allow_agent=False,
                           look_for_keys=host.key_file is None)
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(15)
            # folders by SFTP, not by a shell: a host's shell start-up files can cost a lot per command
            sftp = client.open_sftp()
            _sftp_makedirs(sftp, host.work_dir.rstrip("/"))
            return self._new_folder(host, client, sftp)
        except BaseException:
            client.close()
            raise

    def _new_folder(self, host: SshHost, client: paramiko.SSHClient, sftp: paramiko.SFTPClient) -> _Conn:
        """This run's own folder on the host (removed when the run ends)."""
        folder = f"{host.work_dir.rstrip('/')}/{secrets.token_hex(4)}"
        sftp.mkdir(folder, mode=0o700)
        return _Conn(host, client, folder, sftp)

    def _stage(self, conn: _Conn, bundles: list[str]) -> None:
        assert conn.sftp is not None
        for i, uri in enumerate(bundles):
            if _is_local(uri):
                remote = f"{conn.folder}/bundle-{i}.sealed"
                conn.sftp.put(str(_local_path(uri)), remote, confirm=False)
                conn.staged[uri] = remote

    def _connect_all(self, job_id: str, bundles: list[str]) -> list[_Conn]:
        def one(host: SshHost) -> _Conn:
            t0 = time.perf_counter()
            conn = self._connect(host, job_id)
            t1 = time.perf_counter()
            try:
                self._stage(conn, bundles)
            except BaseException:
                self._close_conn(conn)
                raise
            self.phases.extend([("connect", t1 - t0), ("stage", time.perf_counter() - t1)])
            return conn

        conns: list[_Conn] = []
        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=len(self.hosts), thread_name_prefix="ssh-open") as pool:
            futures = {pool.submit(one, h): h for h in self.hosts}
            for fut, host in futures.items():
                try:
                    conns.append(fut.result())
                except (paramiko.SSHException, OSError, EOFError, DispatchError) as exc:
                    why = f"{host.label}: {type(exc).__name__}: {exc}"
                    errors.append(why)
                    LOGGER.warning("job %s: host unusable, %s", job_id, why)
        if not conns:
            raise DispatchError(f"no ssh host could be used ({'; '.join(errors)})")
        return conns

    def _close_conn(self, conn: _Conn) -> None:
        """Remove the run's folder; keep the connection for the next run (pooled) or close it."""
        t0 = time.perf_counter()
        keep = False
        try:
            transport = conn.client.get_transport()
            if conn.sftp is not None and transport is not None and transport.is_active():
                _sftp_rmtree(conn.sftp, conn.folder)
                keep = self.keep_connections_s > 0 and conn.alive
        except (paramiko.SSHException, OSError, EOFError) as exc:
            LOGGER.warning("%s: could not remove %s: %s", conn.host.label, conn.folder, exc)
        finally:
            if keep and conn.sftp is not None:
                POOL.give(self._pool_key(conn.host), conn.client, conn.sftp)
            else:
                if conn.sftp is not None:
                    conn.sftp.close()
                conn.client.close()
            self.phases.append(("close", time.perf_counter() - t0))

    def _close_all(self, conns: list[_Conn]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(conns)), thread_name_prefix="ssh-close") as pool:
            list(pool.map(self._close_conn, conns))

    # --- one shard ---------------------------------------------------------------------------

    def worker_argv(self, host: SshHost, task: ShardTask) -> list[str]:
        """The command a host runs for a task: its configured command plus the task's arguments."""
        return [*shlex.split(host.command), *task.argv()]

    def _remote_task(self, conn: _Conn, task: ShardTask) -> ShardTask:
        bundle = conn.staged.get(task.bundle_uri)
        result = task.result_uri
        if _is_local(result):
            result = f"file://{conn.folder}/shard-{task.index}.tally"
        return replace(task, bundle_uri=f"file://{bundle}" if bundle else task.bundle_uri, result_uri=result)

    def _run_shard(self, conn: _Conn, task: ShardTask, key: bytes, stop: threading.Event) -> str | None:
        """Run one shard on a host and collect its result: None, or why it failed (on its own thread)."""
        remote = self._remote_task(conn, task)
        argv = self.worker_argv(conn.host, remote)
        self.last_argv.append(argv)
        folder = shlex.quote(conn.folder)
        # `echo $$` then `exec`: the worker keeps the shell's pid, which leads its process group, so
        # one `kill -- -PID` stops it and the engine it started (the worker removes its scratch on
        # SIGTERM). Its scratch stays in the system temp folder: MCsquare cuts paths near 100 characters.
        command = f"cd {folder} && echo $$ && exec {shlex.join(argv)}"
        chan = None
        pid = ""
        try:
            transport = conn.client.get_transport()
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("connection lost")
            t0 = time.perf_counter()
            chan = transport.open_session(timeout=self.connect_timeout_s)
            chan.exec_command(command)
            chan.sendall((key.hex() + "\n").encode())
            chan.shutdown_write()
            out, err = b"", b""
            while True:
                while chan.recv_ready():
                    out += chan.recv(4096)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    err = err[-8192:]
                if not pid and b"\n" in out:
                    pid = out.split(b"\n", 1)[0].decode().strip()
                if chan.exit_status_ready():
                    break
                if stop.is_set():  # deadline, cancel, or another shard failed: Backend.run decided
                    self._kill(conn, pid)
                    return "stopped"
                if not transport.is_active():
                    raise paramiko.SSHException("connection lost")
                chan.status_event.wait(CHANNEL_WAIT_S)  # set at once when the worker exits
            code = chan.recv_exit_status()
            # sshd may send the exit status before the last of the worker's output: read to EOF
            # (bounded), or the reason a shard failed is lost ("no message").
            drain_until = time.monotonic() + EOF_WAIT_S
            while True:
                while chan.recv_stderr_ready():
                    err = (err + chan.recv_stderr(65536))[-8192:]
                while chan.recv_ready():
                    chan.recv(65536)
                if (chan.eof_received and not chan.recv_stderr_ready()) or time.monotonic() > drain_until:
                    break
                time.sleep(0.01)
            if code != 0:
                lines = err.decode(errors="replace").strip().splitlines()
                picked = [ln for ln in lines if ln.startswith("worker:")] or lines
                LOGGER.debug("worker stderr: %s", err.decode(errors="replace"))
                return f"exited with {code}: {picked[-1][:500] if picked else 'no message'}"
            t1 = time.perf_counter()
            if _is_local(task.result_uri):
                self._collect(conn, _local_path(remote.result_uri), _local_path(task.result_uri))
            self.phases.extend([("exec", t1 - t0), ("collect", time.perf_counter() - t1)])
            return None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport = conn.client.get_transport()
            if transport is None or not transport.is_active():
                conn.alive = False
            return f"lost connection or transfer failed: {type(exc).__name__}: {exc}"
        finally:
            if chan is not None:
                chan.close()

    def _collect(self, conn: _Conn, remote: Path, dst: Path) -> None:
        assert conn.sftp is not None
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.part")
        try:
            with conn.lock:
                conn.sftp.get(str(remote), str(tmp))
                conn.sftp.remove(str(remote))
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def _kill(self, conn: _Conn, pid: str) -> None:
        if not pid.isdigit():
            return
        try:
            conn.exec(f"kill -TERM -- -{pid} 2>/dev/null || kill -TERM {pid}", timeout=10)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            LOGGER.warning("%s: could not stop worker %s: %s", conn.host.label, pid, exc)

    # --- what Backend.run calls ---------------------------------------------------------------

    def _open(self, tasks: list[ShardTask], key: bytes) -> list[ShardTask]:
        self.last_argv = []
        self.phases = []
        self._conns = self._connect_all(tasks[0].job_id, sorted({t.bundle_uri for t in tasks}))
        self._free = [c for c in self._conns for _ in range(c.host.slots)]
        self._pool = ThreadPoolExecutor(max_workers=len(self._free), thread_name_prefix="ssh-shard")
        return tasks

    def _start(self, attempts: list[Attempt], room: int, key: bytes) -> list[Attempt]:
        alive = [c for c in self._conns if c.alive]
        assert self._pool is not None, "_start before _open"
        if not alive:
            raise DispatchError("every ssh host was lost")
        started: list[Attempt] = []
        for a in attempts:
            if len(started) >= room:
                break
            usable = [c for c in self._free if c.alive and self._may_use(c)]
            # another host if there is one; the same one only when every live host failed this shard
            fresh = [c for c in usable if c.host.label not in a.avoid]
            everywhere = all(c.host.label in a.avoid for c in alive)
            conn = fresh[0] if fresh else (usable[0] if usable and everywhere else None)
            if conn is None or not self._book(conn):
                continue
            self._free.remove(conn)
            stop = threading.Event()
            a.place, a.started = conn.host.label, time.monotonic()
            a.handle = _Shard(conn, stop, self._pool.submit(self._run_shard, conn, a.task, key, stop))
            started.append(a)
        return started

    # A host's slots are booked in the share when jobs run at once: every job has its own
    # connection to the host, but the host has `slots` places for all of them together.
    def _may_use(self, conn: _Conn) -> bool:
        return self.share is None or self.share.free_at(conn.host.label, conn.host.slots)

    def _book(self, conn: _Conn) -> bool:
        return self.share is None or self.share.book(conn.host.label, conn.host.slots)

    def _unbook(self, conn: _Conn) -> None:
        if self.share is not None:
            self.share.release(conn.host.label)

    def _poll(self, running: list[Attempt]) -> list[tuple[Attempt, str | None]]:
        ended: list[tuple[Attempt, str | None]] = []
        for a in running:
            shard: _Shard = a.handle
            if shard.future.done():
                self._free.append(shard.conn)
                self._unbook(shard.conn)
                ended.append((a, shard.future.result()))
        return ended

    def _stop(self, attempts: list[Attempt], reason: str) -> None:
        shards: list[_Shard] = [a.handle for a in attempts]
        for shard in shards:
            shard.stop.set()
        wait([s.future for s in shards])  # each thread stops its remote worker
        for shard in shards:
            self._free.append(shard.conn)
            self._unbook(shard.conn)

    def _close(self) -> None:
        pool, conns = getattr(self, "_pool", None), getattr(self, "_conns", [])
        if pool is not None:
            pool.shutdown(wait=True)
        self._close_all(conns)
        self._pool, self._conns, self._free = None, [], []
