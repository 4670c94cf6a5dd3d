"""Running ``paywall-proxy serve`` for the benchmarks: its database, a key, its start-up,
a leftover embedded PostgreSQL, an earlier release checked out to run next to it, and the
resident memory and CPU time of its process tree (and PostgreSQL's CPU time).

Used by bench/run.py for every proxy setup and by bench/open_streams.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs in the venv
from common import check_survived, free_port, progress, running, tail, wait_ready

PROXY = Path(sys.executable).with_name("paywall-proxy")
MB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
IMPORTED = "bench: proxy imported from "


def _server_version(url: str) -> str:
    """The PostgreSQL server's version, e.g. "15.14"; fails loudly if it cannot connect."""
    async def ask() -> str:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return str(await conn.fetchval("show server_version")).split()[0]
        finally:
            await conn.close()

    try:
        return asyncio.run(ask())
    except (OSError, TimeoutError, asyncpg.PostgresError) as e:
        raise RuntimeError(f"cannot connect to the DATABASE_URL: {e}") from e


def database_env(workdir: Path) -> tuple[dict[str, str], str]:
    """The proxy's environment for its database, and a line saying which one it is:
    ``DATABASE_URL`` when it is set, else the proxy's embedded PostgreSQL in the temp dir.

    ``REDIS_URL`` is left out: only the Redis setup gets one, the harness's own.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "PAYWALL_DATA_DIR", "REDIS_URL")}
    if url := os.environ.get("DATABASE_URL"):
        return ({**env, "DATABASE_URL": url},
                f"PostgreSQL {_server_version(url)} from DATABASE_URL")
    return {**env, "PAYWALL_DATA_DIR": str(workdir / "data")}, "embedded PostgreSQL"


def embedded_version(data_dir: Path) -> str | None:
    """The major version of an embedded PostgreSQL in ``data_dir``, once it is made."""
    with contextlib.suppress(OSError):
        return (data_dir / "pg" / "PG_VERSION").read_text(encoding="utf-8").strip()
    return None


async def execute(url: str, statement: str) -> None:
    """Run one statement on a connection of its own (CREATE/DROP DATABASE)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def run_sql(url: str, statement: str) -> None:
    asyncio.run(execute(url, statement))


def with_database(url: str, name: str) -> str:
    """``url`` naming the database ``name`` on the same server."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@contextlib.contextmanager
def own_database(env: Mapping[str, str], data_dir: Path) -> Iterator[tuple[dict[str, str], str]]:
    """``env`` (from :func:`database_env`) for a second proxy with a database of its own,
    and a line saying which: with ``DATABASE_URL``, a new database on the same server,
    dropped at the end; else an embedded PostgreSQL in ``data_dir``, stopped at the end.

    Each proxy migrates only its own database, so an earlier release never meets the
    schema of a later one, nor the reverse.
    """
    if (url := env.get("DATABASE_URL")) is None:
        try:
            yield {**env, "PAYWALL_DATA_DIR": str(data_dir)}, "its own embedded PostgreSQL"
        finally:
            stop_leftover_postgres(data_dir)
        return
    name = "paywall_bench_" + secrets.token_hex(4)
    run_sql(url, f"CREATE DATABASE {name}")
    try:
        yield ({**env, "DATABASE_URL": with_database(url, name)},
               f"its own database {name} on the DATABASE_URL's server, dropped after the run")
    finally:
        run_sql(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def fresh_database(workdir: Path) -> Iterator[tuple[dict[str, str], str]]:
    """:func:`database_env`, with a database made for this run when ``DATABASE_URL`` is
    set (a new one on its server, dropped at the end, as :func:`own_database`), so that
    no run inherits the rows of the runs before it, as the previous release's never
    does; the embedded PostgreSQL in ``workdir`` is new each run anyway."""
    env, database = database_env(workdir)
    if "DATABASE_URL" not in env:
        yield env, database
        return
    with own_database(env, workdir / "data") as (own, line):
        yield own, f"{database}, {line}"


@dataclass(frozen=True, slots=True)
class Release:
    """An earlier release of the proxy, extracted from git into ``root``, run with this
    virtualenv's Python (and so its packages) and that release's own ``proxy`` package."""

    ref: str
    commit: str  # abbreviated
    root: Path

    @property
    def command(self) -> list[str]:
        # -P keeps the current directory off sys.path, where the project's own
        # checkout would shadow PYTHONPATH; the release says which package it imported.
        return [sys.executable, "-P", "-c",
                f"import sys, proxy; print({IMPORTED!r} + proxy.__file__, file=sys.stderr, "
                "flush=True); from proxy.cli import main; sys.exit(main())"]

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {**env, "PYTHONPATH": str(self.root)}

    def check_imported(self, output: str) -> None:
        """Fail unless ``output`` (the release's stderr) shows it imported its own code."""
        expected = str(self.root / "proxy" / "__init__.py")
        found = [line.removeprefix(IMPORTED) for line in output.splitlines()
                 if line.startswith(IMPORTED)]
        if found != [expected]:
            raise RuntimeError(f"{self.ref} should run {expected}; it imported "
                               f"{', '.join(found) or 'nothing it reported'}")


def resolve_release(ref: str) -> str:
    """The abbreviated commit of ``ref`` in the project's repository; fails if none."""
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--short",
                           f"{ref}^{{commit}}"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"--previous {ref}: not a commit here: {done.stderr.strip()}")
    return done.stdout.strip()


def check_out(ref: str, root: Path) -> Release:
    """``git archive`` of ``ref`` extracted into ``root`` (no worktree to clean up)."""
    commit = resolve_release(ref)
    done = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git archive {commit} failed: {done.stderr.decode().strip()}")
    root.mkdir()
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(root, filter="data")
    return Release(ref, commit, root)


def create_key(config: Path, env: Mapping[str, str], paywall: str,
               release: Release | None = None) -> str:
    """Mint a key with ``paywall-proxy keys create``, or with ``release``'s."""
    command = [str(PROXY)] if release is None else release.command
    done = subprocess.run([*command, "keys", "create", "--paywall", paywall,
                           "--config", str(config)],
                          env=dict(env), capture_output=True, text=True, check=False, timeout=180)
    key = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    if done.returncode != 0 or not key:
        raise RuntimeError(f"paywall-proxy keys create failed (status {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    if release is not None:
        release.check_imported(done.stderr)
    return key


def wait_started(name: str, proc: subprocess.Popen[bytes], log: Path, workers: int,
                 timeout: float = 180) -> None:
    """Wait until each of the ``workers`` has logged the end of its start-up (uvicorn's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail(log)}")
        text = log.read_text(encoding="utf-8", errors="replace")
        if text.count("Application startup complete.") >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name}'s {workers} workers not all started after "
                       f"{timeout:.0f} s:\n{tail(log)}")


@contextlib.contextmanager
def serve_proxy(config: Path, env: Mapping[str, str], workers: int, log: Path,
                release: Release | None = None,
                ) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``paywall-proxy serve --workers N`` on a free port, once every worker has started;
    yields the process and the port. Fails if the proxy exits before the end. With
    ``release``, that release's serve instead, checked to run its own code."""
    port = free_port()
    command: Sequence[str] = [str(PROXY)] if release is None else release.command
    argv = [*command, "serve", "--config", str(config), "--port", str(port),
            "--workers", str(workers)]
    # Stopping includes an embedded PostgreSQL's shutdown.
    with running(argv, log, env, stop_timeout=60) as proc:
        wait_ready("the proxy", proc, log, f"http://127.0.0.1:{port}/healthz", timeout=180)
        wait_started("the proxy", proc, log, workers)
        if release is not None:
            release.check_imported(log.read_text(encoding="utf-8", errors="replace"))
        yield proc, port
        check_survived("the proxy", proc, log)


def stop_leftover_postgres(data_dir: Path) -> None:
    """Stop an embedded PostgreSQL still running on ``data_dir`` once the proxy is gone.

    The proxy stops the one it started when it exits; if it ever does not, the server
    would outlive the temp dir, so it is found by its pid file and stopped here.
    """
    try:
        pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        server = psutil.Process(pid)
        if str(data_dir) not in " ".join(server.cmdline()):
            return
    except (OSError, ValueError, IndexError, psutil.Error):
        return
    progress(f"the embedded PostgreSQL (pid {pid}) outlived the proxy; stopping it")
    with contextlib.suppress(psutil.Error):
        server.terminate()
        deadline = time.monotonic() + 15
        while server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                server.kill()
                break
            time.sleep(0.1)


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its descendants, less an embedded PostgreSQL."""
    with contextlib.suppress(psutil.Error):
        processes = []
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                if p.name() not in ("postgres", "pg_ctl"):
                    processes.append(p)
        return processes
    return []


def rss_of(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_rss(root: psutil.Process) -> int:
    return rss_of(process_tree(root))


def tree_fds(root: psutil.Process) -> int:
    """The file descriptors (sockets included) open in ``root``'s tree."""
    total = 0
    for p in process_tree(root):
        with contextlib.suppress(psutil.Error):
            total += p.num_fds()
    return total


class RssSampler:
    """Samples the resident memory of the one process tree under load, in the background.

    Only one tree is sampled at a time (none while nginx itself is measured), so the
    sampling costs the same whatever the number of servers. On request it also keeps the
    most file descriptors the tree had open.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._root: psutil.Process | None = None
        self._peak = 0
        self._fds: int | None = None  # the most open at once, when counted
        self._samples: list[tuple[float, int]] = []  # (time.monotonic(), bytes)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def track(self, root: psutil.Process | None, count_fds: bool = False) -> None:
        """Sample ``root``'s tree from now on (nothing if None); the peak and the
        samples start anew."""
        now = 0 if root is None else tree_rss(root)
        fds = tree_fds(root) if root is not None and count_fds else None
        with self._lock:
            self._root, self._peak, self._fds = root, now, fds
            self._samples = [] if root is None else [(time.monotonic(), now)]

    def peak_fds(self) -> int | None:
        """The most file descriptors the tracked tree had open, if :meth:`track` was asked
        to count them."""
        with self._lock:
            return self._fds

    def peak(self) -> int:
        """The peak of the tracked tree since :meth:`track`."""
        with self._lock:
            root = self._root
        now = 0 if root is None else tree_rss(root)
        with self._lock:
            return max(self._peak, now)

    def peak_between(self, start: float, end: float) -> int | None:
        """The highest sample taken from ``start`` to ``end`` (``time.monotonic()``), or
        None if none was."""
        with self._lock:
            return max((v for t, v in self._samples if start <= t <= end), default=None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                root = self._root
            if root is None:
                continue
            now = tree_rss(root)
            with self._lock:
                counting = self._fds is not None
            fds = tree_fds(root) if counting else None
            with self._lock:
                if self._root is root:
                    self._peak = max(self._peak, now)
                    self._samples.append((time.monotonic(), now))
                    if fds is not None and self._fds is not None:
                        self._fds = max(self._fds, fds)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()



# --- CPU time --------------------------------------------------------------------

# A process is its pid and its start: a pid the system reused names another process.
ProcKey = tuple[int, float]


def cpu_seconds(processes: Iterable[psutil.Process]) -> dict[ProcKey, float]:
    """Each process's CPU time so far, user + system (children it reaped left out); a
    process gone or out of reach is left out."""
    times = {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            times[p.pid, p.create_time()] = t.user + t.system
    return times


def postgres_processes() -> list[psutil.Process]:
    """Every process on the machine named ``postgres``: the postmaster, auxiliary
    processes and backends of every server, the DATABASE_URL's and any embedded one."""
    found = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "postgres":
            found.append(p)
    return found


@dataclass(frozen=True, slots=True)
class PostgresServers:
    """The PostgreSQL servers the run's proxies use, by the pid of their postmaster.

    A session over a Unix socket cannot be traced to its client: on a server the proxies
    reach over TCP (the DATABASE_URL's) it is someone else's; on an embedded one, which
    only the run's proxies reach, over its Unix socket, it is the run's.
    """

    tcp: frozenset[int]
    local: frozenset[int]

    @property
    def known(self) -> frozenset[int]:
        return self.tcp | self.local


def _postmaster_of_url(url: str) -> int | None:
    """The pid of the postmaster of the DATABASE_URL's server, if it runs on this machine."""
    async def postmaster() -> psutil.Process | None:
        conn = await asyncpg.connect(url, timeout=10)
        try:  # while the backend runs
            return psutil.Process(int(await conn.fetchval("select pg_backend_pid()"))).parent()
        finally:
            await conn.close()

    try:
        server = asyncio.run(postmaster())
        return None if server is None or server.name() != "postgres" else int(server.pid)
    except (OSError, TimeoutError, asyncpg.PostgresError, psutil.Error):
        return None


def _postmaster_of_dir(data_dir: Path) -> int | None:
    """The pid of an embedded PostgreSQL running on ``data_dir``, from its pid file."""
    try:
        pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        return pid if psutil.Process(pid).name() == "postgres" else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def postgres_servers(url: str | None, data_dirs: Sequence[Path]) -> PostgresServers | None:
    """The servers of a run: ``url``'s (DATABASE_URL), and the embedded ones running on
    ``data_dirs``; None if one of them is not found on this machine. A URL naming a
    socket directory (``host=/…``) counts as an embedded server does."""
    tcp: set[int] = set()
    local: set[int] = set()
    if url:
        if (pid := _postmaster_of_url(url)) is None:
            return None
        parts = urlsplit(url)
        host = parts.hostname or ""
        over_tcp = bool(host) and not host.startswith("%2f") and "host=" not in parts.query
        (tcp if over_tcp else local).add(pid)
    for data_dir in data_dirs:
        if (pid := _postmaster_of_dir(data_dir)) is None:
            return None
        local.add(pid)
    return PostgresServers(frozenset(tcp), frozenset(local))


def others_sessions(postgres: Sequence[psutil.Process], tree: set[int],
                    servers: PostgresServers | None) -> set[int]:
    """The pids of those ``postgres`` processes that do not work for the processes
    ``tree``: every process of a server not in ``servers`` (all of them when it is empty,
    none when it is None: unknown), and the backends of the others whose client is not in
    ``tree``, seen by their TCP connection (also a client not on this machine) or, for a
    Unix socket, as :class:`PostgresServers` says. Auxiliary processes of the run's
    servers (walwriter, checkpointer…) are the run's."""
    pids = {p.pid for p in postgres}
    try:
        sockets = psutil.net_connections(kind="tcp")
    except psutil.Error:
        sockets = []
    owner = {(c.laddr, c.raddr): c.pid for c in sockets if c.raddr and c.pid is not None}
    clients = {c.pid: owner.get((c.raddr, c.laddr)) for c in sockets
               if c.pid in pids and c.raddr}
    others = set()
    for p in postgres:
        with contextlib.suppress(psutil.Error):
            parent = p.ppid()
            server = parent if parent in pids else p.pid
            if servers is not None and server not in servers.known:
                others.add(p.pid)
            elif p.pid in clients:
                if clients[p.pid] not in tree:
                    others.add(p.pid)
            elif (servers is not None and server in servers.tcp
                  and "[local]" in " ".join(p.cmdline()).split()):
                others.add(p.pid)
    return others


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """The CPU seconds (user + system) each process had used at one instant."""

    server: dict[ProcKey, float]  # the server's process tree, less any postgres
    postgres: dict[ProcKey, float]  # every postgres process on the machine
    others: frozenset[ProcKey]  # of those, the ones not working for the server
    extra: dict[ProcKey, float]  # other processes asked for (a redis-server)


def cpu_snapshot(root: psutil.Process, servers: PostgresServers | None = None,
                 extra: Sequence[psutil.Process] = ()) -> CpuSnapshot:
    """The CPU time so far of ``root``'s tree (less an embedded PostgreSQL), of every
    ``postgres`` process on the machine (telling apart those of other servers than
    ``servers`` and other clients' sessions), and of ``extra``."""
    tree = process_tree(root)
    postgres = postgres_processes()
    others = others_sessions(postgres, {p.pid for p in tree}, servers)
    times = cpu_seconds(postgres)
    return CpuSnapshot(cpu_seconds(tree), times,
                       frozenset(k for k in times if k[0] in others), cpu_seconds(extra))


@dataclass(frozen=True, slots=True)
class CpuUse:
    """The CPU seconds (user + system) used between two :class:`CpuSnapshot`.

    A process only in the second counts with its whole CPU time; one only in the first
    has exited: the CPU time it used after the first is lost, and only ``vanished``
    counts it.
    """

    server_s: float
    postgres_s: float  # the postgres processes working for the server
    postgres_others_s: float  # every other postgres process on the machine
    extra_s: float
    vanished: int  # processes that exited in between (other postgres processes left out)


def _used(before: Mapping[ProcKey, float], after: Mapping[ProcKey, float],
          keys: Iterable[ProcKey]) -> float:
    return sum(after[k] - before.get(k, 0.0) for k in keys if k in after)


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> CpuUse:
    others = before.others | after.others
    vanished = (len(before.server.keys() - after.server.keys())
                + len(before.postgres.keys() - after.postgres.keys() - others)
                + len(before.extra.keys() - after.extra.keys()))
    return CpuUse(_used(before.server, after.server, after.server),
                  _used(before.postgres, after.postgres, after.postgres.keys() - others),
                  _used(before.postgres, after.postgres, others),
                  _used(before.extra, after.extra, after.extra), vanished)
