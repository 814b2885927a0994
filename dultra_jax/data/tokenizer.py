"""HF tokenizers from local directories, and prompt encoding with the chat template."""

from __future__ import annotations

import os

from dultra_jax.interop.safetensors_io import CheckpointError


def load_tokenizer(directory: str):
    """The `transformers` tokenizer saved in `directory` (never downloads)."""
    import transformers  # heavy; only the paths that decode text need it

    if not any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                    "tokenizer.model")):
        raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {directory}")
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def encode_prompt(tokenizer, text: str, *, system: str | None = None, chat: bool = True) -> list[int]:
    """Token ids of a user turn rendered with the tokenizer's chat template (plain encoding when
    the tokenizer has no template or `chat` is False), ending with the assistant header."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(text, add_special_tokens=False)
