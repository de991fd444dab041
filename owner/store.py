"""The owner's store: SQLite (WAL) for the registry, content-addressed directories for the files.

Files are written under tmp/, fsynced, and renamed into place before the registry row is committed, so a
crash at any point leaves either no trace or a complete adapter; `recover` sweeps what a crash left behind.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..common.signing import load_or_create_private_key
from .limits import TenantLimits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    method TEXT NOT NULL,
    emulator TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    parameters INTEGER NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (tenant, id)
);
"""
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STORE_UMASK = 0o077  # the daemon's files (tenants' adapters, the registry, the audit log) are the owner's alone
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
REGISTRY_FILE = "registry.sqlite"


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    tenant: str
    method: str
    emulator: str
    bytes: int
    parameters: int
    created: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: Path):
        """Opens (or makes) the store; it and its registry are readable by the owner only, whatever the umask.

        Files written into it later follow the process's umask: `offsite-owner` sets STORE_UMASK.
        """
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for directory in (root, *(root / sub for sub in ("tmp", "adapters", "emulators", "models"))):
            directory.mkdir(exist_ok=True)
            directory.chmod(DIRECTORY_MODE)
        registry = root / REGISTRY_FILE
        registry.touch(mode=FILE_MODE)
        registry.chmod(FILE_MODE)  # SQLite gives its -wal and -shm files the database's mode
        self._lock = threading.Lock()
        self._db = sqlite3.connect(registry, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def emulators_dir(self) -> Path:
        return self.root / "emulators"

    def signing_key(self) -> Ed25519PrivateKey:
        return load_or_create_private_key(self.root / "owner_signing_key.pem")

    # Tenants

    def add_tenant(self, name: str) -> str:
        """Registers a tenant and returns its token; only the token's hash is kept."""
        if not TENANT_NAME.match(name):
            raise ValueError(f"tenant name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        token = "ofs_" + secrets.token_urlsafe(32)
        with self._lock:
            try:
                self._db.execute("INSERT INTO tenants VALUES (?, ?, ?)", (name, _token_hash(token), _now()))
            except sqlite3.IntegrityError:
                raise ValueError(f"tenant {name!r} already exists") from None
        return token

    def authenticate(self, token: str) -> str | None:
        presented = _token_hash(token)
        with self._lock:
            rows = self._db.execute("SELECT name, token_sha256 FROM tenants").fetchall()
        found = None
        for name, stored in rows:  # compare with every tenant so timing says nothing about which matched
            if hmac.compare_digest(presented, stored):
                found = name
        return found

    def has_tenant(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone() is not None

    def tenant_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM tenants").fetchone()[0])

    # Adapters

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private scratch directory that is removed whatever happens."""
        path = self.root / "tmp" / uuid.uuid4().hex
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def adapter_dir(self, adapter_id: str) -> Path:
        return self.root / "adapters" / adapter_id

    def usage(self, tenant: str) -> tuple[int, int]:
        """How many adapters the tenant holds, and their bytes."""
        with self._lock:
            return self._usage(tenant)

    def _usage(self, tenant: str) -> tuple[int, int]:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM adapters WHERE tenant = ?", (tenant,))
        count, total = row.fetchone()
        return int(count), int(total)

    def commit_adapter(
        self, tenant: str, staged: Path, record: AdapterRecord, limits: TenantLimits | None = None
    ) -> bool:
        """Moves a validated staging directory into place and registers it; False if the tenant had it already.

        The quota is checked again here, under the lock, so concurrent pushes cannot pass it together.
        """
        for path in staged.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(staged)
        final = self.adapter_dir(record.id)
        with self._lock:
            held = self._db.execute("SELECT 1 FROM adapters WHERE tenant = ? AND id = ?", (tenant, record.id))
            if limits is not None and held.fetchone() is None:
                limits.check_quota(tenant, *self._usage(tenant), record.bytes)
            if not final.exists():
                staged.rename(final)
                fsync_directory(final.parent)
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tenant, record.id, record.method, record.emulator, record.bytes, record.parameters, record.created),
            )
            return cursor.rowcount == 1

    def get_adapter(self, tenant: str, adapter_id: str) -> AdapterRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, tenant, method, emulator, bytes, parameters, created FROM adapters"
                " WHERE tenant = ? AND id = ?",
                (tenant, adapter_id),
            ).fetchone()
        return AdapterRecord(*row) if row else None

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, tenant, method, emulator, bytes, parameters, created FROM adapters"
                " WHERE tenant = ? ORDER BY created, id",
                (tenant,),
            ).fetchall()
        return [AdapterRecord(*row) for row in rows]

    def delete_adapter(self, tenant: str, adapter_id: str) -> bool:
        with self._lock:
            deleted = (
                self._db.execute("DELETE FROM adapters WHERE tenant = ? AND id = ?", (tenant, adapter_id)).rowcount == 1
            )
            still_used = self._db.execute("SELECT 1 FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
            if deleted and not still_used:
                shutil.rmtree(self.adapter_dir(adapter_id), ignore_errors=True)
        return deleted

    def recover(self) -> list[str]:
        """Removes what an interrupted write left: staging dirs, unregistered adapter dirs, rows without files."""
        removed = []
        with self._lock:
            for path in (self.root / "tmp").iterdir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
            known = {row[0] for row in self._db.execute("SELECT DISTINCT id FROM adapters")}
            for path in (self.root / "adapters").iterdir():
                if path.name not in known:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(str(path))
            for adapter_id in known:
                if not self.adapter_dir(adapter_id).is_dir():
                    self._db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))
                    removed.append(f"registry row {adapter_id}")
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()


def new_record(tenant: str, adapter_id: str, method: str, emulator: str, size: int, parameters: int) -> AdapterRecord:
    return AdapterRecord(adapter_id, tenant, method, emulator, size, parameters, _now())
