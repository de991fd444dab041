"""The store lock (issue 16, finding 9): one daemon per store; a second fails fast naming the holder's pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offsite.owner.cli import main
from offsite.owner.store import LOCK_FILE, Store, StoreInUse

HOLD_THE_LOCK = (
    "import sys; from pathlib import Path; from offsite.owner.store import Store; "
    "store = Store(Path(sys.argv[1]), exclusive=True); print('held', flush=True); sys.stdin.read()"
)


def test_a_second_exclusive_open_fails_naming_the_holder_and_close_releases_it(tmp_path: Path) -> None:
    first = Store(tmp_path, exclusive=True)
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(StoreInUse, match=rf"in use by another offsite-owner serve \(pid {os.getpid()}\)"):
        Store(tmp_path, exclusive=True)
    first.close()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # no stale pid left behind
    Store(tmp_path, exclusive=True).close()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreInUse, match=rf"\(pid {holder.pid}\)"):
            Store(tmp_path, exclusive=True)
    finally:
        holder.kill()  # no close: the kernel drops a dead process's flock
        holder.wait(timeout=30)
    Store(tmp_path, exclusive=True).close()


def test_serve_on_a_store_in_use_fails_before_loading_the_model(tmp_path: Path) -> None:
    held = Store(tmp_path / "store", exclusive=True)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "offsite.owner", "serve", "--store", str(tmp_path / "store")]
            + ["--model", str(tmp_path / "no-such-model"), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        held.close()
    assert completed.returncode == 2
    assert f"is in use by another offsite-owner serve (pid {os.getpid()})" in completed.stderr
    assert "loading" not in completed.stderr and "no-such-model" not in completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1])["ok"] is False


def test_admin_commands_still_work_while_a_daemon_holds_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = Store(tmp_path, exclusive=True)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        main(["tenants", "add", "bob", "--store", str(tmp_path), "--json", "--show-token"])
    finally:
        os.umask(umask)  # main sets the store's umask for the rest of the process
    token = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token"]
    assert daemon.authenticate(token) == "bob"  # SQLite orders the two writers; the daemon sees bob at once
    daemon.close()
