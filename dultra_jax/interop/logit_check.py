"""Logit checker: raw policy outputs on given token ids, for parity checks against PyTorch.

MaxText's lesson for checkpoint conversion: the acceptance test is the logits. `score_tokens` runs
one policy evaluation (backbone + planner) on a fixed `[B, L]` batch of token ids and returns the
*raw* token logits (the `[MASK]` logit is not suppressed) and, with a planner, the unmask logits
for candidates = every position that holds the mask id, with the planner's `t` computed from the
canvas as in docs/algorithm.md section 1.2 (`policy.policy_apply` does both). `read_tokens` reads and validates the
JSON token file that `launch/score.py` takes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dultra_jax.config import ModelConfig
from dultra_jax.errors import TokensError  # re-exported; errors.py holds every user error
from dultra_jax.models import policy

log = logging.getLogger(__name__)


def read_token_lists(source: str) -> list[list[int]]:
    """Reads a non-empty list of non-empty token-id lists (rows may differ in length) from a JSON
    file, or from inline JSON when `source` starts with `[` (`'[[9, 12, 7]]'`). Raises
    `TokensError` naming the file (or "inline JSON") and the offending row or (row, position)."""
    if source.lstrip().startswith("["):
        try:
            rows = json.loads(source)
        except json.JSONDecodeError as e:
            raise TokensError(f"inline JSON {source!r} is not valid JSON: {e}") from None
        return check_token_lists(rows, "inline JSON")
    try:
        with open(source) as f:
            rows = json.load(f)
    except OSError as e:
        raise TokensError(f"cannot read token file {source}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise TokensError(f"token file {source} is not valid JSON: {e}") from None
    return check_token_lists(rows, f"token file {source}")


def _describe(source: str) -> str:
    return "inline JSON" if source.lstrip().startswith("[") else f"token file {source}"


def check_token_lists(rows, source: str) -> list[list[int]]:
    """Validates decoded JSON as a non-empty list of non-empty integer lists; `source` names it."""
    if not isinstance(rows, list) or not rows:
        raise TokensError(f"{source} must hold a non-empty list of token-id lists")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise TokensError(f"{source}: row {i} is not a non-empty list of token ids")
        for j, token in enumerate(row):
            if isinstance(token, bool) or not isinstance(token, int):
                raise TokensError(f"{source}: row {i}, position {j}: {token!r} is not an integer token id")
    return rows


def read_tokens(source: str, vocab_size: int | None = None) -> np.ndarray:
    """Reads a JSON list of equal-length token-id lists into an `[B, L]` int32 array.

    Args:
      source: the JSON file, or inline JSON (`read_token_lists`).
      vocab_size: when given, every id must lie in `[0, vocab_size)`.
    Raises:
      TokensError naming `source` and the offending row (index and length) or id (row, position).
    """
    rows = read_token_lists(source)
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise TokensError(f"{_describe(source)}: row {i} has length {len(row)}, but row 0 has length "
                              f"{len(rows[0])}; all rows must have the same length")
    tokens = np.asarray(rows, dtype=np.int64)
    if vocab_size is not None:
        check_token_range(tokens, vocab_size, source=_describe(source))
    return tokens.astype(np.int32)


def check_token_range(tokens: np.ndarray, vocab_size: int, source: str = "tokens") -> None:
    """Raises `TokensError` naming the first id outside `[0, vocab_size)` and where it is."""
    bad = np.argwhere((tokens < 0) | (tokens >= vocab_size))
    if len(bad):
        i, j = (int(x) for x in bad[0])
        raise TokensError(f"{source}: row {i}, position {j}: token id {int(tokens[i, j])} is outside the "
                          f"vocabulary [0, {vocab_size}) ({len(bad)} such id(s) in all)")


@functools.partial(jax.jit, static_argnums=(2,))
def _score(params, tokens: jax.Array, config: ModelConfig) -> dict[str, jax.Array]:
    token_logits, unmask_logits = policy.policy_apply(params, tokens, config, suppress_mask=False)
    out = {"token_logits": token_logits.astype(jnp.float32)}
    if unmask_logits is not None:
        out["unmask_logits"] = unmask_logits.astype(jnp.float32)
    return out


def score_tokens(params, config: ModelConfig, tokens, *, batch_size: int | None = None,
                 precision: str | None = "highest") -> dict[str, np.ndarray]:
    """Raw policy outputs on `tokens`, as host numpy arrays.

    Args:
      params: the parameter pytree (any sharding).
      tokens: `[B, L]` integer token ids in `[0, V)`; positions equal to `config.mask_token_id`
        are the planner's candidates and count toward its `t`.
      batch_size: rows per forward pass (the last chunk is padded, so one compile); None does
        all rows at once.
      precision: `jax.default_matmul_precision` for the forward ("highest" keeps f32 matmuls in
        f32 on TPU, which a parity check wants); None keeps the ambient setting.
    Returns:
      `{"tokens": [B, L] int32, "token_logits": [B, L, V] float32}` (raw logits: the `[MASK]`
      logit is kept) plus `"unmask_logits": [B, L] float32` when the model has a planner.
    Raises:
      TokensError if `tokens` is not 2-D or holds an id outside `[0, V)`.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0:
        raise TokensError(f"tokens must be a non-empty [B, L] array, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TokensError(f"tokens must be integers, got dtype {tokens.dtype}")
    check_token_range(tokens, config.vocab_size)
    tokens = tokens.astype(np.int32)
    if tokens.shape[1] > config.max_sequence_length:
        log.warning("scoring length %d exceeds the model's max_sequence_length %d", tokens.shape[1],
                    config.max_sequence_length)
    rows = tokens.shape[0]
    chunk = rows if batch_size is None else max(1, min(int(batch_size), rows))
    pieces: list[dict[str, np.ndarray]] = []
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        for start in range(0, rows, chunk):
            part = tokens[start:start + chunk]
            n = part.shape[0]
            if n < chunk:  # pad with copies of the first row: same shape, no recompile
                part = np.concatenate([part, np.repeat(part[:1], chunk - n, axis=0)])
            out = jax.device_get(_score(params, jnp.asarray(part), config))
            pieces.append({k: np.asarray(v)[:n] for k, v in out.items()})
    result = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    result["tokens"] = tokens
    return result


def summarize(scores: dict[str, np.ndarray], config: ModelConfig | None = None) -> str:
    """A one-line summary of `score_tokens` output (shapes, statistics, finite check)."""
    logits = scores["token_logits"]
    parts = [f"scored {logits.shape[0]} rows x {logits.shape[1]} tokens, V={logits.shape[2]}",
             f"token_logits mean={float(np.mean(logits)):.6g} std={float(np.std(logits)):.6g} "
             f"finite={bool(np.all(np.isfinite(logits)))}",
             f"argmax[0,:8]={np.argmax(logits[0], axis=-1)[:8].tolist()}"]
    if "unmask_logits" in scores:
        unmask = scores["unmask_logits"]
        tokens = scores.get("tokens")
        if tokens is not None and config is not None:
            candidates = tokens == config.mask_token_id
            n = int(candidates.sum())
            mean = float(unmask[candidates].mean()) if n else float("nan")
            parts.append(f"unmask_logits over {n} masked position(s) mean={mean:.6g}")
        else:
            parts.append(f"unmask_logits mean={float(np.mean(unmask)):.6g}")
    else:
        parts.append("no planner")
    return "; ".join(parts)


def save_scores(path: str, scores: dict[str, Any]) -> str:
    """Writes `scores` to an `.npz` file (uncompressed) and returns the path written."""
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in scores.items()})
    return path
