"""Search strategies: which members a step evaluates and how their fitness moves the weights.

A strategy is one small file with a subclass of :class:`Strategy`; it talks to the model only through a
:class:`~trl_es.core.spaces.PerturbationSpace`.
"""

from .base import Strategy, StrategyUpdate, UpdateKind
from .cma import CMAStrategy
from .ga import GeneticAlgorithm
from .gaussian import GaussianES


# name -> class; each builds itself from an ESConfig-like object with ``from_config(space, args)``.
STRATEGIES = {"gaussian": GaussianES, "cma": CMAStrategy, "ga": GeneticAlgorithm}

__all__ = ["STRATEGIES", "CMAStrategy", "GaussianES", "GeneticAlgorithm", "Strategy", "StrategyUpdate", "UpdateKind"]
