"""A/B harness: ``trl-es compare`` runs GRPO and ES side by side on the same recipe and budget.

``plan`` splits a recipe into the shared keys and each arm's keys and fixes the budget; ``arm`` trains one arm in
its own process (rollout counting, held-out evaluation on a rollout schedule, budget stop); ``report`` writes
``compare.json``, ``compare.md`` and ``compare.png``; ``run`` drives it all.
"""
