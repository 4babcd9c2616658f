"""The GPU check's parts, in the order they run: each is one command with its own timeout,
and its estimated wall time on an H100-class GPU (docs/gpu.md says how each was reached).
With dry=True each CUDA part becomes its CPU / TRITON_INTERPRET=1 version on tiny shapes,
through the same plumbing (same result files, same figures), so CI exercises all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.gpu_check import part_results

# Shapes of the dry run: small enough for two loaded CPU cores and the Triton interpreter.
DRY_KERNEL_TESTS = "test_store_kv or (float32 and 16 and 4-2) or other_head_dims"
DRY_GREEDY_TESTS = "chunk_size and 1000 or triton"  # a batch of 4 on qwen3; the Triton engine
# 4 requests of `mixed`; seed 5 keeps the longest output at 71 tokens, so HF's one static batch is short.
DRY_MIXED = ["--model", "tiny", "--requests", "4", "--seed", "5", "--no-batching-requests", "1"]
GREEDY_TESTS = "not backend or triton"
# On CUDA an engine's KV cache is a share of the free memory (kv_cache_memory is the CPU's
# budget): 85% of an H200 per test engine would be zeroed, and held in torch's cache, for
# models that need megabytes. 5% (7 GB) is plenty.
SMALL_ENGINES = {"CONVEYOR_GPU_MEMORY_FRACTION": "0.05"}
# bench/worker_step.py's HF side prefills 256 x 128 tokens with logits at every position (~10 GB in
# bf16 on gpu-0.5b's 151,936-word vocabulary, more upcast): room for it beside the engine's cache.
HALF_FOR_THE_ENGINE = {
    "CONVEYOR_GPU_MEMORY_FRACTION": "0.5"
}  # test_engine_on_backends: only its Triton case runs on CUDA


@dataclass
class Part:
    name: str
    what: str  # one line, for the summary and docs/gpu.md
    argv: list[str]
    timeout_s: float
    estimate_s: float  # H100-class wall time, for the budget (docs/gpu.md)
    env: dict[str, str] = field(default_factory=dict)
    figures: Callable[[Path], dict] | None = None  # reads the part's output under the work dir
    background: bool = False  # starts, and the parts after it run while it does
    needs: str | None = None  # a background part that must have finished first


def parts(dry: bool, python: str, work: Path, site: Path) -> list[Part]:
    """The check's parts in the order they run; each writes its result files under `work`."""
    return [
        _install(dry, python, site),
        _model(dry, python),
        _kernels(dry, python, work),
        _greedy(dry, python, work),
        _bf16(dry, python, work),
        _bandwidth(dry, python, work),
        _worker_step(dry, python, work),
        _mixed(dry, python, work),
    ]


def _device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def _interpret(dry: bool) -> dict[str, str]:
    return {"TRITON_INTERPRET": "1"} if dry else {}


def _pytest(python: str) -> list[str]:
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]


def _install(dry: bool, python: str, site: Path) -> Part:
    return Part(
        "install",
        "wheels the image lacks: " + ("closure and pins checked" if dry else f"installed into {site}"),
        [
            python,
            "-m",
            "tools.gpu_check.wheels",
            *(["check"] if dry else ["install", "--target", str(site)]),
        ],
        timeout_s=120,
        estimate_s=15,
    )


def _model(dry: bool, python: str) -> Part:
    return Part(
        "model",
        "the gpu-0.5b model generated (random weights, offline), beside the next parts",
        [python, "-m", "conveyor.tiny_model", "--preset", "tiny" if dry else "gpu-0.5b"],
        timeout_s=240,
        estimate_s=0,
        background=True,
    )


def _kernels(dry: bool, python: str, work: Path) -> Part:
    return Part(
        "kernels",
        "Triton kernels vs the fp32 reference: fp32, fp16" + ("" if dry else ", bf16"),
        [
            *_pytest(python),
            "tests/kernels/test_triton_kernels.py",
            f"--junitxml={work / 'kernels.xml'}",
            *(["-k", DRY_KERNEL_TESTS] if dry else []),
        ],
        timeout_s=200,
        estimate_s=60,
        env=_interpret(dry),
        figures=lambda w: part_results.junit(w / "kernels.xml"),
    )


def _greedy(dry: bool, python: str, work: Path) -> Part:
    return Part(
        "greedy",
        "greedy = transformers, fp32, Llama/Qwen2/Qwen3 (alone, batched, prefix hits, preemption)",
        [
            *_pytest(python),
            "tests/gpu_worker/test_engine_vs_hf.py",
            "tests/kernels/test_engine_on_backends.py",
            f"--junitxml={work / 'greedy.xml'}",
            "-k",
            DRY_GREEDY_TESTS if dry else GREEDY_TESTS,
        ],
        timeout_s=200,
        estimate_s=60,
        env={"CONVEYOR_TEST_DEVICE": _device(dry), **SMALL_ENGINES, **_interpret(dry)},
        figures=lambda w: part_results.junit(w / "greedy.xml"),
    )


def _bf16(dry: bool, python: str, work: Path) -> Part:
    return Part(
        "bf16",
        "bf16 greedy agreement with fp32 transformers over the first N tokens",
        [
            python,
            "-m",
            "tools.gpu_check.bf16_agreement",
            "--device",
            _device(dry),
            "--out",
            str(work / "bf16.json"),
            *(["--tokens", "4", "--prompts", "2"] if dry else []),
        ],
        timeout_s=120,
        estimate_s=25,
        env=SMALL_ENGINES,
        figures=lambda w: part_results.bf16(w / "bf16.json"),
    )


def _bandwidth(dry: bool, python: str, work: Path) -> Part:
    return Part(
        "bandwidth",
        "decode attention on gpu-0.5b shapes, as a fraction of a device-to-device copy",
        [
            python,
            "-m",
            "tools.gpu_check.dry_bandwidth" if dry else "bench.decode_attention_bandwidth",
            "--out",
            str(work / "decode_bw.json"),
        ],
        timeout_s=120,
        estimate_s=25,
        env=_interpret(dry),
        figures=lambda w: part_results.bandwidth(w / "decode_bw.json"),
    )


def _worker_step(dry: bool, python: str, work: Path) -> Part:
    return Part(
        "worker-step",
        "decode tok/s of one worker step vs HF's forward, gpu-0.5b, bf16",
        [
            python,
            "-m",
            "bench.worker_step",
            "--device",
            _device(dry),
            "--out",
            str(work / "worker_step.json"),
            *(
                ["--models", "tiny", "--batches", "1", "32", "--steps", "2", "--repeats", "1"]
                if dry
                else ["--models", "gpu-0.5b", "--dtype", "bfloat16", "--batches", "1", "64", "256"]
            ),
        ],
        timeout_s=150,
        estimate_s=60,
        env=HALF_FOR_THE_ENGINE,
        needs="model",
        figures=lambda w: part_results.worker_step(w / "worker_step.json"),
    )


def _mixed(dry: bool, python: str, work: Path) -> Part:
    return Part(
        "mixed",
        "BENCH.md's mixed, 1,000 requests on gpu-0.5b over HTTP, vs HF static batching",
        [
            python,
            "-m",
            "bench.run",
            "--workload",
            "mixed",
            "--device",
            _device(dry),
            "--quiet",
            "--out",
            str(work / "mixed"),
            *(
                DRY_MIXED
                if dry
                else ["--model", "gpu-0.5b", "--requests", "1000", "--no-batching-requests", "4"]
            ),
        ],
        timeout_s=330,
        estimate_s=270,
        needs="model",
        figures=lambda w: part_results.mixed(w / "mixed" / "results.json"),
    )
