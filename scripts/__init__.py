"""Custom components of the SAM2-LoRA fundus bundle, referenced from the bundle configs as ``scripts.<module>.<Name>``.

What the bundle runs, and only that: the exported archive ships this package. Offline tools (dataset preparation,
baseline, benchmark, archive and deployable exports) live in ``tools``.
"""

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    # MONAI's "$from scripts import inputs" looks submodules up as attributes of the package; importing them
    # lazily here keeps `python -m scripts.<module>` free of runpy's double-import warning.
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
