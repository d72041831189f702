"""A/B harness: ``trl-es compare`` runs GRPO, ES and named ES variants side by side on the same recipe and budget.

``plan`` splits a recipe into the shared keys and each arm's keys and fixes the budget (each arm's steps from its own
rollouts per step); ``arm`` trains one arm in its own process (rollout counting, held-out evaluation on a rollout
schedule, validation at start and end, budget stop); ``machine`` records how busy the machine was; ``report`` writes
``compare.json``, ``compare.md`` and ``compare.png``; ``run`` drives it all.
"""
