"""What every entry point shares: a user mistake is one line on stderr, exit status 2.

    from lctx.cli import UsageError, run_main

    def main(argv=None) -> int:
        ...
        raise UsageError(f"--lengths={text}: expected comma-separated ints")

    if __name__ == "__main__":
        run_main(main, prog="lctx.eval")          # argparse, or no flags at all
        # absl: run_absl(main, prog="lctx.train")

Each line is `<prog>: error: <problem>`, where the problem names the flag or config
key, the value and what is allowed. Nothing here imports lctx, so any layer (a
library function that checks a user-given path, say) may raise UsageError.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import re
import sys
from typing import Any, Callable, Iterable, NoReturn

from absl import app, flags

EXIT_USAGE = 2
# Besides UsageError, what run_main reports as the user's mistake by default: a path
# they gave that does not exist, a file of theirs that is not JSON. Anything else
# keeps its traceback.
USER_ERRORS = (FileNotFoundError, json.JSONDecodeError)
_HELP = {"-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml"}


class UsageError(ValueError):
    """One or more user mistakes, one line each (newlines inside a problem are folded)."""

    def __init__(self, *problems: str):
        self.problems = tuple(one_line(p) for p in problems if one_line(p)) or ("invalid input",)
        super().__init__("\n".join(self.problems))


def one_line(text: Any) -> str:
    """`text` with its lines stripped and joined by "; " (exception messages often span lines)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def cause(err: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters (storage libraries put
    whole specs into theirs)."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" (did you mean a, b?)" for the nearest of `known`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _problems_of(err: BaseException) -> tuple[str, ...]:
    if isinstance(err, UsageError):
        return err.problems
    if isinstance(err, FileNotFoundError) and err.filename:
        return (f"{err.filename}: no such file or directory",)
    if isinstance(err, json.JSONDecodeError):
        return (f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})",)
    return (one_line(err) or type(err).__name__,)


def report(prog: str, problems: Iterable[str]) -> NoReturn:
    """Prints each problem as `<prog>: error: <problem>` and exits with status 2."""
    sys.stdout.flush()
    for problem in problems:
        print(f"{prog}: error: {problem}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run_main(main: Callable[[], Any], *, prog: str,
             expected: tuple[type[BaseException], ...] = USER_ERRORS) -> NoReturn:
    """Exits with `main()`'s status; UsageError and `expected` errors become one line each, status 2."""
    try:
        status = main()
    except (UsageError, *expected) as err:
        report(prog, _problems_of(err))
    sys.exit(status or 0)


def run_absl(main: Callable[[list[str]], Any], *, prog: str,
             check_argv: Callable[[list[str]], None] | None = None,
             expected: tuple[type[BaseException], ...] = USER_ERRORS) -> NoReturn:
    """`absl.app.run(main)` where flag errors (unknown flag, bad value) are one line too.

    `check_argv(argv)` runs first and may raise UsageError, e.g. `check_config_argv`.
    """
    def parse(argv: list[str]) -> list[str]:
        if check_argv is not None and not _HELP.intersection(argv):
            check_argv(argv)
        try:
            return flags.FLAGS(argv)
        except flags.Error as err:  # "flag --x=v: reason" -> "--x=v: reason"
            raise UsageError(re.sub(r"^flag (--)", r"\1", one_line(err))) from None

    run_main(lambda: app.run(main, flags_parser=parse), prog=prog, expected=expected)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line) instead of printing usage; its
    subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def ints(text: str) -> tuple[int, ...]:
    """argparse type: "256,512" -> (256, 512)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated ints") from None


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int >= 1")
    return value


# ----------------------------------------------------------------------------- config files


def load_config_file(flag: str, spec: str) -> Any:
    """`get_config()` of a recipe file given as `--<flag>=path[:argument]`; UsageError if it
    is missing or fails to load."""
    path, *args = spec.split(":", 1)
    if not os.path.isfile(path):
        raise UsageError(f"--{flag}={spec}: no such file; expected a recipe like "
                         "configs/<name>.py defining get_config()")
    try:
        module_spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(*args)
    except Exception as err:  # the user's file: whatever it raises is reported, in one line
        raise UsageError(f"--{flag}={spec}: could not load the recipe "
                         f"({type(err).__name__}: {one_line(err)})") from None


def config_keys(config: Any, prefix: str = "") -> dict[str, type]:
    """Every dotted key of a ConfigDict (groups and leaves) -> its declared type."""
    keys = {}
    for key, value in config.items():
        keys[prefix + key] = config.get_type(key)
        if hasattr(value, "get_type"):  # a nested ConfigDict
            keys.update(config_keys(value, f"{prefix}{key}."))
    return keys


def _nearest_keys(key: str, keys: Iterable[str]) -> str:
    """The close matches of an unknown dotted key, else the keys its known parent has."""
    hint = did_you_mean(key, keys)
    parent = key.rpartition(".")[0]
    children = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
    if hint or not children:
        return hint
    return f"; {parent or 'top-level'} keys: {', '.join(children)}"


def _override_problem(flag: str, key: str, value: str | None, keys: dict[str, type]) -> str | None:
    """Why `--<flag>.<key>=<value>` cannot apply to a config with `keys`, or None."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if keys.get(parent) is dict:  # a dict placeholder, None until the recipe sets it
            return (f"--{flag}.{key}: {parent} is None in the recipe; set it there (a dict) "
                    "to override its entries")
    if key not in keys:
        return f"--{flag}.{key}: unknown config key{_nearest_keys(key, keys)}"
    parser, expected = {bool: (flags.BooleanParser(), "true or false"),
                        int: (flags.IntegerParser(), "an int"),
                        float: (flags.FloatParser(), "a number")}.get(keys[key], (None, ""))
    if parser is None or value is None:
        return None
    try:
        parser.parse(value)
    except ValueError:
        return f"--{flag}.{key}={value}: expected {expected}"
    return None


def check_config_argv(argv: list[str], flag: str = "config") -> None:
    """Checks `--<flag>=recipe.py` and its `--<flag>.a.b=value` overrides before absl's
    config_flags sees them (it answers an unknown key with a traceback): UsageError on
    a missing or broken recipe, an unknown key (with the nearest known ones) or a value
    of the wrong type."""
    spec, overrides = None, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name == f"--{flag}":
            spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        elif name.startswith(f"--{flag}."):
            overrides.append((name[len(flag) + 3:], value if eq else None))
    if spec is None:
        raise UsageError(f"--{flag}: required; give a recipe, e.g. --{flag}=configs/tiny.py")
    keys = config_keys(load_config_file(flag, spec))
    problems = [p for key, value in overrides
                if (p := _override_problem(flag, key, value, keys)) is not None]
    if problems:
        raise UsageError(*problems)
