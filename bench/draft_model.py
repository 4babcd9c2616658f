"""A draft model for speculative decoding made from the target itself: its first layers,
then its final norm and head (a "truncated" draft, sharing the tokenizer by construction).
It needs no download, so the draft-model benchmark runs on any model BENCH.md names.

    python -m bench.draft_model --model smollm2 --layers 8   # prints the draft's directory
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# What a model directory holds beside its weights and config that the draft shares.
_SHARED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def truncated_draft(src: Path, layers: int, out: Path) -> Path:
    """`out` holding the first `layers` layers of the model in `src` (made once: an existing
    `out` is returned as it is)."""
    if (out / "config.json").is_file():
        return out
    config = json.loads((src / "config.json").read_text())
    total = config["num_hidden_layers"]
    if not 0 < layers < total:
        raise ValueError(f"layers must be in [1, {total - 1}] for a model of {total} layers (got {layers})")
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:layers]
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 safe_open has keys() but is not iterable
                match = _LAYER.match(name)
                if match is None or int(match.group(1)) < layers:
                    tensors[name] = f.get_tensor(name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in _SHARED_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    from bench.run import resolve_model
    from shared.model_cache import cache_root

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="smollm2", help="a preset, a real model (smollm2) or a model directory"
    )
    ap.add_argument("--layers", type=int, required=True, help="layers the draft keeps")
    args = ap.parse_args(argv)
    src, preset = resolve_model(args.model)
    print(
        truncated_draft(
            src, args.layers, cache_root() / "drafts" / f"{preset or src.name}-{args.layers}-layer"
        )
    )


if __name__ == "__main__":
    main()
