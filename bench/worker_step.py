"""Decode throughput of one in-process worker step against Hugging Face's own forward
with its KV cache, at the same batch, model, dtype and threads, in the same run.

    python -m bench.worker_step [--models tiny small] [--batches 1 16 64 256] [--out FILE]
    python -m bench.worker_step --step-ms-only --models small --batches 64
    python -m bench.worker_step --tensor-parallel-size 1 2   # each in the same run
    python -m bench.worker_step --models gpu-0.5b --device cuda --dtype bfloat16

Each request has a CONTEXT-token prompt; both sides prefill, then time STEPS decode steps.
Figures are medians over REPEATS alternating rounds; the ratio is Conveyor / HF.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
from transformers import AutoModelForCausalLM

from conveyor.tiny_model import ensure_model
from services.gpu_worker.factory import create_engine
from shared.config import WorkerSettings
from shared.messages import CachedRequest, NewRequest, SamplingParams, StepPlan

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1 << 20)


def conveyor_decode_rate(
    engine, batch: int, context: int, steps: int, block_size: int, clock=time.perf_counter
) -> float:
    vocab = engine.model.shape.vocab_size
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, vocab, (batch, context), generator=g).tolist()
    blocks_per_req = -(-(context + steps + 1) // block_size)
    ids = [f"b{i}" for i in range(batch)]
    next_block = 0
    new = []
    for rid, prompt in zip(ids, prompts):
        new.append(
            NewRequest(rid, prompt, context, GREEDY, list(range(next_block, next_block + blocks_per_req)))
        )
        next_block += blocks_per_req
    result = engine.execute(StepPlan(0, new_requests=new, num_scheduled_tokens={r: context for r in ids}))
    assert result.error is None, result.error
    start = clock()
    for s in range(steps):
        cached = [CachedRequest(r, [], context + s) for r in ids]
        result = engine.execute(
            StepPlan(1 + s, cached_requests=cached, num_scheduled_tokens={r: 1 for r in ids})
        )
        assert result.error is None, result.error
    elapsed = clock() - start
    engine.execute(StepPlan(steps + 1, finished_ids=ids))
    return batch * steps / elapsed


@torch.inference_mode()
def hf_decode_rate(model, batch: int, context: int, steps: int) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=g).to(model.device)
    out = model(input_ids=ids, use_cache=True)
    cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)  # on CUDA the loop only queued the work
    return batch * steps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--tensor-parallel-size",
        nargs="+",
        type=int,
        default=[1],
        help="ranks of Conveyor's engine; several: one row each "
        "(on CPU the all-reduce costs more than it gives)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda: the engine's and HF's")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--out", default="bench/results/worker_step.json")
    ap.add_argument(
        "--step-ms-only",
        action="store_true",
        help="print only Conveyor's decode step time in ms (first model and batch), as JSON",
    )
    args = ap.parse_args()
    if args.step_ms_only:
        print(
            json.dumps(
                decode_step_ms(
                    args.models[0], args.batches[0], args.context, args.steps, args.tensor_parallel_size[0]
                )
            )
        )
        return

    rows = []
    for preset in args.models:
        model_dir = ensure_model(preset)
        hf = (
            AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, args.dtype), local_files_only=True
            )
            .to(args.device)
            .eval()
        )
        tokens_needed = max(args.batches) * (args.context + args.steps + 16)
        for (
            tp
        ) in args.tensor_parallel_size:  # one engine at a time: a process joins one tensor-parallel group
            engine, info = _engine(model_dir, tokens_needed, tp, args.device, args.dtype)
            try:
                rows += [_row(args, preset, tp, batch, engine, info, hf) for batch in args.batches]
            finally:
                engine.close()
    write_results(args, rows)


def _row(args: argparse.Namespace, preset: str, tp: int, batch: int, engine, info, hf) -> dict:
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate so drift in machine load hits both
        ours.append(conveyor_decode_rate(engine, batch, args.context, args.steps, info.block_size))
        theirs.append(hf_decode_rate(hf, batch, args.context, args.steps))
    row = dict(
        model=preset,
        tensor_parallel_size=tp,
        batch=batch,
        conveyor_tok_s=statistics.median(ours),
        hf_tok_s=statistics.median(theirs),
    )
    row["ratio"] = row["conveyor_tok_s"] / row["hf_tok_s"]
    print(
        f"{preset:6s} tp {tp} batch {batch:4d}: conveyor {row['conveyor_tok_s']:9.1f} tok/s   "
        f"hf {row['hf_tok_s']:9.1f} tok/s   ratio {row['ratio']:.2f}",
        flush=True,
    )
    return row


def _engine(model_dir, tokens: int, tensor_parallel_size: int, device: str = "cpu", dtype: str = "float32"):
    # On CPU each rank gets 1/N of kv_cache_memory, for 1/N of the KV heads (or a replica).
    return create_engine(
        WorkerSettings(
            model=str(model_dir),
            device=device,
            dtype=dtype,
            kv_cache_memory=cache_bytes(model_dir, tokens),
            tensor_parallel_size=tensor_parallel_size,
        )
    )


def write_results(args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows and the run's conditions (machine, threads, the arguments that size it), as
    JSON at args.out."""
    from pathlib import Path

    meta = dict(
        date=str(date.today()),
        machine=platform.processor() or platform.machine(),
        device=getattr(args, "device", "cpu"),
        dtype=getattr(args, "dtype", "float32"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        context=args.context,
        steps=args.steps,
        repeats=args.repeats,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


def decode_step_ms(preset: str, batch: int, context: int, steps: int, tensor_parallel_size: int = 1) -> float:
    """One decode step of `batch` requests on the `preset` model, in ms."""
    engine, info = _engine(
        ensure_model(preset), max(batch * (context + steps + 16), 4096), tensor_parallel_size
    )
    try:
        return batch / conveyor_decode_rate(engine, batch, context, steps, info.block_size) * 1000
    finally:
        engine.close()


def cache_bytes(model_dir, tokens: int) -> int:
    """KV cache bytes (fp32) for `tokens` of the model at model_dir, plus 1,024 tokens of slack."""
    from services.gpu_worker.loader import load_config, model_shape

    s = model_shape(load_config(model_dir))
    return 2 * s.num_layers * s.num_kv_heads * s.head_dim * 4 * (tokens + 1024)


if __name__ == "__main__":
    main()
