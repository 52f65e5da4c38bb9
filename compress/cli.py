"""Command-line flags built from the dataclasses that define the settings (one definition of every default).

A field becomes `--field-name` (or `metadata["flag"]`), typed from its annotation, with `metadata["help"]`,
`metadata["choices"]`, `metadata["parse"]` (a function from the flag's text to the value), `metadata["action"]`
("append" for a list), `metadata["nargs"]` and `metadata["metavar"]` when given; a field without a default is a required flag.
Nested dataclass fields are flattened. `dataclass_from_namespace` rebuilds the dataclass, so its
`__post_init__` checks run and name the flag to fix. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag and where to look (argparse prints the
    whole usage first, which buries the one line that matters). Sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _scalar_type(annotation: Any) -> Any:
    """int | None -> int; float -> float; Path -> Path; list[str] -> str; anything else -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list) and args:
        annotation = args[0]
    return annotation if annotation in (int, float, Path) else str


def _reporting(parse):
    """Wrap a `parse` function so that argparse shows its own message (not "invalid value") on ValueError."""

    def parse_flag(text):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse_flag.__name__ = parse.__name__
    return parse_flag


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls` (recursively for nested dataclasses) to `parser`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        default = _default(field)
        if dataclasses.is_dataclass(default):
            add_dataclass_arguments(parser, type(default), skip)
            continue
        help_text = field.metadata.get("help", "")
        if hints[field.name] is bool:
            if default:
                raise TypeError(f"{cls.__name__}.{field.name}: a flag that defaults to True cannot be switched off")
            parser.add_argument(_flag(field), dest=field.name, action="store_true", help=help_text)
            continue
        kind = field.metadata.get("parse")
        kind = _reporting(kind) if kind else _scalar_type(hints[field.name])
        extra = {key: field.metadata[key] for key in ("action", "metavar", "nargs") if key in field.metadata}
        if default is dataclasses.MISSING:  # a field without a default is a required flag
            parser.add_argument(_flag(field), dest=field.name, type=kind, required=True,
                                choices=field.metadata.get("choices"), help=help_text, **extra)
            continue
        shown = ",".join(str(item) for item in default) if isinstance(default, tuple) else default
        if extra.get("action") == "append" or default in (None, []):
            suffix = ""
        else:
            suffix = f" (default: {shown})"
        parser.add_argument(
            _flag(field), dest=field.name, type=kind, default=default,
            choices=field.metadata.get("choices"), help=f"{help_text}{suffix}", **extra,
        )


def dataclass_from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """Build `cls` from parsed flags (nested dataclasses included); validation errors name the flag."""
    values = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = _default(field)
        if dataclasses.is_dataclass(default):
            values[field.name] = dataclass_from_namespace(type(default), namespace)
        elif hasattr(namespace, field.name):
            values[field.name] = getattr(namespace, field.name)
    return cls(**values)


def comma_separated(text: str) -> tuple[str, ...]:
    """'psnr, ssim' -> ('psnr', 'ssim'): the `parse` of a tuple-of-names field."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (atomic writes, temporary folders) runs on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_command(ns: argparse.Namespace, interrupted_note: str = "") -> int:
    """Run a parsed subcommand (`ns.run`): a bad input prints one line and returns 2; Ctrl-C returns 130 and
    SIGTERM 143 (the shell's 128 + signal), after the temporary files of the interrupted write are removed.

    Shared by `python -m compress`, `python -m export` and `python -m distill`, so every command answers alike."""
    import errno
    import signal
    import sys

    from compress.models.errors import ModelLoadError, TrainingDiverged  # no torch: a bad flag is reported at once

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(ns.run(ns) or 0)
    # ImageInputError and the settings checks are ValueErrors; PermissionError: an output that cannot be written
    except (ModelLoadError, ValueError, FileExistsError, FileNotFoundError, PermissionError,
            NotADirectoryError, IsADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: out of disk space ({err.strerror}); free space or choose another output folder: nothing "
                  "partially written was kept", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print(("terminated" if terminated else "interrupted") + (f": {interrupted_note}" if interrupted_note else ""),
              file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
