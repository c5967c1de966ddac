"""Command line: ``python -m sharpjax.train --dataset=digits --optimizer=sam ...``.

Every :class:`~sharpjax.train.TrainConfig` field is a ``--key=value`` option
(:func:`~sharpjax.train.config.build_parser`); ``--help`` lists them with their meaning and
default. User errors print one message and exit with status 2; messages name options as
``--overwrite``, not ``overwrite=True``. To resume an interrupted run, run the same command with
the same ``--workdir`` again.
"""

from __future__ import annotations

import json
import os
import sys

from sharpjax.data import DatasetNotPreparedError
from sharpjax.train.checkpoint import CheckpointError, WorkdirInUseError
from sharpjax.train.config import CLI_PROG, OPTION_STYLE, build_parser, config_from_args
from sharpjax.train.loop import train

# What a person can fix from the message alone: a bad option or value, a dataset that is not
# prepared, a workdir that is incompatible, finished, in use or not writable, checkpoints that
# cannot be restored or written. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    TypeError,
    DatasetNotPreparedError,
    OSError,
    CheckpointError,
    WorkdirInUseError,
)


def _fail(error: BaseException) -> int:
    if os.environ.get("SHARPJAX_TRACEBACK"):
        raise error
    print(f"{CLI_PROG}: error: {error}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """Runs the command line ``argv`` (without the program name); returns the exit status."""
    token = OPTION_STYLE.set("cli")  # messages say --overwrite, not overwrite=True
    try:
        return _main(argv)
    finally:
        OPTION_STYLE.reset(token)


def _main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        build_parser().print_help()
        return 0
    try:
        config = config_from_args(argv)
    except (ValueError, TypeError) as e:
        return _fail(e)

    try:
        result = train(config)
    except USER_ERRORS as e:
        return _fail(e)
    except KeyboardInterrupt:
        if os.environ.get("SHARPJAX_TRACEBACK"):
            raise
        saved = (
            "To resume, run the same command again: it continues from the newest checkpoint "
            "(--checkpoint_every=N saves one every N epochs)."
            if config.workdir
            else "Nothing was saved (no --workdir)."
        )
        print(f"\n{CLI_PROG}: interrupted. {saved}", file=sys.stderr)
        return 130  # the shell's status for SIGINT
    print(json.dumps(result.final, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
