"""Process memory figures reported next to results."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
