"""BENCH.md's two baselines: Hugging Face `generate` with static batches, and one request at
a time, on the same model directory, dtype and torch threads as the Conveyor run.

Both are greedy with EOS masked until the last token (`min_new_tokens = max_new_tokens`),
so every output has exactly its requested length, as `ignore_eos` gives Conveyor; for a
workload that stops at EOS (`chat`, its prompts rendered with the model's template) each row
stops at EOS or its own max_tokens, greedy or sampled (one seed per batch: `generate` has
no per-row seed). Token times come from a streamer that `generate` calls after each
decoding step: the first call after the prompt is the first token, i.e. the end of the prefill.

Static batching: batches of up to 32 in arrival order, left-padded. The runner, when
free, starts the next batch as soon as 32 requests are waiting, or 50 ms after the
batch's first request arrived, whichever comes first; the batch runs to its longest
request. A request's own tokens are its row's, each row stopped at its own max_tokens
(or EOS): its first token arrives with the batch's first token, its later ones with the
batch's steps, and it is complete when the batch ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bench.metrics import RequestRecord, progress_bar
from bench.workloads import Request, Workload

BATCH_SIZE = 32
MAX_WAIT_S = 0.05


class StepTimes(BaseStreamer):
    """Records when `generate` hands out each new token (the first put is the prompt)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(self.clock())

    def end(self) -> None:
        pass


def load_model(model_dir, dtype: torch.dtype, device: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def pad_id(model) -> int:
    pid = model.generation_config.pad_token_id
    return int(pid if pid is not None else 0)


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class RowLimits(StoppingCriteria):
    """Stops each row at its own number of new tokens; the batch ends when every row has stopped."""

    def __init__(self, width: int, limits: list[int]):
        self.width, self.limits = width, torch.tensor(limits)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.width) >= self.limits.to(input_ids.device)


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    limits: list[int],
    clock: Callable[[], float],
    stop_at_eos: bool = False,
    sampling: tuple[float, float, int] | None = None,
) -> tuple[list[float], list[tuple[int, str]]]:
    """Left-padded; row i gets exactly limits[i] new tokens, or (stop_at_eos) stops at EOS
    within them. Greedy, or sampling = (temperature, top_p, seed). Returns the time of each
    step and each row's (token count, finish reason)."""
    assert all(prompts), "the baselines need every prompt as token ids"
    device = model.device
    width, steps = max(len(p) for p in prompts), max(limits)
    pid = pad_id(model)
    ids = torch.full((len(prompts), width), pid, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    eos = eos_ids(model)
    config = GenerationConfig(
        max_new_tokens=steps,
        min_new_tokens=0 if stop_at_eos else steps,
        eos_token_id=eos or None,
        pad_token_id=pid,
        do_sample=sampling is not None,
        **(dict(temperature=sampling[0], top_p=sampling[1]) if sampling else {}),
    )
    if sampling:
        torch.manual_seed(sampling[2])
    streamer = StepTimes(clock)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([RowLimits(width, limits)]),
    )
    assert out.shape[1] - width == len(streamer.times) <= steps, (out.shape, width, steps)
    assert stop_at_eos or len(streamer.times) == steps, (len(streamer.times), steps)
    rows = []
    for row, limit in zip(out[:, width:].tolist(), limits):
        at = next((i for i, t in enumerate(row[:limit]) if t in eos), None) if stop_at_eos else None
        rows.append((limit, "length") if at is None else (at + 1, "stop"))
    return streamer.times, rows


def _sampling(reqs: list[Request]) -> tuple[float, float, int] | None:
    """The first request's sampling settings (None: greedy); a batch shares its seed."""
    r = reqs[0]
    return (r.temperature, r.top_p, r.seed or 0) if r.temperature > 0 else None


def _generate_for(model, reqs: list[Request], clock: Callable[[], float]):
    return generate(
        model,
        [r.prompt for r in reqs],
        [r.max_tokens for r in reqs],
        clock,
        stop_at_eos=not reqs[0].ignore_eos,
        sampling=_sampling(reqs),
    )


def seconds_since(t0: float) -> Callable[[], float]:
    """A clock of the run: seconds since `t0` (a time.perf_counter() reading)."""

    def clock() -> float:
        return time.perf_counter() - t0

    return clock


def warm_up(model) -> None:
    generate(model, [[3, 4, 5, 6]] * 2, [2, 2], time.perf_counter)


# ---- static batching ---------------------------------------------------------------------------


def next_batch(
    arrivals: list[float],
    first: int,
    free_at: float,
    batch_size: int = BATCH_SIZE,
    max_wait: float = MAX_WAIT_S,
) -> tuple[float, int]:
    """The next batch when the runner is free at `free_at` and requests `first:` (in
    arrival order) are unserved: (its start time, the index after its last request)."""
    n = len(arrivals)
    full_at = arrivals[first + batch_size - 1] if first + batch_size - 1 < n else math.inf
    start = max(free_at, min(full_at, arrivals[first] + max_wait))
    end = first
    while end < n and end - first < batch_size and arrivals[end] <= start:
        end += 1
    return start, end


def run_static(
    model,
    workload: Workload,
    batch_size: int = BATCH_SIZE,
    max_wait: float = MAX_WAIT_S,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> list[RequestRecord]:
    reqs = workload.requests
    arrivals = [r.arrival for r in reqs]
    assert arrivals == sorted(arrivals), "workload requests must be in arrival order"
    records = [
        RequestRecord(i, len(r.prompt), r.max_tokens, r.arrival, start=r.arrival, tag=r.tag)
        for i, r in enumerate(reqs)
    ]
    bar = progress_bar(len(reqs), f"static batching ({workload.name})") if progress else None
    clock = seconds_since(time.perf_counter())
    first = 0
    try:
        while first < len(reqs):
            start, end = next_batch(arrivals, first, clock(), batch_size, max_wait)
            if start > clock():
                sleep(start - clock())
            times, rows = _generate_for(model, reqs[first:end], clock)
            batch_end = clock()
            for rec, (n, finish) in zip(records[first:end], rows):
                rec.chunk_times = times[:n]
                rec.first_token, rec.end, rec.output_tokens, rec.finish_reason = (
                    times[0],
                    batch_end,
                    n,
                    finish,
                )
            if bar is not None:
                bar.update(end - first)
            first = end
    finally:
        if bar is not None:
            bar.close()
    return records


# ---- no batching ---------------------------------------------------------------------------------


def subset_indices(workload: Workload, k: int) -> list[int]:
    """About `k` requests spread evenly over the workload, each tag (long/short) in its share."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(workload.requests):
        groups.setdefault(r.tag, []).append(i)
    n = len(workload)
    picked: list[int] = []
    for members in groups.values():
        count = min(len(members), max(1, round(k * len(members) / n)))
        picked += [members[j] for j in np.unique(np.linspace(0, len(members) - 1, count).round().astype(int))]
    return sorted(picked)


def run_no_batching(
    model, workload: Workload, indices: list[int], progress: bool = True
) -> list[RequestRecord]:
    """One request at a time, back to back: latencies include no queueing."""
    bar = progress_bar(len(indices), f"no batching ({workload.name}, subset)") if progress else None
    clock = seconds_since(time.perf_counter())
    records = []
    try:
        for i in indices:
            r = workload.requests[i]
            rec = RequestRecord(i, len(r.prompt), r.max_tokens, r.arrival, start=clock(), tag=r.tag)
            rec.chunk_times, [(rec.output_tokens, rec.finish_reason)] = _generate_for(model, [r], clock)
            rec.first_token, rec.end = rec.chunk_times[0], clock()
            records.append(rec)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records


def subset_note(workload: Workload, indices: list[int]) -> dict:
    sub = [workload.requests[i] for i in indices]
    return {
        "requests": len(indices),
        "of": len(workload),
        "mean_prompt_tokens": float(np.mean([len(r.prompt) for r in sub])),
        "mean_output_tokens": float(np.mean([r.max_tokens for r in sub])),
        "workload_mean_prompt_tokens": workload.prompt_tokens / len(workload),
        "workload_mean_output_tokens": workload.output_tokens / len(workload),
        "output_tokens_are_max_tokens": workload.stops_at_eos,  # what each request may produce, at most
        "note": (
            "one request at a time on an evenly spread subset; throughput is the subset's "
            "(tokens or requests / time spent generating them), i.e. the rate a one-at-a-time "
            "server would sustain; latencies exclude the queueing such a server would add"
        ),
    }
