"""Command line: ``python -m sharpjax.train --dataset=cifar10 --optimizer=sam ...``.

Every :class:`~sharpjax.train.TrainConfig` field is a ``--key=value`` option; ``--help`` lists
them with their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from sharpjax.train.config import TrainConfig, config_from_args
from sharpjax.train.loop import train


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        for field in dataclasses.fields(TrainConfig):
            default = field.default if field.default is not dataclasses.MISSING else {}
            print(f"  --{field.name}={json.dumps(default)}")
        return 0
    result = train(config_from_args(argv))
    print(json.dumps(result.final, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
