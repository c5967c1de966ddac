"""The one check that the training extra is installed, for the modules that need it.

``pip install sharpjax`` brings what the optimizers and the measures need; the models, data,
trainer and flax helpers need ``pip install "sharpjax[train]"``. Without this check a user
would meet a bare ``No module named 'flax'`` ten frames deep.
"""

from __future__ import annotations

import importlib.util

# import name → distribution name, for the modules the training stack imports
TRAIN_EXTRA = {
    "flax": "flax",
    "orbax.checkpoint": "orbax-checkpoint",
    "tensorflow_datasets": "tensorflow-datasets",
    "sklearn": "scikit-learn",
    "mnist1d": "mnist1d",
}


def require_train_extra(module: str, needs: tuple[str, ...]) -> None:
    """Raises ImportError naming ``module``, the missing packages and the install command."""
    missing = []
    for name in needs:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a dotted name whose parent is missing, or an import refused
            found = False
        if not found:
            missing.append(TRAIN_EXTRA.get(name, name))
    if missing:
        raise ImportError(
            f"{module} needs the training extra, which is not installed (missing: "
            f'{", ".join(missing)}). Install it with: pip install "sharpjax[train]" (from a '
            'checkout: pip install -e ".[train]"). The optimizers and the measures '
            "(sharpjax, sharpjax.sharpness) work without it."
        )
