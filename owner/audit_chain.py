"""The audit log's files: a hash chain across size-rotated files, a head record, and their verification.

Each line is a JSON object that starts with `seq`, its number counted from 1 across rotations, and `prev`, the
sha256 (hex) of the previous line's bytes, newline included; the first line ever chains from GENESIS. When the live
file would pass `Rotation.max_bytes` it is renamed audit.jsonl.1 (the older ones shift to .2, .3, ... and the one past
`keep` is deleted), and the new file's first line chains from the last line of the old one.

`audit.head` holds the seq and sha256 of the last line written, rewritten in place after each line is fsynced, and
the seq of the oldest line kept, which only rotation moves on: lines cut from the end or the start show too.

The chain shows damage and edits by anyone who does not also recompute every later line and the head. Whoever can
write the store can still do that; an off-host copy of a line's seq and sha256 (`audit verify` prints the last one,
`audit verify --expect` checks it) shows such a rewrite.

One writer per store: the daemon, which holds the store lock (owner/store.py) for its lifetime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..common.contract import MiB
from .store import fsync_directory

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
AUDIT_MODE = 0o600
GENESIS = "0" * 64  # the `prev` of the first line ever written
DEFAULT_MAX_MIB = 64  # about 190,000 calls a file
DEFAULT_KEEP = 8
HEAD_RECORD_BYTES = 128  # a fixed size, so each update is one pwrite over the old record
TAIL_BLOCK_BYTES = 4096
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("offsite.owner.audit")


def line_sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def rotated_path(live: Path, index: int) -> Path:
    return live.with_name(f"{live.name}.{index}")


@dataclass(frozen=True)
class Rotation:
    max_bytes: int = DEFAULT_MAX_MIB * MiB  # 0: never rotate
    keep: int = DEFAULT_KEEP  # rotated files kept, audit.jsonl.1 (the newest) to audit.jsonl.<keep>

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.keep < 0:
            raise ValueError(f"audit rotation needs max_bytes ≥ 0 and keep ≥ 0, not {self.max_bytes} and {self.keep}")


@dataclass(frozen=True)
class Head:
    """A line of the chain by its seq and sha256: the last one written, or one an operator kept."""

    seq: int
    sha256: str

    @classmethod
    def parse(cls, text: str) -> Head:
        """SEQ:SHA256, the form `audit verify` prints."""
        seq, _, sha256 = text.partition(":")
        if not seq.isdigit() or int(seq) < 1 or not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"{text!r} is not SEQ:SHA256 (as audit verify prints the last line)")
        return cls(int(seq), sha256)

    def __str__(self) -> str:
        return f"{self.seq}:{self.sha256}"


def _open_private(path: Path, flags: int) -> int:
    descriptor = os.open(path, flags | os.O_CREAT, AUDIT_MODE)
    os.fchmod(descriptor, AUDIT_MODE)  # a file made before, or by hand, gets the owner-only mode too
    return descriptor


@dataclass(frozen=True)
class HeadRecord:
    last: Head
    first_seq: int  # the oldest line kept: rotation moves it on when it drops a file, nothing else may


def read_head(path: Path) -> HeadRecord | None:
    """The head record, None when there is none; ValueError when it is not one."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path.name} is not a head record: {error}") from None
    fields = [record.get(key) for key in ("seq", "sha256", "first_seq")] if isinstance(record, dict) else []
    if len(fields) != 3 or not all(isinstance(n, int) for n in fields[::2]) or not isinstance(fields[1], str):
        raise ValueError(f"{path.name} is not a head record (seq, sha256, first_seq)")
    if not SHA256_HEX.fullmatch(fields[1]):
        raise ValueError(f"{path.name} is not a head record: its sha256 is not 64 hex digits")
    return HeadRecord(Head(fields[0], fields[1]), fields[2])


def _write_head(path: Path, head: HeadRecord) -> None:
    fields = {"seq": head.last.seq, "sha256": head.last.sha256, "first_seq": head.first_seq}
    record = json.dumps(fields).encode().ljust(HEAD_RECORD_BYTES - 1) + b"\n"
    descriptor = _open_private(path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, record, 0)  # not fsynced: it only ever names lines already on disk
    finally:
        os.close(descriptor)


def _seq_of(line: bytes) -> int:
    """A line's seq, 0 for a damaged line (verify reports it)."""
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return 0
    return seq if isinstance(seq, int) else 0


def _first_seq(path: Path) -> int:
    with path.open("rb") as handle:
        return _seq_of(handle.readline())


def _last_line(path: Path) -> bytes | None:
    """The file's last line, newline included; a line cut short by a crash (no newline) is cut off first."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        start = os.fstat(descriptor).st_size
        tail = b""
        while start > 0:
            complete = tail.rfind(b"\n") + 1
            if complete and tail.rfind(b"\n", 0, complete - 1) >= 0:
                break  # the whole of the last complete line is in `tail`
            step = min(TAIL_BLOCK_BYTES, start)
            start -= step
            tail = os.pread(descriptor, step, start) + tail
        complete = tail.rfind(b"\n") + 1
        if complete < len(tail):
            # a crash cut it (a cut by hand shows too: the head names the line that was there)
            os.ftruncate(descriptor, start + complete)
            log.warning("audit log %s: removed %d bytes of a line cut short", path, len(tail) - complete)
            tail = tail[:complete]
        if not tail:
            return None
        return tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1 :]
    finally:
        os.close(descriptor)


class ChainedLog:
    """Appends hash-chained, fsynced lines to `path`, rotating by size; thread-safe, one process per store."""

    def __init__(self, path: Path, rotation: Rotation | None = None):
        self.path = path
        self.head_path = path.with_name(HEAD_FILE)
        self.rotation = rotation or Rotation()
        self._lock = threading.Lock()
        self._head: HeadRecord | None = None  # read from the files at the first append, then kept here

    def append(self, fields: dict[str, Any]) -> None:
        with self._lock:
            head = self._head or self._resume()
            seq = head.last.seq + 1
            line = (json.dumps({"seq": seq, "prev": head.last.sha256, **fields}) + "\n").encode()
            first_seq = self._rotate(seq, head.first_seq) if self._rotation_due(len(line)) else head.first_seq
            descriptor = _open_private(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(descriptor, view) :]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            self._head = HeadRecord(Head(seq, line_sha256(line)), first_seq)
            _write_head(self.head_path, self._head)

    def _resume(self) -> HeadRecord:
        """Where the chain stands: the last line on disk, unless the head names a later line or another hash for it.

        Then lines were cut or edited while no daemon ran; chaining on from the head keeps that for verify to see.
        """
        lines = (_last_line(path) for path in (self.path, rotated_path(self.path, 1)))
        last = next((line for line in lines if line is not None), None)
        on_disk = Head(_seq_of(last), line_sha256(last)) if last is not None else Head(0, GENESIS)
        try:
            head = read_head(self.head_path)
        except ValueError:
            head = None  # a damaged head: verify reports it
        if head is None:
            files = audit_files(self.path)
            return HeadRecord(on_disk, max(1, _first_seq(files[0])) if files and last is not None else 1)
        if head.last.seq > on_disk.seq or (head.last.seq == on_disk.seq and head.last != on_disk):
            log.warning(
                "audit log %s does not end with the line %s records (seq %d): lines were removed or edited; "
                "audit verify says where",
                self.path,
                HEAD_FILE,
                head.last.seq,
            )
            return head
        return HeadRecord(on_disk, head.first_seq)

    def _rotation_due(self, incoming: int) -> bool:
        if not self.rotation.max_bytes:
            return False
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        return size > 0 and size + incoming > self.rotation.max_bytes

    def _rotate(self, next_seq: int, first_seq: int) -> int:
        """Shifts the files by one, dropping the one past `keep`; returns the seq of the oldest line kept now."""
        keep = self.rotation.keep
        if keep == 0:
            self.path.unlink()
            first_seq = next_seq
        else:
            oldest = rotated_path(self.path, keep)
            dropped = oldest.exists()
            oldest.unlink(missing_ok=True)
            for index in range(keep - 1, 0, -1):
                older = rotated_path(self.path, index)
                if older.exists():
                    older.rename(rotated_path(self.path, index + 1))
            self.path.rename(rotated_path(self.path, 1))
            if dropped:
                first_seq = _first_seq(oldest)
        fsync_directory(self.path.parent)
        return first_seq


# Verification


@dataclass(frozen=True)
class Break:
    """The first place the chain does not hold: a file, its line (1-based; 0 for the file itself), what is wrong."""

    file: str
    line: int
    problem: str
    seq: int | None = None


@dataclass(frozen=True)
class Verification:
    files: list[str]  # oldest first
    lines: int
    first_seq: int | None  # above 1 when older lines were rotated away
    last: Head | None  # the last line checked; when ok, an anchor to keep off the host (`--expect`)
    broken: Break | None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def summary(self) -> str:
        if self.broken is not None:
            seq = f" (seq {self.broken.seq})" if self.broken.seq is not None else ""
            where = f"{self.broken.file} line {self.broken.line}" if self.broken.line else self.broken.file
            return f"audit log broken at {where}{seq}: {self.broken.problem}"
        if self.last is None:
            return "audit log: no lines yet"
        rotated = f"; seq 1..{self.first_seq - 1} were rotated away" if self.first_seq and self.first_seq > 1 else ""
        return (
            f"audit log ok: {self.lines} line(s) in {len(self.files)} file(s){rotated}; last line {self.last}. "
            "Keep that elsewhere: audit verify --expect it shows whether the log was rewritten since"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "lines": self.lines,
            "first_seq": self.first_seq,
            "last": asdict(self.last) if self.last and self.ok else None,  # an anchor only when all before it held
            "broken": asdict(self.broken) if self.broken else None,
        }


def audit_files(live: Path) -> list[Path]:
    """The rotated files, oldest first, then the live one; only those that exist."""
    indices = sorted(
        (int(p.name.rsplit(".", 1)[1]) for p in live.parent.glob(f"{live.name}.*") if p.suffix[1:].isdigit()),
        reverse=True,
    )
    return [*(rotated_path(live, index) for index in indices), *([live] if live.exists() else [])]


def _lines(path: Path) -> list[bytes]:
    """The file's lines, each with its newline; a last line without one is kept, to be reported."""
    pieces = path.read_bytes().split(b"\n")
    return [piece + b"\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def _chain_fields(line: bytes) -> tuple[int, str] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    seq, prev = record.get("seq"), record.get("prev")
    if not isinstance(seq, int) or seq < 1 or not isinstance(prev, str) or not SHA256_HEX.fullmatch(prev):
        return None
    return seq, prev


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def verify_audit(store: Path, expected: Head | None = None) -> Verification:
    """Walks `<store>/audit.jsonl*` oldest first and stops at the first line that breaks the chain.

    The head's last line, and `expected` (a line's seq and sha256 kept off the host from an earlier verify), are
    checkpoints: the line they name must still be there with that sha256, which catches lines cut from the end and,
    for `expected`, a chain rewritten from that line on. The head's first_seq catches lines cut from the start.
    """
    if not store.is_dir():
        raise ValueError(f"{store} is not a store directory")
    files = audit_files(store / AUDIT_FILE)
    names = [path.name for path in files]
    count, first_seq, previous, where = 0, None, None, ("", 0)

    def result(broken: Break | None) -> Verification:
        return Verification(names, count, first_seq, previous, broken)

    try:
        head = read_head(store / HEAD_FILE)
    except ValueError as error:
        return result(Break(HEAD_FILE, 0, str(error)))
    marks = ((HEAD_FILE, head.last if head else None), ("the expected line", expected))
    checkpoints = [(name, point) for name, point in marks if point is not None]
    for path in files:
        for number, line in enumerate(_lines(path), start=1):
            count += 1
            if not line.endswith(b"\n"):
                return result(Break(path.name, number, "cut short: the line has no end (truncated?)"))
            fields = _chain_fields(line)
            if fields is None:
                return result(Break(path.name, number, "not a chained audit line (JSON with seq and prev)"))
            seq, prev = fields
            if previous is None:
                first_seq = seq
                if head is not None and seq > head.first_seq:
                    problem = f"line(s) removed at the start: seq {_span(head.first_seq, seq - 1)} ({HEAD_FILE})"
                    return result(Break(path.name, number, problem, seq))
                if seq == 1 and prev != GENESIS:
                    return result(Break(path.name, number, "the first line does not chain from the genesis value", 1))
            elif seq != previous.seq + 1 and prev == previous.sha256:
                problem = f"edited: seq {seq} where {previous.seq + 1} was due, though it chains from the line before"
                return result(Break(path.name, number, problem, seq))
            elif seq > previous.seq + 1:
                missing = _span(previous.seq + 1, seq - 1)
                return result(Break(path.name, number, f"line(s) removed before this one: seq {missing}", seq))
            elif seq != previous.seq + 1:
                return result(Break(path.name, number, f"seq {seq} where {previous.seq + 1} was due", seq))
            elif prev != previous.sha256:
                problem = "edited: its sha256 is not the prev the next line records (or that prev was edited)"
                return result(Break(where[0], where[1], problem, previous.seq))
            previous, where = Head(seq, line_sha256(line)), (path.name, number)
            for name, point in checkpoints:
                if point.seq == seq and point.sha256 != previous.sha256:
                    return result(Break(path.name, number, f"edited: its sha256 is not the one {name} records", seq))
    if head is None and count:
        return result(Break(HEAD_FILE, 0, f"{HEAD_FILE} is missing: lines cut from either end could not be seen"))
    last_seq = previous.seq if previous else 0
    end_file = names[-1] if names else AUDIT_FILE
    end_line = where[1] + 1 if where[0] == end_file else 1
    for name, point in checkpoints:
        if point.seq > last_seq:
            problem = f"truncated: seq {_span(last_seq + 1, point.seq)} missing from the end ({name}: {point.seq})"
            return result(Break(end_file, end_line, problem, last_seq + 1))
        if first_seq is not None and point.seq < first_seq:
            problem = f"{name} records seq {point.seq}, which is no longer here (rotated away?): it cannot be checked"
            return result(Break(names[0], 1, problem, point.seq))
    return result(None)
