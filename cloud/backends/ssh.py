"""The ssh backend: shards on hosts the clinic lists (its own cluster, or EC2 instances), via paramiko.

Everything per host happens on all hosts at once (one thread each): connect, stage the sealed
bundle by SFTP (once per host; a bundle already in S3 is fetched by the worker itself), launch the
worker, and take the sealed tally back over the same exec channel (the worker's shell sends the
result file on its standard output once the worker succeeded), then remove the host's work folder.
That is what keeps the per-node overhead (beta) flat. Retries, deadlines and progress:
base.Backend.run; this module starts a shard on a free host slot (each on its own thread) and stops it.

With pooled connections (`keep_connections_s` > 0) a connection keeps its work folder and the
bundle staged in it while it waits for the next run: the next wave of the same job (same bundle
file, same size and time) stages nothing, and a shard costs one exec channel and no SFTP request at
all (BENCHMARKS.md, "Distributed overhead at scale"). The folder is removed when the connection is
closed (idle for `keep_connections_s`, or the node stops); it holds only sealed bundles.

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
RECV_BYTES = 1 << 20  # read a shard's result off its channel this much at a time


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
    """A connected host: its client, one SFTP session, its work folder (this run's, or the pooled
    connection's own: `pooled`)."""

    host: SshHost
    client: paramiko.SSHClient
    folder: str
    sftp: paramiko.SFTPClient | None = None
    # local bundle URI -> (remote path, (size, mtime_ns) of the local file when it was staged)
    staged: dict[str, tuple[str, tuple[int, int]]] = field(default_factory=dict)
    pooled: bool = False
    alive: bool = True

    def exec(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        _stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
        code = stdout.channel.recv_exit_status()
        return code, stderr.read().decode(errors="replace").strip()


@dataclass(eq=False)
class _Warm:
    """A pooled connection: its client, SFTP session, work folder and what is staged there."""

    client: paramiko.SSHClient
    sftp: paramiko.SFTPClient
    folder: str
    staged: dict[str, tuple[str, tuple[int, int]]]

    def close(self) -> None:
        try:
            transport = self.client.get_transport()
            if transport is not None and transport.is_active():
                _sftp_rmtree(self.sftp, self.folder)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            LOGGER.warning("could not remove the pooled work folder %s: %s", self.folder, exc)
        finally:
            self.sftp.close()
            self.client.close()


class _Pool:
    """Open connections (client + SFTP session + work folder) kept between runs, so a job on warm hosts
    skips the TCP connect, key exchange and authentication that dominate a cold run's per-node cost
    (BENCHMARKS.md, "Scale"). A connection is lent to one run at a time; one idle longer than the
    backend's `keep_connections_s` is closed and its folder removed."""

    def __init__(self) -> None:
        self._idle: dict[tuple[object, ...], list[tuple[float, _Warm]]] = {}
        self._lock = threading.Lock()

    def take(self, key: tuple[object, ...], keep_s: float) -> _Warm | None:
        self.close_idle(keep_s)
        with self._lock:
            entries = self._idle.get(key, [])
            while entries:
                _since, warm = entries.pop()
                transport = warm.client.get_transport()
                if transport is not None and transport.is_active():
                    return warm
                warm.sftp.close()
                warm.client.close()
        return None

    def give(self, key: tuple[object, ...], warm: _Warm) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append((time.monotonic(), warm))

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
        for _since, warm in closing:
            warm.close()


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
            if warm is not None:  # its folder is still there: no request at all
                return _Conn(host, warm.client, warm.folder, warm.sftp, warm.staged, pooled=True)
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
        """The connection's own folder on the host: removed when the run ends, or, pooled, when the
        connection is closed."""
        folder = f"{host.work_dir.rstrip('/')}/{secrets.token_hex(4)}"
        sftp.mkdir(folder, mode=0o700)
        return _Conn(host, client, folder, sftp, pooled=self.keep_connections_s > 0)

    def _stage(self, conn: _Conn, bundles: list[str]) -> int:
        """Put the run's bundles in the folder, unless that very file is there already (a pooled
        connection that ran the job's previous wave). A bundle of another job in the same place is
        overwritten, so a pooled folder holds one job's bundles at most. Returns how many were put."""
        assert conn.sftp is not None
        put = 0
        for i, uri in enumerate(bundles):
            if not _is_local(uri):
                continue
            local = _local_path(uri)
            st = local.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            remote = f"{conn.folder}/bundle-{i}.sealed"
            if conn.staged.get(uri) == (remote, stamp):
                continue
            for other, (path, _stamp) in list(conn.staged.items()):
                if path == remote:
                    del conn.staged[other]
            conn.sftp.put(str(local), remote, confirm=False)
            conn.staged[uri] = (remote, stamp)
            put += 1
        return put

    def _connect_all(self, job_id: str, bundles: list[str]) -> list[_Conn]:
        def one(host: SshHost) -> _Conn:
            t0 = time.perf_counter()
            conn = self._connect(host, job_id)
            t1 = time.perf_counter()
            try:
                staged = self._stage(conn, bundles)
            except BaseException:
                self._close_conn(conn)
                raise
            self.phases.append(("connect", t1 - t0))
            if staged:  # nothing to put when the pooled folder has the bundle already
                self.phases.append(("stage", time.perf_counter() - t1))
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
        """Pooled: keep the connection, its folder and the staged bundle for the next run. Else
        remove the run's folder and close."""
        t0 = time.perf_counter()
        transport = conn.client.get_transport()
        active = conn.sftp is not None and transport is not None and transport.is_active()
        try:
            if conn.pooled and conn.alive and active and conn.sftp is not None:
                POOL.give(self._pool_key(conn.host), _Warm(conn.client, conn.sftp, conn.folder, conn.staged))
                return
            try:
                if active and conn.sftp is not None:
                    _sftp_rmtree(conn.sftp, conn.folder)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                LOGGER.warning("%s: could not remove %s: %s", conn.host.label, conn.folder, exc)
            finally:
                if conn.sftp is not None:
                    conn.sftp.close()
                conn.client.close()
        finally:
            self.phases.append(("close", time.perf_counter() - t0))

    def _close_all(self, conns: list[_Conn]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(conns)), thread_name_prefix="ssh-close") as pool:
            list(pool.map(self._close_conn, conns))

    # --- one shard ---------------------------------------------------------------------------

    def worker_argv(self, host: SshHost, task: ShardTask) -> list[str]:
        """The command a host runs for a task: its configured command plus the task's arguments."""
        return [*shlex.split(host.command), *task.argv()]

    def _remote_task(self, conn: _Conn, task: ShardTask) -> ShardTask:
        bundle = conn.staged[task.bundle_uri][0] if task.bundle_uri in conn.staged else None
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
        # `echo $$` first: the shell's pid leads its process group (sshd starts it in a session of its
        # own), so one `kill -- -PID` stops the shell, the worker and the engine it started (the worker
        # removes its scratch on SIGTERM). Its scratch stays in the system temp folder: MCsquare cuts
        # paths near 100 characters. A result the node keeps comes back on the channel's stdout once the
        # worker succeeded (the worker's own stdout goes to stderr), so collecting it costs no SFTP
        # request; a result in S3 stays there and the shell `exec`s the worker.
        collect = _is_local(task.result_uri)
        if collect:
            result = shlex.quote(str(_local_path(remote.result_uri)))
            command = f"cd {folder} && echo $$ && {shlex.join(argv)} >&2 && cat {result} && rm -f {result}"
        else:
            command = f"cd {folder} && echo $$ && exec {shlex.join(argv)}"
        dst = _local_path(task.result_uri) if collect else None
        tmp = None if dst is None else dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.part")
        chan = None
        pid = ""
        try:
            transport = conn.client.get_transport()
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("connection lost")
            t0 = time.perf_counter()
            chan = transport.open_session(timeout=self.connect_timeout_s)
            chan.exec_command(command)
            try:
                chan.sendall((key.hex() + "\n").encode())
                chan.shutdown_write()
            except OSError:
                # a worker that ended at once (a bad command, a crash on start) may have closed the
                # channel before reading its key: its exit status and stderr say why, read below
                if not (chan.closed or chan.exit_status_ready()):
                    raise
            chan.settimeout(CHANNEL_WAIT_S)  # at most this late a stop (deadline, cancel) is seen
            head, err, received = b"", b"", 0
            sink = None
            eof, exited_at = False, None
            try:
                while True:
                    try:
                        data = chan.recv(RECV_BYTES)
                    except TimeoutError:
                        data = None
                    if data == b"":
                        eof = True
                    elif data:
                        if not pid:  # the first line is the shell's pid
                            head, data = head + data, b""
                            if b"\n" in head:
                                line, data = head.split(b"\n", 1)
                                pid = line.decode(errors="replace").strip() or "?"
                        if data and tmp is not None:  # (an `exec`ed worker's own output is not kept)
                            if sink is None:
                                tmp.parent.mkdir(parents=True, exist_ok=True)
                                sink = open(tmp, "wb")  # noqa: SIM115 - closed in the finally below
                            sink.write(data)
                            received += len(data)
                    while chan.recv_stderr_ready():
                        err = (err + chan.recv_stderr(65536))[-8192:]
                    if chan.exit_status_ready():
                        # sshd may send the exit status before the last of the output: read to the end
                        # of it (bounded), or the result or the reason a shard failed is cut short
                        exited_at = exited_at or time.monotonic()
                        if eof or time.monotonic() - exited_at > EOF_WAIT_S:
                            break
                    if stop.is_set():  # deadline, cancel, or another shard failed: Backend.run decided
                        self._kill(conn, pid)
                        return "stopped"
                    if not transport.is_active():
                        raise paramiko.SSHException("connection lost")
                    if eof:
                        chan.status_event.wait(CHANNEL_WAIT_S)  # set at once when the worker exits
            finally:
                if sink is not None:
                    sink.close()
            code = chan.recv_exit_status()
            t1 = time.perf_counter()
            if code != 0:
                lines = err.decode(errors="replace").strip().splitlines()
                picked = [ln for ln in lines if ln.startswith("worker:")] or lines
                LOGGER.debug("worker stderr: %s", err.decode(errors="replace"))
                return f"exited with {code}: {picked[-1][:500] if picked else 'no message'}"
            if dst is not None and tmp is not None:
                if not eof:
                    return "the result did not arrive whole (no end of output after the exit status)"
                if not received:
                    return "exited with 0 but sent no result"
                os.replace(tmp, dst)
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
            if tmp is not None:
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
