"""Where a command writes its output directory, without ever deleting what the command did not write.

Every command that writes a bundle (`pull`, `train`, `memory build`, `build-emulator`) goes through here:

- `--out` must be absent, empty, or an offsite bundle of the command's kind holding nothing but its own files.
  Anything else is refused, naming the path, before any work starts, and nothing is deleted.
- The new bundle is written under the sibling `<out>.partial/`, which carries a marker file that says offsite made
  it, and renamed into place only when complete. Only a marked staging directory is ever removed.
- An existing bundle of the same kind is replaced whole, at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter_format import METHODS
from .contract import ADAPTER_FORMAT, EMULATOR_FORMAT, HEAD_FORMAT, MANIFEST_NAME
from .pema.memory import KEYS_FILE, MEMORY_FILE, VALUES_FILE

STAGING_SUFFIX = ".partial"
STAGING_MARKER = ".offsite-staging"  # in a staging directory: offsite made it, so offsite may remove it
REPLACED = ".replaced"  # the bundle being replaced, moved into staging and removed with it


class OutputRefused(ValueError):
    """An output directory (or its staging sibling) holds something this command did not write."""


@dataclass(frozen=True)
class BundleKind:
    name: str  # for messages: "emulator bundle"
    owned: Callable[[Path], set[str] | None]  # the names a bundle of this kind accounts for; None: not this kind


def _manifest(directory: Path) -> dict[str, Any] | None:
    """The unverified manifest, only to recognise a bundle; verification is the reader's business."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def _signed_bundle(accept: Callable[[dict[str, Any]], bool]) -> Callable[[Path], set[str] | None]:
    def owned(directory: Path) -> set[str] | None:
        manifest = _manifest(directory)
        if manifest is None or not accept(manifest):
            return None
        return {MANIFEST_NAME, *manifest["files"]}

    return owned


def _memory(directory: Path) -> set[str] | None:
    return {KEYS_FILE, VALUES_FILE, MEMORY_FILE} if (directory / MEMORY_FILE).is_file() else None


EMULATOR = BundleKind("emulator bundle", _signed_bundle(lambda m: m.get("format") == EMULATOR_FORMAT))
HEAD = BundleKind("head bundle", _signed_bundle(lambda m: m.get("format") == HEAD_FORMAT))
ADAPTER = BundleKind(
    "adapter bundle",
    _signed_bundle(lambda m: m.get("method") in METHODS and m.get("format", ADAPTER_FORMAT) == ADAPTER_FORMAT),
)
MEMORY = BundleKind("PEMA memory", _memory)


def _absolute(out: Path) -> Path:
    return Path(os.path.abspath(out))  # `.` and `a/..` have no usable name of their own


def staging_dir(out: Path) -> Path:
    out = _absolute(out)
    return out.with_name(out.name + STAGING_SUFFIX)


def check(out: Path, kind: BundleKind) -> None:
    """Refuses an `out` that holds anything but a bundle of `kind`; call it before the work starts."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputRefused(f"{out} exists and is not a directory; choose another --out")
    present = {entry.name for entry in out.iterdir()}
    if not present:
        return
    owned = kind.owned(out)
    if owned is None:
        raise OutputRefused(
            f"{out} is not empty and is not an offsite {kind.name}; refusing to write there so that nothing in it "
            "is overwritten or deleted. Choose a new or empty directory for --out."
        )
    foreign = sorted(present - owned)
    if foreign:
        raise OutputRefused(
            f"{out} is an offsite {kind.name} but also holds {', '.join(foreign[:5])}"
            f"{' …' if len(foreign) > 5 else ''}, which replacing it would delete; move them away or choose "
            "another --out."
        )


def begin(out: Path, kind: BundleKind, resume: bool = False) -> Path:
    """Checks `out`, prepares `<out>.partial/` and returns the path (not yet created) to write the bundle to.

    With `resume`, what an interrupted run of this command left in staging is kept, so that it can carry on.
    """
    check(out, kind)
    staging = staging_dir(out)
    if staging.exists() or staging.is_symlink():
        if staging.is_symlink() or not (staging / STAGING_MARKER).is_file():
            raise OutputRefused(
                f"{staging} exists and offsite did not make it; move it away (nothing was deleted) and try again"
            )
        if not resume:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / STAGING_MARKER).touch()
    return staged_path(out)


def staged_path(out: Path) -> Path:
    """Where `begin` has the bundle written: what the other processes of a launch read the leader's work from."""
    return staging_dir(out) / _absolute(out).name


def commit(work: Path, out: Path, kind: BundleKind) -> None:
    """Moves the finished bundle at `work` (from `begin`) to `out`, replacing a bundle of the same kind there."""
    check(out, kind)  # again: something may have appeared there while the command ran
    staging = work.parent
    if out.exists():
        out.rename(staging / REPLACED)
    work.rename(out)
    shutil.rmtree(staging)


def abandon(out: Path) -> None:
    """Removes `out`'s staging directory, if offsite made it; never anything else."""
    staging = staging_dir(out)
    if not staging.is_symlink() and (staging / STAGING_MARKER).is_file():
        shutil.rmtree(staging)


@contextmanager
def staged(out: Path, kind: BundleKind, resume: bool = False) -> Iterator[Path]:
    """`begin`, then `commit` when the block succeeds; a failure removes the staging unless `resume` keeps it."""
    work = begin(out, kind, resume)
    try:
        yield work
    except BaseException:
        if not resume:
            abandon(out)
        raise
    commit(work, out, kind)
