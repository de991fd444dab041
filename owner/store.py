"""The owner's store: SQLite (WAL) for the registry, content-addressed directories for the files.

Files are written under tmp/, fsynced, and renamed into place before the registry row is committed, so a
crash at any point leaves either no trace or a complete adapter; `recover` sweeps what a crash left behind.
"""

from __future__ import annotations

import fcntl
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

from ..common.contract import HASH_BLOCK_BYTES
from ..common.signing import canonical_json, load_or_create_private_key
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
CREATE TABLE IF NOT EXISTS revoked_certificates (
    serial TEXT PRIMARY KEY,
    revoked TEXT NOT NULL
);
"""
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STORE_UMASK = 0o077  # the daemon's files (tenants' adapters, the registry, the audit log) are the owner's alone
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
REGISTRY_FILE = "registry.sqlite"
LOCK_FILE = ".lock"


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


def _new_token() -> str:
    return "ofs_" + secrets.token_urlsafe(32)


def content_id(digests: dict[str, str]) -> str:
    """An adapter's id: the sha256 of its files' names and sha256s, so the id itself records every file's hash."""
    return hashlib.sha256(canonical_json(dict(digests))).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


class TamperedAdapter(ValueError):
    """A stored adapter whose files no longer hash to the id they were stored under."""


@dataclass(frozen=True)
class TenantRecord:
    name: str
    created: str
    adapters: int
    bytes: int


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreInUse(OSError):
    """Another process holds the store's lock: a second daemon on it would sweep the first one's uploads away."""


class StoreLock:
    """An advisory lock (flock) on `<store>/.lock`, which holds the holder's pid; the kernel drops it if it dies."""

    def __init__(self, root: Path):
        path = root / LOCK_FILE
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(descriptor)
            raise StoreInUse(
                f"the store {root} is in use by another offsite-owner serve (pid {holder}); "
                "stop it, or give this daemon another --store"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        os.ftruncate(self._descriptor, 0)  # no stale pid for the next holder's error message to name
        os.close(self._descriptor)  # closing the descriptor releases the flock
        self._descriptor = None


class Store:
    def __init__(self, root: Path, exclusive: bool = False):
        """Opens (or makes) the store; it and its registry are readable by the owner only, whatever the umask.

        Files written into it later follow the process's umask: `offsite-owner` sets STORE_UMASK. `exclusive`
        (the daemon) holds the store lock until `close`, or raises StoreInUse naming the holder's pid. Admin
        commands do not take it: SQLite's own locking orders their writes with the daemon's.
        """
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for directory in (root, *(root / sub for sub in ("tmp", "adapters", "emulators", "models"))):
            directory.mkdir(exist_ok=True)
            directory.chmod(DIRECTORY_MODE)
        self._store_lock = StoreLock(root) if exclusive else None
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

    def emulator_dir(self, base_fingerprint: str, emulator_id: str) -> Path:
        """Where the emulator `emulator_id` of a base model is kept (built once, reused while it verifies)."""
        return self.emulators_dir / base_fingerprint[:16] / emulator_id

    def signing_key(self) -> Ed25519PrivateKey:
        return load_or_create_private_key(self.root / "owner_signing_key.pem")

    # Tenants

    def add_tenant(self, name: str) -> str:
        """Registers a tenant and returns its token; only the token's hash is kept."""
        if not TENANT_NAME.match(name):
            raise ValueError(f"tenant name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        token = _new_token()
        with self._lock:
            try:
                self._db.execute("INSERT INTO tenants VALUES (?, ?, ?)", (name, _token_hash(token), _now()))
            except sqlite3.IntegrityError:
                raise ValueError(f"tenant {name!r} already exists") from None
        return token

    def rotate_token(self, name: str) -> str:
        """A new token for the tenant; the old one stops working at once (the daemon reads the registry per call)."""
        token = _new_token()
        with self._lock:
            updated = self._db.execute("UPDATE tenants SET token_sha256 = ? WHERE name = ?", (_token_hash(token), name))
        if updated.rowcount != 1:
            raise ValueError(f"no tenant {name!r}")
        return token

    def remove_tenant(self, name: str) -> int:
        """Removes the tenant and its adapters; returns how many adapters went. Its token and certificate stop
        working at the next call."""
        if not self.has_tenant(name):
            raise ValueError(f"no tenant {name!r}")
        adapters = self.list_adapters(name)
        with self._lock:
            self._db.execute("DELETE FROM tenants WHERE name = ?", (name,))
        for record in adapters:
            self.delete_adapter(name, record.id)
        return len(adapters)

    def list_tenants(self) -> list[TenantRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT t.name, t.created, COUNT(a.id), COALESCE(SUM(a.bytes), 0) FROM tenants t"
                " LEFT JOIN adapters a ON a.tenant = t.name GROUP BY t.name ORDER BY t.name"
            ).fetchall()
        return [TenantRecord(name, created, int(count), int(size)) for name, created, count, size in rows]

    # Client certificates

    def revoke_certificate(self, serial: int) -> bool:
        """Records a client certificate's serial as revoked; False if it already was."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO revoked_certificates VALUES (?, ?)", (f"{serial:x}", _now())
            )
        return cursor.rowcount == 1

    def revoked_certificates(self) -> list[tuple[int, datetime]]:
        """Every revoked serial with when it was revoked, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT serial, revoked FROM revoked_certificates ORDER BY revoked").fetchall()
        return [(int(serial, 16), datetime.fromisoformat(revoked)) for serial, revoked in rows]

    def is_revoked(self, serial: int) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM revoked_certificates WHERE serial = ?", (f"{serial:x}",)).fetchone()
        return row is not None

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

    def verified_adapter_dir(self, adapter_id: str) -> Path:
        """The adapter's directory, once its files are re-hashed and still match the id they were stored under."""
        directory = self.adapter_dir(adapter_id)
        try:
            digests = {path.name: _file_sha256(path) for path in directory.iterdir()}
        except OSError as error:
            raise TamperedAdapter(f"adapter {adapter_id}: its stored files cannot be read: {error}") from None
        if content_id(digests) != adapter_id:
            raise TamperedAdapter(
                f"adapter {adapter_id}: its stored files no longer match the sha256s recorded at push (tampered or "
                "corrupted); refusing to load it. Delete it and push it again."
            )
        return directory

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
            if self._store_lock is not None:
                self._store_lock.release()


def new_record(tenant: str, adapter_id: str, method: str, emulator: str, size: int, parameters: int) -> AdapterRecord:
    return AdapterRecord(adapter_id, tenant, method, emulator, size, parameters, _now())
