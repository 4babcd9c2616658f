"""Generates the random-weight models Conveyor serves by default and tests against: plain
Hugging Face directories (safetensors, a byte-level BPE tokenizer with a ChatML template)
built offline from a fixed seed, the same on every machine. The launcher serves `tiny` when
no model is named; a gateway or worker started alone builds it through shared.models.model_dir.
`python -m conveyor.tiny_model` prints its path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shared.model_cache import default_model_dir, save_model_dir

# transformers takes seconds to import; it is imported where a model is built, so that
# finding an already built model (ensure_tiny_model) stays cheap.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# The shapes of BENCH.md's Models table. max_position_embeddings covers its longest CPU
# workload (2048 + 512 tokens); gpu-0.5b also takes Qwen2.5-0.5B's rope_theta and norm eps.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    ),
    "gpu-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    ),
}
# gpu-0.5b is Qwen2-shaped by definition (qkv bias), whatever arch a caller names.
PRESET_ARCH = {"tiny": "llama", "small": "llama", "gpu-0.5b": "qwen2"}
# The dtype each preset is benchmarked in; the CLI and ensure_model default to it.
PRESET_DTYPE = {"tiny": torch.float32, "small": torch.float32, "gpu-0.5b": torch.bfloat16}
ARCHS = (
    "gemma3_text",
    "llama",
    "mistral",
    "phi3",
    "qwen2",
    "qwen3",
    "qwen3_moe",
)  # transformers model_type names

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, plus tools as Hermes / Qwen2.5 write them: the function signatures as JSON lines
# in a system block, calls as <tool_call> JSON, results as <tool_response> in a user turn.
# Without tools it renders exactly as plain ChatML. `enable_thinking=false` (a
# chat_template_kwargs) opens the answer with an empty think block, as Qwen3's does.
CHAT_TEMPLATE = (  # NOTE: a newline right after a {% tag %} is trimmed (trim_blocks): those are {{ nl }}
    "{% set nl = '\\n' %}{% set ns = namespace(skip_first=false) %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{{ nl }}{{ nl }}{% set ns.skip_first = true %}"
    "{% endif %}"
    "# Tools\n\nYou may call one or more functions. Their signatures, within <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ nl }}{{ tool | tojson }}{% endfor %}"
    "{{ nl }}</tools>\n\nTo call a function, answer with its name and arguments as JSON within "
    '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if loop.first and ns.skip_first %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ nl }}<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>{{ nl }}{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "<|im_start|>assistant"
    "{% if message['content'] %}{{ nl }}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    '{{ nl }}<tool_call>\n{"name": "{{ fn[\'name\'] }}", '
    "\"arguments\": {{ fn['arguments'] | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>{{ nl }}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ nl }}"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
CORPUS = Path(__file__).with_name("corpus.txt")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on CORPUS (deterministic, ~50 ms). All 256 bytes to start
    with make any text round-trip. The corpus holds ~4300 merges, so larger vocabularies
    stop short: the model's extra embedding rows are never produced by the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # min_frequency=1: pairs seen once still merge, so `tiny` fills all 4096 ids. Specials are ids 0, 1, 2.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    # clean_up_tokenization_spaces=False: decode(encode(s)) == s, spaces included.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def make_model(
    out_dir: str | Path,
    arch: str = "llama",
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Writes a random model to `out_dir` (replacing what is there) and returns its path; the
    same arguments give the same files. `overrides` are config fields (num_hidden_layers=2)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    arch = "qwen2" if preset == "gpu-0.5b" else arch
    fields = {**PRESETS[preset], "initializer_range": 0.02, **overrides}
    if arch in ("qwen3", "qwen3_moe"):  # Qwen3Config's head_dim defaults to 128 whatever the hidden size
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])

    tokenizer = build_tokenizer(fields["vocab_size"])
    tokenizer.model_max_length = fields["max_position_embeddings"]
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)
    # No BOS token is prepended (as in Qwen); config.bos_token_id names EOS, as Qwen's does.
    config = AutoConfig.for_model(arch, **fields, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)

    torch.manual_seed(seed)
    # Initialised in fp32 and then cast, so a bf16 model is the rounded fp32 one.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_biases_and_norms(model, config.initializer_range)
    model.to(dtype)
    model.config.dtype = dtype
    # <|im_end|> also stops generation, so a chat turn ends where the template closes it.
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=[eos, im_end], pad_token_id=eos)

    return save_model_dir(model, tokenizer, out_dir)


def _randomize_biases_and_norms(model: torch.nn.Module, std: float) -> None:
    """Biases around 0 and norm weights around 1, not exactly 0 and 1 (transformers' init):
    else a runner that forgot the qkv bias or a norm weight would still match Hugging Face."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif "norm" in name:  # input/post-attention/final RMSNorm, Qwen3's q_norm/k_norm
                param.normal_(1.0, std)


def ensure_model(
    preset: str = "tiny", arch: str | None = None, seed: int = 0, dtype: torch.dtype | None = None
) -> Path:
    """Builds a preset into the cache unless it is there already; returns its directory, named
    after the preset and what differs from its own arch, dtype and seed 0 (`models/small-qwen3-seed1`)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    arch, dtype = arch or PRESET_ARCH[preset], dtype or PRESET_DTYPE[preset]
    name = preset
    if arch != PRESET_ARCH[preset] and preset != "gpu-0.5b":
        name += f"-{arch}"
    if dtype != PRESET_DTYPE[preset]:
        name += f"-{str(dtype).removeprefix('torch.')}"
    if seed:
        name += f"-seed{seed}"
    path = default_model_dir().parent / name
    if not all((path / f).is_file() for f in MODEL_FILES):
        make_model(path, arch=arch, preset=preset, seed=seed, dtype=dtype)
    else:
        update_chat_template(path)
    return path


def update_chat_template(path: Path) -> None:
    """A model cached before CHAT_TEMPLATE last changed keeps its weights (they depend on the
    seed alone) and gets the current template written into its tokenizer_config.json."""
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("chat_template") == CHAT_TEMPLATE:
        return
    config["chat_template"] = CHAT_TEMPLATE
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer_config.", dir=path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    os.replace(tmp, config_file)  # atomic: a reader sees the old file or the new one


def ensure_tiny_model() -> Path:
    """The default model's directory, built on first use (a few seconds), instant after."""
    return ensure_model("tiny")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Builds a random-weight model; prints its dir.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument(
        "--arch", choices=ARCHS, default=None, help="default: the preset's own (llama; qwen2 for gpu-0.5b)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: the preset's benchmark dtype (bfloat16 for gpu-0.5b)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="always (re)build here; default: build into the cache if missing",
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.out is None:
        path = ensure_model(args.preset, args.arch, args.seed, dtype)
    else:
        path = make_model(
            args.out,
            arch=args.arch or PRESET_ARCH[args.preset],
            preset=args.preset,
            seed=args.seed,
            dtype=dtype or PRESET_DTYPE[args.preset],
        )
    print(path)


if __name__ == "__main__":
    main()
