"""Training: one loop for every sharpjax optimizer, its config, checkpoints and metrics.

Example::

    from sharpjax.train import TrainConfig, train
    result = train(TrainConfig(dataset="digits", model="mlp", optimizer="sam", epochs=5,
                               workdir="/tmp/run"))
    result.final["test_accuracy"]

From the command line: ``config = config_from_args(sys.argv[1:])``.
"""

from sharpjax._extras import require_train_extra

require_train_extra("sharpjax.train", ("flax", "orbax.checkpoint"))

from sharpjax.train.config import (
    OPTIMIZERS,
    TrainConfig,
    config_from_args,
    learning_rate_schedule,
    make_optimizer,
)
from sharpjax.train.loop import TrainResult, init_model, train

__all__ = [
    "OPTIMIZERS",
    "TrainConfig",
    "TrainResult",
    "config_from_args",
    "init_model",
    "learning_rate_schedule",
    "make_optimizer",
    "train",
]
