"""The GPU check's parts, in the order they run: each is one command with its own timeout,
and its estimated wall time on an H100-class GPU (docs/gpu.md says how each was reached).
With dry=True each CUDA part becomes its CPU / TRITON_INTERPRET=1 version on tiny shapes,
through the same plumbing (same result files, same figures), so CI exercises all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.gpu import figures

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
# bench_step's HF side prefills 256 x 128 tokens with logits at every position (~10 GB in
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
    device = "cpu" if dry else "cuda"
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    interpret = {"TRITON_INTERPRET": "1"} if dry else {}
    return [
        Part(
            "install",
            "wheels the image lacks: " + ("closure and pins checked" if dry else f"installed into {site}"),
            [python, "-m", "tests.gpu.wheels", *(["check"] if dry else ["install", "--target", str(site)])],
            timeout_s=120,
            estimate_s=15,
        ),
        Part(
            "model",
            "the gpu-0.5b model generated (random weights, offline), beside the next parts",
            [python, "-m", "shared.tiny_model", "--preset", "tiny" if dry else "gpu-0.5b"],
            timeout_s=240,
            estimate_s=0,
            background=True,
        ),
        Part(
            "kernels",
            "Triton kernels vs the fp32 reference: fp32, fp16" + ("" if dry else ", bf16"),
            [
                *pytest,
                "tests/kernels/test_triton_kernels.py",
                f"--junitxml={work / 'kernels.xml'}",
                *(["-k", DRY_KERNEL_TESTS] if dry else []),
            ],
            timeout_s=200,
            estimate_s=60,
            env=interpret,
            figures=lambda w: figures.junit(w / "kernels.xml"),
        ),
        Part(
            "greedy",
            "greedy = transformers, fp32, Llama/Qwen2/Qwen3 (alone, batched, prefix hits, preemption)",
            [
                *pytest,
                "tests/gpu_worker/test_engine_vs_hf.py",
                "tests/kernels/test_engine_on_backends.py",
                f"--junitxml={work / 'greedy.xml'}",
                "-k",
                DRY_GREEDY_TESTS if dry else GREEDY_TESTS,
            ],
            timeout_s=200,
            estimate_s=60,
            env={"CONVEYOR_TEST_DEVICE": device, **SMALL_ENGINES, **interpret},
            figures=lambda w: figures.junit(w / "greedy.xml"),
        ),
        Part(
            "bf16",
            "bf16 greedy agreement with fp32 transformers over the first N tokens",
            [
                python,
                "-m",
                "tests.gpu.bf16_agreement",
                "--device",
                device,
                "--out",
                str(work / "bf16.json"),
                *(["--tokens", "4", "--prompts", "2"] if dry else []),
            ],
            timeout_s=120,
            estimate_s=25,
            env=SMALL_ENGINES,
            figures=lambda w: figures.bf16(w / "bf16.json"),
        ),
        Part(
            "bandwidth",
            "decode attention on gpu-0.5b shapes, as a fraction of a device-to-device copy",
            [
                python,
                "-m",
                "tests.gpu.dry_bandwidth" if dry else "bench.decode_attention_bandwidth",
                "--out",
                str(work / "decode_bw.json"),
            ],
            timeout_s=120,
            estimate_s=25,
            env=interpret,
            figures=lambda w: figures.bandwidth(w / "decode_bw.json"),
        ),
        Part(
            "worker-step",
            "decode tok/s of one worker step vs HF's forward, gpu-0.5b, bf16",
            [
                python,
                "-m",
                "services.gpu_worker.bench_step",
                "--device",
                device,
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
            figures=lambda w: figures.worker_step(w / "worker_step.json"),
        ),
        Part(
            "mixed",
            "BENCH.md's mixed, 1,000 requests on gpu-0.5b over HTTP, vs HF static batching",
            [
                python,
                "-m",
                "bench.run",
                "--workload",
                "mixed",
                "--device",
                device,
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
            figures=lambda w: figures.mixed(w / "mixed" / "results.json"),
        ),
    ]
