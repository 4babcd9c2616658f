"""A tensor-parallel follower that exits at one point of its start-up, as one that crashes or
runs out of memory there: the start-up failure tests run it in place of tp_follower.

    python -m tests.gpu_worker.dying_tp_follower POINT [tp_follower's flags]
"""

from __future__ import annotations

import os
import sys

from services.gpu_worker import tp_follower


def main(point: str, argv: list[str]) -> int:
    assert point in tp_follower.START_UP_POINTS, point

    def exit_at(reached: str) -> None:
        if reached == point:
            os._exit(3)  # at once, as a crash: no clean-up, no goodbye to rank 0

    return tp_follower.main(argv, at_point=exit_at)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
