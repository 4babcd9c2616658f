"""`python -m services.gateway [--flags]`: serve the HTTP API (flags: --help).

Every mistake in the settings (a bad value, a missing model directory, a busy port, a bad
ZeroMQ address) stops it at start-up with a message and exit code 2.
"""

from __future__ import annotations

import logging
import socket
import sys

from shared.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    log_level = setup_logging("gateway")
    log = logging.getLogger("services.gateway")
    import redis
    import uvicorn
    import zmq
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from services.gateway.app import create_app
    from services.gateway.served_model import load_served_model
    from services.gateway.shutdown import CUT_GRACE_S, DrainingServer
    from shared.config import GatewaySettings, parse_settings
    from shared.models import ModelLoadError
    from shared.redis_protocol import connect, durability_problem

    try:
        settings = parse_settings(GatewaySettings, argv)
        client = connect(settings.redis_url)
        model = load_served_model(settings)  # seconds: transformers is imported here
        app = create_app(settings, model, client)
        sock = listen(settings.host, settings.port)
    except (ValidationError, SettingsError, ModelLoadError, ValueError, OSError, zmq.ZMQError) as e:
        log.error("cannot start: %s", e)
        return 2
    try:
        if problem := durability_problem(client):  # not fatal: the operator's choice, but say it
            log.warning("Redis at %s: %s (see docs/durability.md)", settings.redis_url, problem)
    except redis.RedisError as e:  # not fatal: Redis may come up after us; /health says 503 meanwhile
        log.warning("Redis at %s does not answer yet: %s", settings.redis_url, e)
    log.info(
        "serving %s (max_model_len %d) on http://%s:%d",
        model.name,
        model.max_model_len,
        *sock.getsockname()[:2],
    )
    # SIGTERM: the drain (shutdown.py) first; uvicorn's own shutdown then only closes what is left.
    config = uvicorn.Config(
        app,
        log_level=log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=CUT_GRACE_S,
        log_config=None,
    )
    DrainingServer(config, app.state.gateway, settings.shutdown_timeout).run(sockets=[sock])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a busy port is a start-up error (exit 2)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # NOTE: proto=IPPROTO_TCP, or asyncio skips TCP_NODELAY on accepted connections and
    # every response waits 40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
