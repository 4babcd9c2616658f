"""`python -m services.gpu_worker [--flags]`: start one worker (flags: --help).

A configuration error (a bad setting, a missing, unreadable or unsupported model, cores it
may not use) stops it at start-up with one line naming the problem and exit code 2, which
`make run` does not restart; with REDIS_URL set the line is also recorded in Redis, where
the gateway's 503 and `conveyor status` show it. Any other failure exits non-zero but not 2.
"""

from __future__ import annotations

import logging
import sys

from shared.log import setup_logging

log = logging.getLogger("services.gpu_worker")


def main(argv: list[str] | None = None) -> int:
    setup_logging("gpu_worker")
    from shared.config import CONFIG_ERROR_EXIT, ConfigError

    settings = None
    try:
        settings = worker_settings(argv)
        curve = curve_keys(settings)
        check_scheduler_link(settings.scheduler_address, curve)
        settings = apply_cpu_layout(settings)  # before the model loads: see apply_cpu_layout
        from services.gpu_worker.factory import create_engine
        from services.gpu_worker.worker import Worker, close_engine

        engine, info = create_engine(settings)
    except ConfigError as e:
        log.error("cannot start: %s", e)
        report_startup_failure(settings, str(e))
        return CONFIG_ERROR_EXIT
    try:
        worker = Worker(engine, info, settings.scheduler_address, settings.heartbeat_interval, curve)
        worker.install_signal_handlers()
        worker.serve()
    finally:
        close_engine(engine)  # stops the tensor-parallel followers
    return 0 if worker.failure is None else 1


def worker_settings(argv: list[str] | None):
    """The settings, or a ConfigError naming each bad one; a model named is checked before
    the slow imports, so that a typo fails in a fraction of a second."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from shared.config import ConfigError, WorkerSettings, parse_settings, settings_error
    from shared.models import check_model_dir

    try:
        settings = parse_settings(WorkerSettings, argv)
    except ValidationError as e:
        raise settings_error(e) from None
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    if settings.model:
        check_model_dir(settings.model)
    return settings


def curve_keys(settings) -> tuple[str, str] | None:
    """(the scheduler's public key, this worker's secret key) when the link is encrypted."""
    from shared.config import ConfigError

    if not settings.zmq_server_public_key:
        return None
    if not settings.zmq_client_secret_key:
        raise ConfigError("zmq_server_public_key is set but zmq_client_secret_key is not")
    return settings.zmq_server_public_key, settings.zmq_client_secret_key


def check_scheduler_link(address: str, curve: tuple[str, str] | None) -> None:
    """A malformed address or key fails here, before the model loads; an unreachable
    scheduler is only waited for (it may start later)."""
    import zmq

    from shared.config import ConfigError
    from shared.curve import secure_client

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            try:
                secure_client(sock, *curve)
            except (zmq.ZMQError, ValueError) as e:
                raise ConfigError(
                    f"the CurveZMQ keys (zmq_server_public_key, zmq_client_secret_key): {e}"
                ) from None
        try:
            sock.connect(address)
        except zmq.ZMQError as e:
            raise ConfigError(f"scheduler_address {address!r}: {e}") from None
    finally:
        sock.close()


def apply_cpu_layout(settings):
    """Binds this process to its cores and sets its threads, before torch's OpenMP threads
    start (they inherit the binding); the settings with the layout now in force."""
    from shared.config import ConfigError
    from shared.cpu_layout import apply, format_cores

    try:
        threads, cores = apply(settings.num_threads, settings.cpu_affinity, settings.omp_num_threads)
    except ValueError as e:  # cores this process may not use
        raise ConfigError(str(e)) from None
    log.info(
        "%d compute threads, %s", threads, f"bound to cores {format_cores(cores)}" if cores else "unbound"
    )
    return in_force(settings, threads, cores)


def in_force(settings, threads: int, cores: list[int] | None):
    """The settings with the layout now in force, so that a tensor-parallel worker shares out
    exactly these cores and threads ("auto" again would reserve cores twice)."""
    from shared.cpu_layout import NONE, format_cores

    return settings.model_copy(
        update=dict(num_threads=threads, cpu_affinity=NONE if cores is None else format_cores(cores))
    )


def report_startup_failure(settings, error: str) -> None:
    """Records `error` in Redis when REDIS_URL is set (compose restarts the worker, so its
    log alone would hide it from clients). `settings` None: they did not validate, and the
    environment alone says who this worker is and where Redis is."""
    import redis
    from pydantic import ValidationError

    from shared.config import StartupReportSettings
    from shared.redis_keys import RedisKeys
    from shared.redis_protocol import connect, record_startup_failure

    if settings is None:
        try:
            settings = StartupReportSettings()
        except ValidationError:
            return  # the error is logged; nowhere valid to record it
    if not settings.redis_url:
        return
    try:
        client = connect(settings.redis_url)
        try:
            record_startup_failure(client, RedisKeys(settings.redis_prefix), settings.worker_id, error)
        finally:
            client.close()
    except (redis.RedisError, ValueError) as e:  # ValueError: a malformed REDIS_URL
        log.warning("could not record this failure in Redis at %s: %s", settings.redis_url, e)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
