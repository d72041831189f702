"""Golden values: two ES steps on the tiny model, pinned, so a refactor that changes any number is caught.

The values were recorded with torch 2.13 on CPU, before and after the strategy/space refactor (identical). A change
to noise seeding, member order, fitness shaping, the update or the sampling seeds moves them; if a change is
intended, re-record them and say why in the commit.
"""

import torch
from conftest import es_config, length_reward

from trl_es import ESTrainer
from trl_es.tasks import arithmetic_dataset


def test_two_cpu_steps_match_the_recorded_values(tiny_model_dir, tmp_path):
    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path, seed=42),  # sampled decoding, N=4, sigma 0.05, SGD lr 1e-3, 2 steps
        train_dataset=arithmetic_dataset("train", size=16),
    )
    trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    assert rewards == [0.953125, 0.9609375]
    total = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
    assert abs(total - 158.3345049333018) < 1e-6
    row = trainer.model.model.layers[0].self_attn.q_proj.weight[0, :4]
    expected = torch.tensor([0.03848636895418167, 0.03408845141530037, -0.004754223395138979, -0.018208079040050507])
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-7)
