"""Pure-torch ES core: seeds -> noise -> perturbation -> fitness shaping -> pseudo-gradient.

Nothing in this package imports transformers or trl (``tests/test_core_imports.py`` enforces it), so the ES math
can be read and tested without a language model.
"""

from .fitness import FITNESS_SHAPINGS, member_fitness, shape_fitness
from .low_rank import LowRankSpace
from .noise import MemberNoise, derive_seed
from .spaces import InPlaceSpace, PerturbationSpace
from .update import pseudo_gradient_coefficients


__all__ = [
    "FITNESS_SHAPINGS",
    "InPlaceSpace",
    "LowRankSpace",
    "MemberNoise",
    "PerturbationSpace",
    "derive_seed",
    "member_fitness",
    "pseudo_gradient_coefficients",
    "shape_fitness",
]
