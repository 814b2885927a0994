"""Model paths that name a Hugging Face hub repository: `GSAI-ML/LLaDA-8B-Instruct` -> a local directory.

Every model path (the policy's `model.path`, the teacher's `rewards.teacher_path`, a tokenizer's
`data.tokenizer`, the launchers' `--model`) goes through `resolve_model_dir`:

- an existing local file or directory is returned as it is;
- a path that looks local (starts with `/`, `.` or `~`, or whose first component exists here, as
  `runs/` in `runs/typo`) but is missing is a `ConfigError` naming the key; the hub is never asked;
- anything else of the form `ORG/NAME` or `ORG/NAME@REVISION` is a hub id, resolved by
  `huggingface_hub.snapshot_download` to a snapshot directory of the HF cache (`HF_HUB_CACHE`,
  else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). With `HF_HUB_OFFLINE=1` only the cache is
  read; otherwise the hub is asked first and the missing files are downloaded (only the files a
  model directory needs: `MODEL_FILE_PATTERNS`, not a repository's duplicate `.bin` weights).

Resolving is cheap once the snapshot is cached (no weights are read), and an already resolved
directory resolves to itself, so each layer that reads a model directory may resolve again.
"""

from __future__ import annotations

import logging
import os
import re

from dultra_jax.errors import ConfigError

log = logging.getLogger(__name__)

# What a model directory needs: config, weights, tokenizer, chat template and the remote-code files
# that an export carries along.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py")

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` forbids network access (read at each call, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str:
    """The HF hub cache this process reads: `HF_HUB_CACHE`, else `HF_HOME/hub`, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "huggingface", "hub")


def parse_hub_id(path: str) -> tuple[str, str | None] | None:
    """`(repo_id, revision)` of a hub id `ORG/NAME[@REVISION]`, or None when `path` is not one or
    looks local (module doc)."""
    if not path or path.startswith(("/", ".", "~")) or os.path.exists(path.split("/", 1)[0]):
        return None
    match = _HUB_ID.fullmatch(path)
    if match is None or ".." in match.group("repo"):
        return None
    return match.group("repo"), match.group("revision")


def resolve_model_dir(path: str, key: str) -> str:
    """The local path of a model `path` (module doc); `key` names it in errors (`model.path`,
    `rewards.teacher_path`, `model`).

    Raises:
      ConfigError `KEY='PATH': ...` for a missing local path, an id the cache does not hold
      (offline), or an id the hub does not know or cannot serve (online).
    """
    path = str(path)
    if os.path.exists(path):
        return path
    parsed = parse_hub_id(path)
    if parsed is None:
        raise ConfigError(f"{key}={path!r}: no such file or directory")
    repo_id, revision = parsed
    offline = hub_offline()
    cache = hub_cache_dir()
    where = f"the Hugging Face cache ({cache}" + (", HF_HUB_OFFLINE=1)" if offline else ")")
    try:
        import huggingface_hub
        from huggingface_hub import utils as hub_errors  # where every version since 0.2x exports them
    except ImportError:  # pragma: no cover - an install requirement
        raise ConfigError(f"{key}={path!r} is not a directory, and resolving it as a hub id needs "
                          f"`huggingface_hub` (pip install huggingface_hub)") from None
    try:  # newer versions tell an interrupted download apart; older ones leave it to reading the files
        from huggingface_hub.errors import IncompleteSnapshotError as incomplete
    except ImportError:
        incomplete = hub_errors.LocalEntryNotFoundError
    try:
        directory = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                      local_files_only=offline,
                                                      allow_patterns=list(MODEL_FILE_PATTERNS))
    except (hub_errors.LocalEntryNotFoundError, incomplete) as e:
        at = f" at revision {revision!r}" if revision else ""
        cause = e.__cause__
        if isinstance(e, incomplete):  # an interrupted download
            reason = _first_line(e)
        elif offline:
            reason = (f"not cached{at}; download it where the hub is reachable (hf download {repo_id}"
                      f"{f' --revision {revision}' if revision else ''})")
        elif cause is not None:
            reason = f"not cached{at}, and the hub cannot be reached ({type(cause).__name__}: {_first_line(cause)})"
        else:
            reason = _first_line(e)
        raise ConfigError(f"{key}={path!r} is neither a directory nor in {where}: {reason}") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError) as e:
        raise ConfigError(f"{key}={path!r} is neither a directory nor a hub repository this machine can read "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError) as e:
        raise ConfigError(f"{key}={path!r}: cannot resolve the hub id ({type(e).__name__}: {_first_line(e)})") \
            from None
    log.info("%s=%s -> %s", key, path, directory)
    return str(directory)


def resolve_optional(path: str | None, key: str) -> str | None:
    """`resolve_model_dir` for an optional setting: None (or empty) stays None."""
    return resolve_model_dir(path, key) if path else None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
