"""Whether to draw progress bars: as asked, and never on CI.

CI systems set ``CI`` (GitHub Actions, GitLab, this project's ``.ci/run``); their logs
are no terminal, and a bar redrawn a thousand times is a thousand lines there.
"""

from __future__ import annotations

import os

__all__ = ["show_progress"]


def show_progress(requested: bool) -> bool:
    """``requested``, unless the environment variable ``CI`` is set to a true value."""
    return requested and os.environ.get("CI", "").strip().lower() not in ("1", "true", "yes")
