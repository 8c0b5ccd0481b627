"""The command line: unknown flags refused, --help written out, errors users cause as one line and an exit code."""

from __future__ import annotations

import inspect
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from pretraining.errors import CheckpointError, ConfigError, NonFiniteLossError, OutOfMemory, TrainingInterrupted
from pretraining.logs import console_logging


def command_line_flags(function: Callable, shared: Callable | None = None) -> dict[str, inspect.Parameter]:
    """The flags of `function`: its own keyword parameters, then (where it takes `**flags`) those of `shared` that
    it does not declare itself."""
    own = {
        name: parameter
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }
    if shared is None:
        return own
    return own | {
        name: parameter for name, parameter in inspect.signature(shared).parameters.items() if name not in own
    }


def check_command_line(argv: list[str], function: Callable, shared: Callable | None = None) -> None:
    """Reject unknown flags and stray positional values before fire runs anything.

    fire would otherwise run the whole training first and complain about an unknown `--flag` afterwards, or bind a
    stray value to the first positional parameter.
    """
    known = set(command_line_flags(function, shared))
    expecting_value = False
    for arg in argv:
        if arg == "--":
            return
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            bare = name[2:] if name.startswith("no") and name[2:] in known else name
            if bare not in known:
                raise ConfigError(f"unknown flag --{name}; see --help for the flags")
            expecting_value = "=" not in arg and bare == name
        elif expecting_value:
            expecting_value = False
        elif arg.startswith("-"):  # fire would read "-x" as the one flag starting with x (-h as --h_dim)
            raise ConfigError(f"unknown flag {arg}: flags are spelled out in full (--name value); see --help")
        else:
            raise ConfigError(f"unexpected value {arg!r}: every setting is a --flag (see --help)")


def help_text(function: Callable, program: str, shared: Callable | None = None) -> str:
    """`--help`: the docstring's summary and description, then each flag with its type, default and meaning; then
    the flags of `shared` that `function` does not declare itself, with the meanings `shared` gives them.

    Written here rather than by fire, whose help opens a pager, names types as `Optional['str | None']` and offers
    one-letter abbreviations (-t for --tokenizer) that collide as flags are added.
    """
    import textwrap

    from fire import docstrings

    doc = docstrings.parse(inspect.getdoc(function))
    meanings = {arg.name: arg.description for arg in doc.args or []}
    own = command_line_flags(function)
    sections = [("Flags:", own)]
    if shared is not None:
        meanings = {arg.name: arg.description for arg in docstrings.parse(inspect.getdoc(shared)).args} | meanings
        sections.append(
            (
                f"Flags of {shared.__module__}.py, the same here:",
                {name: parameter for name, parameter in command_line_flags(shared).items() if name not in own},
            )
        )
    lines = [f"{program}: {doc.summary}", "", doc.description or ""]
    for heading, flags in sections:
        lines += ["", heading]
        for name, parameter in flags.items():
            # The annotation as written: a string under `from __future__ import annotations`.
            default = "required" if parameter.default is inspect.Parameter.empty else f"default: {parameter.default!r}"
            lines.append(f"  --{name} {parameter.annotation}  ({default})")
            lines += textwrap.wrap(meanings.get(name, ""), width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def main(function: Callable, shared: Callable | None = None) -> None:
    """Run `function` (a script's train) as a fire CLI; turn the errors users cause into one line and an exit code.

    `shared`: where `function` takes `**flags`, the function whose flags those are (train_bert_ds.py's `train`
    takes every flag of train_bert.py's)."""
    import fire

    console_logging()  # the lines before an experiment's logs start (data preparation) look like the rest
    arguments = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in arguments[: arguments.index("--") if "--" in arguments else None]):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head` ends quietly
        print(help_text(function, f"python {Path(sys.argv[0]).name}", shared))
        return
    # Under a launcher every rank runs this. Errors that all ranks share (a bad flag, a stop they agreed on) are
    # printed by rank 0 alone; errors only one rank knows (its save failed, its peer died) by that rank.
    other_rank = os.environ.get("RANK", "0") != "0"

    def report(message: str, shared: bool, exit_code: int) -> None:
        if not (shared and other_rank):
            print(message, file=sys.stderr)
        sys.exit(exit_code)

    try:
        check_command_line(arguments, function, shared)
        fire.Fire(function)
    except ConfigError as error:
        report(f"error: {error}", shared=True, exit_code=2)
    except NonFiniteLossError as error:
        report(f"error: {error}", shared=True, exit_code=1)
    except (CheckpointError, OutOfMemory) as error:
        report(f"error: {error}", shared=False, exit_code=1)
    except TrainingInterrupted as error:
        report(str(error), shared=True, exit_code=128 + error.signum)
    except KeyboardInterrupt:  # a second Ctrl-C
        report(
            "error: interrupted by Ctrl-C without saving; a run resumes from its last checkpoint with "
            "--load_checkpoint_dir EXPERIMENT_DIR",
            shared=True,
            exit_code=128 + signal.SIGINT,
        )
