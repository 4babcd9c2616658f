"""One log format for every process, so interleaved output says which process speaks."""

from __future__ import annotations

import logging
import os


def setup_logging(service: str) -> None:
    level = os.environ.get("CONVEYOR_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
