"""``mlflow.pytorch`` without its PyTorch Lightning autolog hook.

When Lightning is installed (``lightly``, in the ``bench`` extra, pulls it in), ``import mlflow.pytorch``
also imports Lightning, torchmetrics and torchvision to register an autolog callback this project never
uses: about 5 s of start-up in every process that logs or loads a model (measured in
``benchmarks/pipeline_overhead.py``'s stage start-up). Hiding Lightning for that one import makes MLflow take
its own "Lightning is not installed" path.
"""
from __future__ import annotations

import sys
from types import ModuleType

_LIGHTNING = ("pytorch_lightning", "lightning")


def import_mlflow_pytorch() -> ModuleType:
    """``mlflow.pytorch``, imported (once) without Lightning; later imports of Lightning are unaffected."""
    if "mlflow.pytorch" in sys.modules:
        return sys.modules["mlflow.pytorch"]
    hidden = {name: sys.modules.get(name) for name in _LIGHTNING}
    for name in _LIGHTNING:
        if hidden[name] is None:
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ImportError
    try:
        import mlflow.pytorch
    finally:
        for name, module in hidden.items():
            if module is None:
                sys.modules.pop(name, None)
    return mlflow.pytorch
