"""The launchers' one wrapper: flags in, one library call, a user's mistake out as one line.

    _DISTRIBUTED = distributed.define_launcher_flags()

    def main() -> None:
        train(_CONFIG.value, _WORKDIR.value)

    if __name__ == "__main__":
        cli.run(main, distributed_flags=_DISTRIBUTED)

`run` parses the flags (absl), sets up logging (absl's handler; Orbax's per-file INFO lines
dropped), joins `jax.distributed` from the launcher's multi-process flags when it has them, and
calls `main()`. Every mistake a user can make ends the program with one line on stderr,
`NAME.py: error: MESSAGE`, and exit status 2 (argparse's convention), without a traceback:

- a `dultra_jax.errors.UserError` raised by the library (a config key, a file, a prompt, ...);
- a malformed, unknown or missing flag (absl's flag errors);
- a config file that does not load, and an override of a config key that does not exist
  (`--config.optim.learning_rat=0.1`: ml_collections raises an AttributeError while parsing
  the flags; the message names the override and ml_collections' close match).

Anything else is a bug and keeps its traceback.

Launchers driven by flags rather than a config file (sample, evaluate, score, export) name their
flags in errors: `run(..., flag_names={...})` maps what the library calls a value to the flag
that sets it (`name_flags`). An argument name (no dot: `model`, `out_dir`) that leads a message,
as `model: ...` or `data=VALUE: ...`, or that a message quotes in backquotes (`` `overwrite=True` ``),
is replaced by its flag (`--model: ...`, `--data=VALUE: ...`, `--overwrite`); a config field (a
key with a dot, `decode.gen_length`) that a message mentions keeps its name and puts its flag in
front (`--gen_length: decode.gen_length=30 is not a multiple of ...`).

Flag types the launchers share: `DEFINE_number_list` (a comma-separated list of ints or floats,
checked while parsing) and `DEFINE_key_values` (repeatable `KEY=VALUE`, the value read as JSON
when it parses).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag  # public, not re-exported

from dultra_jax import distributed
from dultra_jax.config import CACHE_MODES, CACHE_REFRESHES
from dultra_jax.checkpoint import quiet_orbax_logs
from dultra_jax.errors import UserError

EXIT_USER_ERROR = 2


def program_name() -> str:
    """The launcher's file name (`train.py`), as its error lines start."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "dultra_jax"


def fail(message: str) -> NoReturn:
    """Ends the program: `NAME.py: error: MESSAGE` (one line) on stderr, exit status 2."""
    one_line = re.sub(r"\s*\n\s*", " ", str(message)).strip()
    sys.stderr.write(f"{program_name()}: error: {one_line}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[], Any], *, distributed_flags: distributed.LauncherFlags | None = None,
        flag_names: Mapping[str, str] | None = None) -> None:
    """Parses the flags and runs `main()` as the module doc describes; never returns."""

    def run_main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected argument(s) {' '.join(argv[1:])} (every input is a --flag; quote values with spaces)")
        quiet_orbax_logs()
        absl_logging.get_absl_handler().setFormatter(ShortFormatter())
        try:
            _check_config_files()
            if distributed_flags is not None:
                # Before anything touches a JAX backend: the devices of all processes form the mesh.
                distributed.initialize_from_flags(distributed_flags)
            main()
        except UserError as e:
            fail(name_flags(str(e), flag_names or {}))

    app.run(run_main, flags_parser=_parse_flags)


class ShortFormatter(logging.Formatter):
    """Log lines as `HH:MM:SS message` (`HH:MM:SS WARNING message` from warnings up), in place of
    absl's 60-character prefix of level, date, thread and file: a progress line stays readable."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp, _, message = line.partition(" ")
            line = f"{stamp} {record.levelname} {message}"
        return line


# ------------------------------------------------------------------------------ flag parsing


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parse, with every error one line (`fail`) instead of absl's usage text or a traceback."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        fail(_first_and_last_line(str(e)))
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        message = config_override_error(e, argv)
        if message is None:
            raise
        fail(message)
    except SyntaxError as e:  # a config file that is not Python
        fail(f"config file {e.filename}, line {e.lineno}: {e.msg}")
    except OSError as e:  # a config file that cannot be read, with overrides of its keys
        fail(f"cannot load the config file: {str(e).strip().splitlines()[-1].strip()}")


def _first_and_last_line(message: str) -> str:
    """One line of a multi-line message: absl reports an exception in a config file's
    `get_config` with the whole traceback in it, of which the first line (the flag) and the last
    (the exception) tell the story."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[-1:]) if len(lines) > 2 else " ".join(lines)


def config_override_error(error: BaseException, argv: Sequence[str],
                          flag_values: flags.FlagValues | None = None) -> str | None:
    """The one-line message for ml_collections' error on an override of a missing config key, or
    None when `error` is not one.

    ml_collections raises `AttributeError(KeyError("'learning_rat'\\nDid you mean
    \"learning_rate\" instead of \"learning_rat\"?"))` (or the KeyError itself) without naming
    the override; the override is the first `--<config flag>.PATH` of `argv` whose PATH holds the
    key.
    """
    text = error.args[0] if error.args else ""
    if isinstance(text, KeyError):
        text = text.args[0] if text.args else ""
    match = re.fullmatch(r"""'(?P<key>[^']+)'(?:\s*Did you mean "(?P<close>[^"]+)" instead of "[^"]*"\?)?""",
                         str(text).strip())
    if match is None:
        return None
    key, close = match.group("key"), match.group("close")
    flag_values = flags.FLAGS if flag_values is None else flag_values
    for arg in argv[1:]:
        flag, _, path = arg[2:].partition("=")[0].partition(".")
        if (arg.startswith("--") and path and flag in flag_values
                and is_config_flag(flag_values[flag]) and key in path.split(".")):
            where = path.split(".")[:path.split(".").index(key)]
            message = f"{arg}: the config has no key {'.'.join([*where, key])}"
            return message + (f"; did you mean {'.'.join([*where, close])}?" if close else "")
    return f"a config override names a key the config lacks, {key!r}" + (f"; did you mean {close!r}?" if close
                                                                         else "")


def _check_config_files() -> None:
    """ml_collections defers the error of a config file that cannot be read until the config's
    first use: raise it here, naming the flag, rather than from inside the library."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if not (is_config_flag(flag) and flag.present and flag.value is not None):
            continue
        try:
            getattr(flag.value, "keys", None)
        except OSError as e:
            path = config_flags.get_config_filename(flag)
            reason = "no such file" if not os.path.isfile(path) else _first_and_last_line(str(e))
            fail(f"--{name}={path}: cannot load the config file: {reason}")


# ------------------------------------------------------------------------------ flag names


def name_flags(message: str, flag_names: Mapping[str, str]) -> str:
    """`message` with the flags behind the names in it (module doc): an argument name quoted in
    backquotes (`` `overwrite=True` ``) or leading the message (`model: `, `data=PATH: `) becomes its
    flag, and the flags of the config fields it mentions (`decode.gen_length`) go in front."""
    def quoted(match: re.Match) -> str:
        name, value = match.group(1), match.group(3)
        if name not in flag_names:
            return match.group(0)
        flag = flag_names[name]
        if value in (None, "True"):
            return flag
        return f"--no{flag[2:]}" if value == "False" else f"{flag}={value}"

    message = re.sub(r"`([A-Za-z_]\w*)(=([^`]*))?`", quoted, message)
    lead = re.match(r"^(?P<names>[A-Za-z_]\w*(?: / [A-Za-z_]\w*)*)(?P<sep>: |=)", message)
    if lead and all(n in flag_names for n in lead.group("names").split(" / ")):
        names = " / ".join(flag_names[n] for n in lead.group("names").split(" / "))
        return names + message[len(lead.group("names")):]
    if message.startswith("--"):
        return message
    found = [(match.start(), flag) for field, flag in flag_names.items() if "." in field
             for match in [re.search(rf"(?<![\w.]){re.escape(field)}(?!\w)", message)] if match]
    mentioned = list(dict.fromkeys(flag for _, flag in sorted(found)))  # in the message's order
    return f"{' / '.join(mentioned)}: {message}" if mentioned else message


def decode_flag_names(*fields: str, **renamed: str) -> dict[str, str]:
    """`{"decode.F": "--F"}` for each of `fields`, plus `{"decode.F": "--FLAG"}` for `F=FLAG`."""
    names = {f"decode.{field}": f"--{field}" for field in fields}
    names.update({f"decode.{field}": f"--{flag}" for field, flag in renamed.items()})
    return names


# ------------------------------------------------------------------------------ flag types


class _NumberListParser(flags.ListParser):
    def __init__(self, kind: type):
        super().__init__()
        self.kind = kind

    def parse(self, argument):
        values = super().parse(argument)
        try:
            return [self.kind(v) for v in values]
        except ValueError:
            raise ValueError(f"not a comma-separated list of {self.kind.__name__} values") from None

    def flag_type(self) -> str:
        return f"comma-separated list of {self.kind.__name__}"


def _launcher_module() -> str:
    """The module that called a `DEFINE_*` helper of this file, named as absl names the module
    whose flags `--help` lists (the script's path for `__main__`): its flags are the launcher's."""
    name = sys._getframe(2).f_globals.get("__name__", "")
    return sys.argv[0] if name == "__main__" else name


def DEFINE_cache_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:  # noqa: N802
    """`--cache` and `--cache_refresh` (`decode.cache`, `decode.cache_refresh`) of the decoding
    launchers."""
    module = _launcher_module()
    cache = flags.DEFINE_enum("cache", "none", list(CACHE_MODES), "Block KV cache (none is exact; prefix / dual "
                              "reuse keys/values within a block, Fast-dLLM).", module_name=module)
    refresh = flags.DEFINE_enum("cache_refresh", "auto", list(CACHE_REFRESHES),
                                "How a cache is refreshed at a new block: full forward (Fast-dLLM), blocks "
                                "(the new and the finished block only; cheaper, a further approximation) or "
                                "auto (blocks under the planner rules, full under the others).",
                                module_name=module)
    return cache, refresh


def DEFINE_number_list(name: str, default: Sequence[float | int] | None, help: str, kind: type = float,  # noqa: N802
                       **kwargs) -> flags.FlagHolder:
    """A comma-separated list of `kind` (int or float) values, checked while the flags are parsed."""
    return flags.DEFINE(_NumberListParser(kind), name, None if default is None else list(default), help,
                        serializer=flags.CsvListSerializer(","), module_name=_launcher_module(), **kwargs)


class _KeyValueParser(flags.ArgumentParser):
    def parse(self, argument):
        if isinstance(argument, tuple):
            return argument
        key, sep, value = str(argument).partition("=")
        if not sep or not key:
            raise ValueError("expected KEY=VALUE")
        try:
            return key, json.loads(value)
        except ValueError:
            return key, value

    def flag_type(self) -> str:
        return "KEY=VALUE"


class _KeyValueSerializer(flags.ArgumentSerializer):
    def serialize(self, value):
        if isinstance(value, list):
            return ",".join(self.serialize(v) for v in value)
        key, item = value
        return f"{key}={item if isinstance(item, str) else json.dumps(item)}"


def DEFINE_key_values(name: str, help: str, **kwargs) -> flags.FlagHolder:  # noqa: N802
    """A repeatable `--NAME=KEY=VALUE` flag; its value is a list of `(key, value)` pairs, each value
    read as JSON when it parses (`split=test` -> "test", `n=3` -> 3)."""
    return flags.DEFINE_multi(_KeyValueParser(), _KeyValueSerializer(), name, [], help,
                              module_name=_launcher_module(), **kwargs)
