"""`python -m conveyor run | status` — see `python -m conveyor <command> --help`."""

from __future__ import annotations

import sys

USAGE = """usage: python -m conveyor <command> [flags]

commands:
  run      start the whole system locally (embedded Redis unless REDIS_URL is set)
  status   show the queue, the workers and recent errors from Redis (--watch N to refresh)
  keys     print a CurveZMQ key set for a scheduler and workers on other hosts
"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        try:
            return _run(rest)
        except KeyboardInterrupt:  # Ctrl-C before the launcher took SIGINT over: nothing was started yet
            return 0
    if command == "status":
        from conveyor.status import main as status_main

        return status_main(rest)
    if command == "keys":
        from shared.curve import make_keys

        print("# scheduler: the first two; workers: the last two")
        for name, value in make_keys().items():
            print(f"{name}='{value}'")
        return 0
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _run(rest: list[str]) -> int:
    from pydantic import ValidationError

    from conveyor.launcher import Launcher
    from shared.config import RunSettings, parse_settings
    from shared.log import setup_logging

    setup_logging("conveyor")
    try:
        settings = parse_settings(RunSettings, rest)
    except ValidationError as e:
        print(f"conveyor run: {e}", file=sys.stderr)
        return 2
    return Launcher(settings).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
