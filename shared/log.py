"""One log format for every process, so interleaved output says which process speaks."""

from __future__ import annotations

import logging

from shared.config import LogSettings


def setup_logging(service: str) -> str:
    """Configures the root logger; returns the level (CONVEYOR_LOG_LEVEL)."""
    level = LogSettings().log_level
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return level
