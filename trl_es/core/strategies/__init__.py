"""Search strategies: which members a step evaluates and how their fitness moves the weights.

A strategy is one small file with a subclass of :class:`Strategy`; it talks to the model only through a
:class:`~trl_es.core.spaces.PerturbationSpace`.
"""

from .base import Strategy, StrategyUpdate
from .gaussian import GaussianES


STRATEGIES = {"gaussian": GaussianES}

__all__ = ["STRATEGIES", "GaussianES", "Strategy", "StrategyUpdate"]
