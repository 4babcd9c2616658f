"""`python -m services.gpu_worker [--flags]`: start one worker (flags: --help)."""

from __future__ import annotations

import logging
import sys

from shared.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging("gpu_worker")
    log = logging.getLogger("services.gpu_worker")
    # Heavy imports after logging is set up, so a slow start is visibly a start.
    from pydantic import ValidationError

    from services.gpu_worker.factory import create_engine
    from services.gpu_worker.loader import ModelLoadError
    from services.gpu_worker.worker import Worker
    from shared.config import WorkerSettings, parse_settings

    try:
        settings = parse_settings(WorkerSettings, argv)
        engine, info = create_engine(settings)
    except (ModelLoadError, ValidationError) as e:
        log.error("cannot start: %s", e)
        return 2
    worker = Worker(engine, info, settings.scheduler_address, settings.heartbeat_interval)
    worker.install_signal_handlers()
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
