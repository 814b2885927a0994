"""HF tokenizers from local directories or hub ids, and prompt encoding with the chat template."""

from __future__ import annotations

import contextlib
import os

from dultra_jax.errors import CheckpointError, DataError
from dultra_jax.hub import resolve_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: str | None) -> bool:
    """Whether `directory` holds tokenizer files (`TOKENIZER_FILES`)."""
    return directory is not None and any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def load_tokenizer(directory: str, *, key: str = "tokenizer"):
    """The `transformers` tokenizer saved in `directory`, a local directory or a hub id resolved
    from the HF cache (`hub.resolve_model_dir`; `key` names it in errors). Never runs the
    directory's remote code, and `transformers` itself never downloads.

    Raises:
      CheckpointError naming `directory` when it has no tokenizer files or they (or the
      `config.json` that `AutoTokenizer` also reads) cannot be loaded; ConfigError `KEY=...` for a
      missing path or a hub id that does not resolve.
    """
    import transformers  # heavy; only the paths that decode text need it

    directory = resolve_model_dir(directory, key)
    if not has_tokenizer(directory):
        raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {directory}")
    # AutoTokenizer reads the directory's config.json and warns that `llada` is not a known model
    # type; the tokenizer itself is complete, so silence that one call. `trust_remote_code=False`:
    # a config.json with an `auto_map` (LLaDA's) would otherwise ask on stdin whether to run it.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:  # a malformed config.json or tokenizer file
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {e}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def encode_prompt(tokenizer, text: str, *, system: str | None = None, chat: bool = True) -> list[int]:
    """Token ids of a user turn rendered with the tokenizer's chat template (plain encoding when
    the tokenizer has no template or `chat` is False), ending with the assistant header.

    Raises:
      DataError naming the characters of `text` (or `system`) that the tokenizer cannot encode.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        with _naming_unknown_characters(tokenizer, (system or "") + text, "prompt"):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        with _naming_unknown_characters(tokenizer, text, "prompt"):
            ids = tokenizer.encode(text, add_special_tokens=False)
    _check_no_unknown(tokenizer, ids, (system or "") + text, "prompt")
    return list(ids)


def unknown_characters(tokenizer, text: str) -> list[str]:
    """The distinct characters of `text`, in order, that `tokenizer` cannot encode: its encoder
    fails on them (a vocabulary without an unknown token) or maps them to its unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = []
    for char in dict.fromkeys(text):
        try:
            ids = tokenizer.encode(char, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            unknown.append(char)
            continue
        if unk is not None and unk in ids:
            unknown.append(char)
    return unknown


def _unknown_message(tokenizer, text: str, what: str) -> str | None:
    unknown = unknown_characters(tokenizer, text)
    if not unknown:
        return None
    shown = ", ".join(repr(c) for c in unknown[:20]) + (f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else "")
    name = getattr(tokenizer, "name_or_path", None) or "the model"
    return f"{what} has characters the tokenizer of {name} does not know: {shown}"


@contextlib.contextmanager
def _naming_unknown_characters(tokenizer, text: str, what: str):
    """Turns the tokenizers library's bare `Exception` on text it cannot encode into a DataError
    naming the characters (any other failure is re-raised as it is)."""
    try:
        yield
    except DataError:
        raise
    except Exception:
        message = _unknown_message(tokenizer, text, what)
        if message is None:
            raise
        raise DataError(message) from None


def _check_no_unknown(tokenizer, ids, text: str, what: str) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        message = _unknown_message(tokenizer, text, what)
        if message is not None:
            raise DataError(message)


def render_prompt(tokenizer, prompt) -> str:
    """The text the model sees for `prompt`.

    Chat messages go through the tokenizer's chat template with the assistant header appended
    (`add_generation_prompt=True`); a tokenizer without a template (or `tokenizer=None`) joins the
    message contents with blank lines. Plain text is returned unchanged (no template).
    """
    if isinstance(prompt, str):
        return prompt
    messages = [dict(m) for m in prompt]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text; special tokens written in the text (the chat template's
    headers) are parsed as such and nothing is added. Equal to `apply_chat_template(tokenize=True)`
    on the text `render_prompt` returns. DataError names characters the tokenizer cannot encode."""
    with _naming_unknown_characters(tokenizer, text, "text"):
        return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer, extra=()) -> tuple[int, ...]:
    """EOS plus the end-of-turn tokens a chat tokenizer knows (`<|eot_id|>`, `<|im_end|>`, ...)."""
    ids: list[int] = []
    if tokenizer is not None:
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.append(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        for name in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>"):
            if name in vocab:
                ids.append(int(vocab[name]))
    ids.extend(int(i) for i in extra)
    return tuple(dict.fromkeys(ids))


def decode_completion(tokenizer, ids, stop_ids=(), *, skip_special_tokens: bool = False) -> str:
    """Text of generated `ids` up to (not including) the first of `stop_ids` (EOS, end of turn).

    With `tokenizer=None` the ids are rendered as space-separated integers: the tiny configs'
    exact-match task compares that string with its `answer`.
    """
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    stops = {int(s) for s in stop_ids}
    for n, i in enumerate(ids):
        if i in stops:
            ids = ids[:n]
            break
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
