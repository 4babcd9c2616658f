"""`python -m services.scheduler [--flags]`: start the scheduler (flags: --help)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from shared.log import setup_logging

if TYPE_CHECKING:
    import redis


def connect_redis(url: str, log: logging.Logger, attempts: int = 30) -> redis.Redis:
    """A client whose server answers PING, retrying with backoff: Redis may start after us."""
    import redis

    from shared.redis_protocol import connect

    client = connect(url, scheduler=True)  # short timeouts: an outage must not stall the loop
    delay = 0.1
    for _ in range(attempts - 1):
        try:
            client.ping()
            return client
        except redis.ConnectionError as e:
            log.warning("Redis at %s not reachable (%s); retrying in %.1f s", url, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    client.ping()  # the last attempt: its ConnectionError is the caller's
    return client


def main(argv: list[str] | None = None) -> int:
    setup_logging("scheduler")
    log = logging.getLogger("services.scheduler")
    import redis
    import zmq
    from pydantic import ValidationError

    from services.scheduler.core import SchedulerCore
    from services.scheduler.policy import Limits
    from services.scheduler.service import SchedulerService
    from shared.config import SchedulerSettings, parse_settings
    from shared.speculative import parse_config

    try:
        settings = parse_settings(SchedulerSettings, argv)
        client = connect_redis(settings.redis_url, log)
        limits = Limits(
            settings.max_num_seqs,
            settings.max_num_batched_tokens,
            settings.max_prefill_chunk,
            settings.aging_seconds,
            parse_config(settings.speculative_config),
        )
        service = SchedulerService(settings, SchedulerCore(limits, settings.enable_prefix_caching), client)
        if limits.speculative is not None:  # NOTE: say where it does not apply, never silently
            spec = limits.speculative
            source = (
                f"lookup {spec.prompt_lookup_min}..{spec.prompt_lookup_max} tokens"
                if spec.method == "ngram"
                else f"drafted by each worker's {spec.model}; none on a worker without it"
            )
            log.info(
                "speculative decoding: %s, up to %d proposed tokens a decode (%s)%s; "
                "every request may carry them (sampled ones by rejection sampling), as many as its recent "
                "acceptance and its worker's measured step cost say pay, so none in a compute-bound step",
                spec.method,
                spec.num_speculative_tokens,
                source,
                f", off while a worker runs more than {spec.disable_by_batch_size} requests"
                if spec.disable_by_batch_size
                else "",
            )
    except (ValidationError, redis.ConnectionError, zmq.ZMQError) as e:
        log.error("cannot start: %s", e)
        return 2
    service.install_signal_handlers()
    return service.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
