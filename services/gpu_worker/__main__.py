"""`python -m services.gpu_worker [--flags]`: start one worker (flags: --help)."""

from __future__ import annotations

import logging
import sys
from typing import Optional

from shared.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging("gpu_worker")
    log = logging.getLogger("services.gpu_worker")
    from pydantic import ValidationError

    from shared.config import WorkerSettings, parse_settings
    from shared.models import ModelLoadError, check_model_dir
    from shared.cpu_layout import apply as apply_cpu_layout, format_cores

    try:
        settings = parse_settings(WorkerSettings, argv)
        if settings.model:  # before the slow imports: a typo fails in a fraction of a second
            check_model_dir(settings.model)
        # Before the model loads: torch's OpenMP threads inherit the binding when they start.
        try:
            threads, cores = apply_cpu_layout(settings.num_threads, settings.cpu_affinity)
        except ValueError as e:  # cores this process may not use
            log.error("cannot start: %s", e)
            return 2
        log.info("%d compute threads, %s", threads, f"bound to cores {format_cores(cores)}" if cores else "unbound")
        settings = in_force(settings, threads, cores)
        from services.gpu_worker.factory import create_engine
        from services.gpu_worker.worker import Worker, close_engine

        engine, info = create_engine(settings)
    except (ModelLoadError, ValidationError) as e:
        log.error("cannot start: %s", e)
        return 2
    curve = None
    if settings.zmq_server_public_key:
        if not settings.zmq_client_secret_key:
            log.error("cannot start: zmq_server_public_key is set but zmq_client_secret_key is not")
            return 2
        curve = (settings.zmq_server_public_key, settings.zmq_client_secret_key)
    try:
        worker = Worker(engine, info, settings.scheduler_address, settings.heartbeat_interval, curve)
        worker.install_signal_handlers()
        worker.serve()
    finally:
        close_engine(engine)  # stops the tensor-parallel followers
    return 0 if worker.failure is None else 1


def in_force(settings, threads: int, cores: Optional[list[int]]):
    """The settings with the layout now in force, so that a tensor-parallel worker shares out
    exactly these cores and threads ("auto" again would reserve cores twice)."""
    from shared.cpu_layout import NONE, format_cores

    return settings.model_copy(update=dict(num_threads=threads,
                                           cpu_affinity=NONE if cores is None else format_cores(cores)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
