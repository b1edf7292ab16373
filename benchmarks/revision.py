"""Which cgtree source a benchmark ran: ``git describe --always --dirty`` of the repository.

"-dirty" is part of the answer, not noise: the lent GPU machines run a copy of the working tree
whose ``.git`` can lag behind it (session 13's results said cfd339b for code three commits
newer), and only a working tree that differs from its HEAD shows that.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent


def source_revision() -> Optional[str]:
    """The short commit, with "-dirty" when the working tree differs from it; None without git."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None
