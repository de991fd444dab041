"""The audit log's hash chain and rotation (issue 16, finding 9): edits, removals and cuts are found at their line."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import grpc
import pytest

from offsite.owner.audit import AuditLog, Call
from offsite.owner.audit_chain import (
    AUDIT_FILE,
    GENESIS,
    HEAD_FILE,
    ChainedLog,
    Head,
    Rotation,
    rotated_path,
    verify_audit,
)
from offsite.owner.cli import main, parser, serve_settings
from offsite.owner.config import ConfigError


def write_lines(store: Path, count: int, rotation: Rotation | None = None, start: int = 0) -> ChainedLog:
    chain = ChainedLog(store / AUDIT_FILE, rotation)
    for number in range(start, start + count):
        chain.append({"method": f"/offsite.ModelOwner/Call{number}", "status": "OK"})
    return chain


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def owner_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    umask = os.umask(0o022)
    os.umask(umask)
    code = 0
    try:
        main([*argv, "--json"])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        os.umask(umask)  # main sets the store's umask for the rest of the process
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_clean_log_verifies_and_each_line_chains_from_the_one_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path, 5)
    lines = lines_of(tmp_path / AUDIT_FILE)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(r["prev"] == hashlib.sha256(line).hexdigest() for r, line in zip(records[1:], lines[:-1], strict=True))
    for name in (AUDIT_FILE, HEAD_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600

    verification = verify_audit(tmp_path)
    assert verification.ok and verification.lines == 5 and verification.first_seq == 1
    assert verification.last == Head(5, hashlib.sha256(lines[-1]).hexdigest())
    code, result = owner_cli(["audit", "verify", "--store", str(tmp_path)], capsys)
    assert code == 0 and result["ok"] and result["last"]["seq"] == 5 and result["broken"] is None


def test_an_empty_store_verifies_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    assert verify_audit(tmp_path).ok
    with pytest.raises(ValueError, match="not a store directory"):
        verify_audit(tmp_path / "nowhere")


@pytest.mark.parametrize("line", [1, 3, 5])
def test_an_edited_line_is_found_at_its_line_number(tmp_path: Path, line: int) -> None:
    write_lines(tmp_path, 5)
    path = tmp_path / AUDIT_FILE
    lines = lines_of(path)
    lines[line - 1] = lines[line - 1].replace(b'"OK"', b'"PERMISSION_DENIED"')  # still valid JSON, same seq
    path.write_bytes(b"".join(lines))

    broken = verify_audit(tmp_path).broken
    assert broken is not None and (broken.file, broken.line, broken.seq) == (AUDIT_FILE, line, line)
    assert broken.problem.startswith("edited")


def test_an_edit_that_breaks_the_json_or_the_seq_is_found_at_that_line(tmp_path: Path) -> None:
    write_lines(tmp_path, 4)
    path = tmp_path / AUDIT_FILE
    original = lines_of(path)
    for edited, problem in ((b"{not json\n", "not a chained audit line"), (None, "edited: seq 9 where 2 was due")):
        lines = list(original)
        lines[1] = edited or lines[1].replace(b'"seq": 2', b'"seq": 9')
        path.write_bytes(b"".join(lines))
        broken = verify_audit(tmp_path).broken
        assert broken is not None and broken.line == 2 and problem in broken.problem, broken


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (1, "removed at the start: seq 1"),
        (3, "removed before this one: seq 3"),
        (5, "truncated: seq 5 missing from the end"),
    ],
)
def test_a_removed_line_is_found_where_it_was(tmp_path: Path, line: int, problem: str) -> None:
    write_lines(tmp_path, 5)
    path = tmp_path / AUDIT_FILE
    lines = lines_of(path)
    del lines[line - 1]
    path.write_bytes(b"".join(lines))

    broken = verify_audit(tmp_path).broken
    assert broken is not None and broken.line == line and problem in broken.problem, broken


def test_truncation_mid_line_and_at_a_line_boundary_are_each_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path, 5)
    path = tmp_path / AUDIT_FILE
    original = path.read_bytes()
    lines = lines_of(path)

    path.write_bytes(b"".join(lines[:3]) + lines[3][:20])  # cut inside line 4
    broken = verify_audit(tmp_path).broken
    assert broken is not None and (broken.line, broken.problem.split(":")[0]) == (4, "cut short")

    path.write_bytes(b"".join(lines[:3]))  # whole lines 4 and 5 gone: only the head can tell
    broken = verify_audit(tmp_path).broken
    assert broken is not None and (broken.line, broken.seq) == (4, 4) and "truncated: seq 4..5" in broken.problem
    code, result = owner_cli(["audit", "verify", "--store", str(tmp_path)], capsys)
    assert code == 1 and not result["ok"] and result["broken"]["line"] == 4

    path.write_bytes(b"")
    broken = verify_audit(tmp_path).broken
    assert broken is not None and (broken.file, broken.line) == (AUDIT_FILE, 1) and "seq 1..5" in broken.problem

    path.write_bytes(original)
    (tmp_path / HEAD_FILE).unlink()
    broken = verify_audit(tmp_path).broken
    assert broken is not None and broken.file == HEAD_FILE and "missing" in broken.problem


def test_rotation_keeps_the_chain_across_files_and_drops_the_oldest(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    one_line = len(lines_of(write_lines(tmp_path / "probe", 1).path)[0])
    rotation = Rotation(max_bytes=3 * one_line + 10, keep=10)  # three lines a file
    write_lines(tmp_path, 14, rotation)
    live = tmp_path / AUDIT_FILE
    assert [len(lines_of(rotated_path(live, i))) for i in (4, 3, 2, 1)] == [3, 3, 3, 3]
    assert len(lines_of(live)) == 2
    first_live = json.loads(lines_of(live)[0])
    assert (
        first_live["seq"] == 13
        and first_live["prev"] == hashlib.sha256(lines_of(rotated_path(live, 1))[-1]).hexdigest()
    )
    for index in (1, 2, 3, 4):
        assert stat.S_IMODE(rotated_path(live, index).stat().st_mode) == 0o600
    verification = verify_audit(tmp_path)
    assert verification.ok and verification.lines == 14 and verification.files[0] == f"{AUDIT_FILE}.4"

    middle = rotated_path(live, 2)
    lines = lines_of(middle)
    middle.write_bytes(lines[0].replace(b'"OK"', b'"CANCELLED"') + b"".join(lines[1:]))
    broken = verify_audit(tmp_path).broken
    assert broken is not None and (broken.file, broken.line, broken.seq) == (middle.name, 1, 7)
    middle.write_bytes(b"".join(lines))

    rotated_path(live, 3).unlink()  # a whole rotated file removed from the middle
    broken = verify_audit(tmp_path).broken
    assert broken is not None and broken.file == middle.name and "seq 4..6" in broken.problem

    kept = tmp_path / "kept"
    kept.mkdir()
    write_lines(kept, 14, Rotation(max_bytes=rotation.max_bytes, keep=2))
    assert not rotated_path(kept / AUDIT_FILE, 3).exists()
    verification = verify_audit(kept)
    assert verification.ok and verification.first_seq == 7 and verification.lines == 8
    assert "seq 1..6 were rotated away" in verification.summary()
    rotated_path(kept / AUDIT_FILE, 2).unlink()  # the oldest file removed by hand, not by rotation
    broken = verify_audit(kept).broken
    assert broken is not None and (broken.file, broken.line) == (f"{AUDIT_FILE}.1", 1)
    assert "removed at the start: seq 7..9" in broken.problem


def test_a_restarted_writer_continues_the_chain_and_drops_a_line_a_crash_cut_short(tmp_path: Path) -> None:
    write_lines(tmp_path, 3)
    path = tmp_path / AUDIT_FILE
    with path.open("ab") as handle:
        handle.write(b'{"seq": 4, "prev": "')  # the daemon died inside a write: the head still names line 3
    write_lines(tmp_path, 2, start=3)
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [1, 2, 3, 4, 5]
    assert verify_audit(tmp_path).ok


def test_lines_cut_while_no_daemon_ran_still_show_after_a_restart(tmp_path: Path) -> None:
    write_lines(tmp_path, 5)
    path = tmp_path / AUDIT_FILE
    path.write_bytes(b"".join(lines_of(path)[:3]))
    write_lines(tmp_path, 1, start=5)  # the next daemon chains on from the head, not from line 3
    broken = verify_audit(tmp_path).broken
    assert broken is not None and broken.line == 4 and "removed before this one: seq 4..5" in broken.problem


def test_a_chain_rewritten_from_scratch_passes_alone_but_not_against_a_line_kept_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path, 5)
    kept = verify_audit(tmp_path).last
    assert kept is not None and Head.parse(str(kept)) == kept
    for name in (AUDIT_FILE, HEAD_FILE):
        (tmp_path / name).unlink()
    chain = ChainedLog(tmp_path / AUDIT_FILE)
    for number in range(6):
        chain.append({"method": f"/offsite.ModelOwner/Forged{number}", "status": "OK"})
    assert verify_audit(tmp_path).ok
    broken = verify_audit(tmp_path, kept).broken
    assert broken is not None and broken.line == 5 and "the expected line" in broken.problem
    code, result = owner_cli(["audit", "verify", "--store", str(tmp_path), "--expect", str(kept)], capsys)
    assert code == 1 and result["broken"]["line"] == 5
    with pytest.raises(ValueError, match="SEQ:SHA256"):
        Head.parse("5:xyz")


def test_the_audit_log_writes_chained_lines_and_rotation_is_configurable(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / AUDIT_FILE, Rotation(max_bytes=0, keep=1))
    for method in ("GetModelCard", "ListAdapters"):
        log.write(Call(f"/offsite.ModelOwner/{method}", "ipv4:127.0.0.1:1"), grpc.StatusCode.OK)
    records = [json.loads(line) for line in lines_of(tmp_path / AUDIT_FILE)]
    assert [(r["seq"], r["method"].rsplit("/", 1)[1], r["status"]) for r in records] == [
        (1, "GetModelCard", "OK"),
        (2, "ListAdapters", "OK"),
    ]
    assert verify_audit(tmp_path).ok

    args = serve_settings(parser().parse_args(["serve", "--store", "/s", "--audit-max-mib", "1", "--audit-keep", "3"]))
    assert (args.values["audit_max_mib"], args.values["audit_keep"]) == (1, 3)
    with pytest.raises(ConfigError, match="--audit-keep: -1 is negative"):
        serve_settings(parser().parse_args(["serve", "--store", "/s", "--audit-keep", "-1"]))
