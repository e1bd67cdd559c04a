"""What the launcher (torchrun, the SLURM wrapper) says about this process, before any group exists.

The only place outside ``parallel/state.py`` that reads the launcher's
variables; it imports nothing heavy, so the CLI can ask before torch loads.
"""

from __future__ import annotations

import os


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def launched_world_size() -> int:
    """The world size the launcher set (1 without a launcher)."""
    return env_int("WORLD_SIZE", 1)


def launched_rank() -> int | None:
    """This process's rank as the launcher set it (None without a launcher)."""
    value = os.environ.get("RANK")
    return None if value in (None, "") else int(value)


def several_nodes() -> bool:
    """True under ``launch/multinode.sh`` (and so SLURM): ``NNODES`` set above 1."""
    return os.environ.get("NNODES", "1") not in ("", "1", "1:1")
