"""Pure-torch ES core: seeds -> noise -> perturbation -> fitness shaping -> strategy update.

Nothing in this package imports transformers or trl (``tests/test_core_imports.py`` enforces it), so the ES math
can be read and tested without a language model. Files, in the order data flows through a step:

* ``noise.py``      member -> seeded direction -> noise tensor (never stored; ``philox.py`` + ``philox_noise.c``:
                    the counter-based generator, compiled on the CPU)
* ``spaces.py``     where the noise reaches the model (in place; ``low_rank.py``: batched rank-r members, whose
                    CPU term is one compiled call: ``cpu_kernel.py`` + ``member_terms.c``)
* ``layout.py``     which process evaluates which member on which prompts
* ``fitness.py``    rewards -> one raw fitness per member -> shaped fitness
* ``update.py``     shaped fitness -> per-direction pseudo-gradient coefficients
* ``anchor.py``     drift control: the pull toward the initial weights added to the pseudo-gradient
* ``strategies/``   ask / tell: how a search uses the above (``gaussian.py``: seeded Gaussian ES)
* ``apply.py``      the strategy's update made on the tensors: the one update path of the trainer and replay
"""

from .anchor import Anchor
from .cpu_kernel import LOW_RANK_KERNELS, KernelUnavailable
from .fitness import (
    FITNESS_SHAPINGS,
    REWARD_AGGREGATIONS,
    MemberMeans,
    combine_reward_functions,
    k3_kl_per_completion,
    member_fitness,
    penalize_kl,
    penalize_router_imbalance,
    shape_fitness,
)
from .layout import (
    Round,
    check_population_split,
    distinct_rows,
    member_rows,
    place_scores,
    plan_rounds,
    prompt_group_rows,
    seen_mask,
)
from .low_rank import LowRankSpace
from .noise import NOISE_CHUNK, NOISE_GENERATORS, MemberNoise, derive_seed
from .spaces import RESTORE_MODES, InPlaceSpace, PerturbationSpace
from .strategies import STRATEGIES, GaussianES, Strategy, StrategyUpdate, UpdateKind
from .update import plain_sgd_problem, pseudo_gradient_coefficients, qiu_learning_rate, sgd_hyperparameters


__all__ = [
    "Anchor",
    "FITNESS_SHAPINGS",
    "NOISE_CHUNK",
    "NOISE_GENERATORS",
    "REWARD_AGGREGATIONS",
    "RESTORE_MODES",
    "STRATEGIES",
    "GaussianES",
    "InPlaceSpace",
    "KernelUnavailable",
    "LOW_RANK_KERNELS",
    "LowRankSpace",
    "MemberMeans",
    "MemberNoise",
    "PerturbationSpace",
    "Round",
    "Strategy",
    "StrategyUpdate",
    "UpdateKind",
    "check_population_split",
    "combine_reward_functions",
    "derive_seed",
    "distinct_rows",
    "k3_kl_per_completion",
    "member_fitness",
    "penalize_kl",
    "member_rows",
    "penalize_router_imbalance",
    "place_scores",
    "plain_sgd_problem",
    "plan_rounds",
    "prompt_group_rows",
    "pseudo_gradient_coefficients",
    "qiu_learning_rate",
    "seen_mask",
    "sgd_hyperparameters",
    "shape_fitness",
]
