"""The model as the gateway sees it: its name, length limit, vocabulary, tokenizer and chat
template. The weights stay with the workers; the gateway only reads config.json and the
tokenizer files (offline: nothing is ever downloaded)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.config import GatewaySettings
from shared.models import ModelLoadError, config_int, max_model_len, model_dir, read_config


@dataclass(frozen=True)
class ContextLimits:
    """What a request is validated against: its prompt + max_tokens, its token ids."""

    max_model_len: int
    vocab_size: int


@dataclass
class ServedModel:
    name: str
    path: Path
    tokenizer: Any  # a transformers tokenizer
    max_model_len: int  # from config.json (or --max-model-len): see `limits`
    vocab_size: int
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        # The Rust tokenizer decodes a few tokens in about a microsecond, four times faster
        # than the Python wrapper: the detokenizer calls it twice per generated token.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else self.tokenizer.decode
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)
        self.token_bytes = lru_cache(maxsize=1 << 16)(self._token_bytes)
        is_byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        self._byte_decoder = _byte_level_decoder() if is_byte_level else None

    @property
    def limits(self) -> ContextLimits:
        """The model directory's own; once a worker registered, cluster.worker_limits' (its pool
        may hold less)."""
        return ContextLimits(self.max_model_len, self.vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A completion prompt's ids; special tokens (a BOS) as the tokenizer adds them."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool,
        *,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        add_special_tokens: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt ids of a conversation (the template writes any BOS itself; add_special_tokens
        adds the tokenizer's too). `chat_template` replaces the model's; `template_kwargs` are
        extra variables the template reads (enable_thinking)."""
        if not chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.name!r} has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            tokenize=False,
            **(template_kwargs or {}),
        )
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _token_text(self, token_id: int) -> str:
        """One token's text as logprobs show it (special tokens included)."""
        return self._decode([token_id], skip_special_tokens=False)

    def _token_bytes(self, token_id: int) -> list[int]:
        """One token's raw UTF-8 bytes (a byte-level token may hold part of a character,
        which its text shows as U+FFFD)."""
        if self._byte_decoder is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(ch in self._byte_decoder for ch in piece):
                return [self._byte_decoder[ch] for ch in piece]
        return list(self.token_text(token_id).encode("utf-8"))


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def load_served_model(settings: GatewaySettings) -> ServedModel:
    """Reads the model directory named by the settings (default: the tiny model)."""
    path = model_dir(settings.model)
    config = read_config(path)
    max_len, vocab = (
        max_model_len(config, path, settings.max_model_len),
        config_int(config, "vocab_size", path),
    )
    from transformers import AutoTokenizer  # seconds to import: only once config.json checks out

    source = Path(settings.tokenizer).expanduser() if settings.tokenizer else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {str(source)!r}: {e}") from None
    if len(tokenizer) > vocab:  # its ids past the model's embedding would crash the worker
        raise ModelLoadError(
            f"the tokenizer of {str(source)!r} has {len(tokenizer)} tokens, more than the "
            f"model's vocab_size {vocab}"
        )
    return ServedModel(settings.served_model_name or path.name, path, tokenizer, max_len, vocab)
