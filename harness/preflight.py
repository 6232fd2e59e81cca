"""Checks of the command line's destinations before a sweep starts: where the report goes, the
tracking store, the Ray cluster. Each is one cheap call with a short timeout and raises
`PreflightError` with one line naming the value and what is allowed; nothing is created in MLflow
before they pass."""
from __future__ import annotations

import socket
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from harness.files import writable_dir_problem

TIMEOUT_S = 3
SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class PreflightError(ValueError):
    """A destination the sweep could not write to."""


def check_output_dir(path: Path, what: str = "report folder", option: str = "--report-dir DIR") -> None:
    problem = writable_dir_problem(Path(path))
    if problem:
        raise PreflightError(f"{what} {str(path)!r} cannot be written ({problem}); allowed: a folder you can "
                             f"write to ({option})")


def check_tracking_uri(uri: str) -> None:
    """The tracking store can be written (sqlite, local folder) or answers (http[s]); other
    database schemes MLflow supports are passed on as they are."""
    parsed = urlparse(uri)
    scheme = (parsed.scheme or "file").split("+")[0]  # postgresql+psycopg2: SQLAlchemy's driver suffix
    allowed = f"allowed: sqlite:///PATH, a folder, http(s)://HOST:PORT of an MLflow server ({', '.join(SCHEMES)})"
    if scheme not in SCHEMES:
        raise PreflightError(f"tracking URI {uri!r}: unknown scheme {scheme!r}; {allowed}")
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is None or not str(db):
            raise PreflightError(f"tracking URI {uri!r} names no database file; {allowed}")
        _check_sqlite(uri, db)
    elif scheme == "file":
        folder = Path(parsed.path if parsed.scheme else uri)
        problem = writable_dir_problem(folder)
        if problem:
            raise PreflightError(f"tracking URI {uri!r}: folder cannot be written ({problem}); {allowed}")
    elif scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # something answers (authentication, a proxy, TLS settings are MLflow's to handle)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise PreflightError(f"tracking URI {uri!r}: no MLflow server answers within {TIMEOUT_S} s ({reason}); "
                                 f"start one (make ui) or {allowed}") from None


def _check_sqlite(uri: str, db: Path) -> None:
    if db.is_dir():
        raise PreflightError(f"tracking URI {uri!r}: {str(db)!r} is a folder; allowed: sqlite:///FILE.db")
    problem = writable_dir_problem(db.parent) if not db.exists() else None
    if problem:
        raise PreflightError(f"tracking URI {uri!r}: cannot create the database in {str(db.parent)!r} ({problem}); "
                             f"allowed: a sqlite file in a folder you can write to")
    if db.exists():
        try:  # take the write lock once, then let go: a read-only or locked file fails here
            con = sqlite3.connect(f"file:{urllib.request.pathname2url(str(db))}?mode=rw", uri=True, timeout=TIMEOUT_S)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.rollback()
            finally:
                con.close()
        except sqlite3.Error as e:
            raise PreflightError(f"tracking URI {uri!r}: the database cannot be written ({e}); allowed: a writable "
                                 f"sqlite file") from None


def check_ray_address(address: str | None) -> None:
    """A given Ray address (host:port or ray://host:port; 'auto', 'local' and none are left to Ray) answers
    a TCP connection within a few seconds."""
    if not address or address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise PreflightError(f"Ray address {address!r} is not HOST:PORT; allowed: auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=TIMEOUT_S).close()
    except OSError as e:
        raise PreflightError(f"Ray address {address!r}: nothing answers within {TIMEOUT_S} s ({e.strerror or e}); "
                             f"allowed: the address of a running Ray head (ray start --head), or auto") from None
