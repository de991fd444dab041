"""Owner key pinning: `--owner-key`, or else trust on first use, recorded per server in the client's config.

The first pull from a server records the key it presented; every later pull from that server refuses any other key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HOME_ENVIRONMENT = "OFFSITE_HOME"
KNOWN_OWNERS_FILE = "known_owners.json"


def config_dir() -> Path:
    return Path(os.environ.get(HOME_ENVIRONMENT) or Path.home() / ".config" / "offsite")


class KnownOwners:
    def __init__(self, path: Path | None = None):
        self.path = path or config_dir() / KNOWN_OWNERS_FILE

    def _read(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        try:
            known = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the pinned owner keys in {self.path}: {error}") from None
        if not isinstance(known, dict) or not all(isinstance(v, str) for v in known.values()):
            raise ValueError(f"{self.path} is not a JSON object of server -> owner key")
        return known

    def expected(self, server: str) -> str | None:
        return self._read().get(server)

    def remember(self, server: str, key: str) -> None:
        known = self._read()
        known[server] = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        partial.replace(self.path)
