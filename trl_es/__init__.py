"""trl_es: evolution strategies for TRL. ``ESTrainer`` is a drop-in replacement for ``trl.GRPOTrainer``.

The TRL-facing classes are imported lazily so that ``import trl_es.core`` (the pure-torch ES math) never loads
transformers or trl.
"""

__version__ = "0.1.0"
__all__ = ["ESConfig", "ESTrainer", "__version__"]


def __getattr__(name):
    if name == "ESConfig":
        from .config import ESConfig

        return ESConfig
    if name == "ESTrainer":
        from .trainer import ESTrainer

        return ESTrainer
    raise AttributeError(f"module 'trl_es' has no attribute {name!r}")
