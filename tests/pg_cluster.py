"""A throwaway PostgreSQL server for the tests, from Debian's ``postgresql`` package.

The server binaries live under ``/usr/lib/postgresql/<ver>/bin`` (``./run.sh test`` installs
the package when it can). The cluster lives in a private temp directory, listens only on
127.0.0.1 (plus a Unix socket in that directory), trusts every local connection and trades
durability for speed (fsync, full_page_writes and synchronous_commit off).

PostgreSQL refuses to run as root: under root the server commands run as the system user
``postgres`` (Debian's package creates it), else ``nobody``, via ``runuser`` (or ``setpriv``),
and the temp directory is chowned to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_ROOT = "/usr/lib/postgresql"
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
#: Seconds pg_ctl waits for the server to start or stop.
PG_CTL_TIMEOUT = 30
#: Seconds any one command may take (pg_ctl's own wait plus slack).
COMMAND_TIMEOUT = 120
LOG_TAIL_LINES = 40
SUPERUSER = "postgres"
HOST = "127.0.0.1"


class PgClusterError(RuntimeError):
    """A cluster command failed; the message carries its output and the server log's tail."""


def _version_key(bin_dir: str) -> tuple[int, ...]:
    version = Path(bin_dir).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` holding initdb, pg_ctl and postgres
    (versions compared numerically, so 17 beats 9.6), or None when there is none."""
    candidates = [
        d
        for d in glob.glob(os.path.join(PG_ROOT, "*", "bin"))
        if all(os.access(os.path.join(d, tool), os.X_OK) for tool in SERVER_TOOLS)
    ]
    if not candidates:
        return None
    return Path(max(candidates, key=_version_key))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    # No PGDATA/PGPORT/PGHOST/... from the caller's environment, a locale that always exists.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


class PgCluster:
    """A throwaway PostgreSQL cluster in a fresh temp directory, on 127.0.0.1:``port``.

    Nothing runs until :meth:`start` (the first call runs initdb). :meth:`stop` and
    :meth:`start` may alternate any number of times on the same data directory and port;
    :meth:`destroy` stops the server and deletes the directory. Every failure raises
    :class:`PgClusterError` with the command's output and the tail of the server log.
    ``bin_dir`` defaults to :meth:`available`; ``FileNotFoundError`` when there is none.
    """

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or self.available()
        if found is None:
            raise FileNotFoundError(f"no PostgreSQL server binaries under {PG_ROOT}/*/bin")
        self.bin_dir: Path = found
        self.port: int = free_port()
        self.base: Path = Path(tempfile.mkdtemp(prefix="pgcluster-"))
        self.data_dir: Path = self.base / "data"
        self.socket_dir: Path = self.base / "sock"
        self.log_path: Path = self.base / "server.log"
        self.running = False
        self._initialized = False
        self.run_as: str | None = None
        try:
            if os.geteuid() == 0:
                self.run_as = self._unprivileged_user()
                self._prepare_for(self.run_as)
            else:
                self.socket_dir.mkdir(mode=0o700)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @staticmethod
    def available() -> Path | None:
        """The server bin directory a cluster would use, or None when not installed."""
        return find_bin_dir()

    # -- commands -------------------------------------------------------------------------

    @staticmethod
    def _unprivileged_user() -> str:
        for name in (SUPERUSER, "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            return name
        raise PgClusterError("running as root and neither user 'postgres' nor 'nobody' exists")

    def _prepare_for(self, user: str) -> None:
        # The user owns the whole temp tree (initdb creates data/ inside it, pg_ctl the log);
        # every ancestor must be traversable by it.
        entry = pwd.getpwnam(user)
        for parent in self.base.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise PgClusterError(
                    f"{parent} is not traversable by {user!r}; set TMPDIR to a directory that is"
                )
        self.socket_dir.mkdir(mode=0o700)
        for path in (self.base, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _wrap(self, argv: list[str]) -> list[str]:
        if self.run_as is None:
            return argv
        if shutil.which("runuser"):
            return ["runuser", "-u", self.run_as, "--", *argv]
        if shutil.which("setpriv"):
            entry = pwd.getpwnam(self.run_as)
            return [
                "setpriv",
                f"--reuid={entry.pw_uid}",
                f"--regid={entry.pw_gid}",
                "--init-groups",
                "--",
                *argv,
            ]
        raise PgClusterError("running as root but neither runuser nor setpriv is available")

    def _run(self, tool: str, *args: str, as_server_user: bool = True) -> str:
        argv = [str(self.bin_dir / tool), *args]
        if as_server_user:
            argv = self._wrap(argv)
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                cwd=self.base,
                env=_clean_env(),
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PgClusterError(self._describe(f"{shlex.join(argv)} timed out", "")) from exc
        if proc.returncode != 0:
            raise PgClusterError(
                self._describe(
                    f"{shlex.join(argv)} exited {proc.returncode}", proc.stdout + proc.stderr
                )
            )
        return proc.stdout

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ('' before the first start)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _describe(self, what: str, output: str) -> str:
        parts = [what]
        if output.strip():
            parts.append(f"--- output ---\n{output.rstrip()}")
        parts.append(f"--- {self.log_path} (tail) ---\n{self.log_tail() or '(empty)'}")
        return "\n".join(parts)

    # -- lifecycle ------------------------------------------------------------------------

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
        }
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# tests/pg_cluster.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._initialized = True

    def start(self) -> None:
        """Start the server (initdb on the first call); returns once it accepts connections.
        A no-op while running. Raises :class:`PgClusterError` (with the log's tail)."""
        if self.running:
            return
        if not self._initialized:
            self._initdb()
        options = (
            f"-p {self.port} -k {shlex.quote(str(self.socket_dir))} -c listen_addresses={HOST}"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT),
            "start",
            "-l",
            str(self.log_path),
            "-o",
            options,
        )
        self.running = True

    def stop(self) -> None:
        """Stop the server (fast shutdown) and wait for it; a no-op when not running.
        Raises :class:`PgClusterError` (with the log's tail)."""
        if not self.running:
            return
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-m",
            "fast",
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT),
            "stop",
        )
        self.running = False

    def destroy(self) -> None:
        """Stop the server if it runs and delete the temp directory (data, socket, log)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- clients --------------------------------------------------------------------------

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name`` (via createdb over TCP as the superuser ``postgres``).
        Raises :class:`PgClusterError`, e.g. when it exists or the server is down."""
        self._run(
            "createdb",
            "-h",
            HOST,
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "--",
            name,
            as_server_user=False,
        )

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq URL for psycopg/psql: ``postgresql://postgres@127.0.0.1:PORT/DBNAME``."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL: ``postgresql+psycopg://postgres@127.0.0.1:PORT/DBNAME``."""
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{dbname}"
