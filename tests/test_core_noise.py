"""Seeded noise: deterministic, independent across tensors/members/steps, antithetic, exact restore."""

import pytest
import torch

from trl_es.core import InPlaceSpace, MemberNoise, derive_seed


def make_params():
    torch.manual_seed(0)
    # Two tensors of the same shape: they must still get different noise.
    return [(name, torch.nn.Parameter(torch.randn(4, 5))) for name in ("layer0.weight", "layer1.weight")] + [
        ("bias", torch.nn.Parameter(torch.randn(5)))
    ]


def test_same_seed_same_noise_and_global_rng_untouched():
    noise = MemberNoise(seed=7, population_size=4)
    state = torch.get_rng_state()
    a = noise.member_noise(step=3, member=1, key="w", shape=(10,))
    b = noise.member_noise(step=3, member=1, key="w", shape=(10,))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())


def test_noise_independent_across_tensors_members_steps_and_seeds():
    noise = MemberNoise(seed=7, population_size=4)
    base = noise.direction(0, 0, "layer0.weight", (100,))
    for other in (
        noise.direction(0, 0, "layer1.weight", (100,)),  # same shape, other tensor
        noise.direction(0, 1, "layer0.weight", (100,)),  # other direction
        noise.direction(1, 0, "layer0.weight", (100,)),  # other step
        MemberNoise(8, 4).direction(0, 0, "layer0.weight", (100,)),  # other run seed
    ):
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1]) < 0.4


def test_antithetic_pairs_mirror_each_other():
    noise = MemberNoise(seed=0, population_size=4, antithetic=True)
    assert noise.num_directions == 2
    plus = noise.member_noise(0, 2, "w", (6,))
    minus = noise.member_noise(0, 3, "w", (6,))
    assert torch.equal(plus, -minus)
    assert not torch.equal(plus, noise.member_noise(0, 0, "w", (6,)))


def test_derive_seed_is_stable():
    # Hard-coded values: the hash and the noise it seeds must not change between Python runs, processes or releases
    # (resume, multi-process runs and replay all regenerate noise from it). Recorded with torch 2.13 on CPU.
    assert derive_seed(1, "noise", 2, 3, "w") == 5990706813384777580
    expected = torch.tensor([-1.0515385866165161, 1.3413540124893188, -0.6936172842979431, 1.2256369590759277])
    assert torch.equal(MemberNoise(7, 4).direction(3, 1, "model.w", (4,)), expected)
    assert derive_seed(1, "noise", 2, 3, "w") != derive_seed(1, "noise", 2, 3, "v")
    assert 0 <= derive_seed("x") < 2**63


@pytest.mark.parametrize("bad", [dict(population_size=1), dict(population_size=5, antithetic=True)])
def test_invalid_population(bad):
    with pytest.raises(ValueError, match="population_size"):
        MemberNoise(seed=0, **bad)


def test_perturb_changes_every_tensor_and_copy_restore_is_bit_exact():
    params = make_params()
    before = [p.detach().clone() for _, p in params]
    space = InPlaceSpace(params, MemberNoise(0, 4), restore="copy")
    for member in range(4):
        with space.perturbed(step=5, members=[member], sigma=0.1):
            for (_, p), b in zip(params, before):
                assert not torch.equal(p, b)
            # sigma * eps exactly (up to fp32 rounding of the addition)
            delta = params[0][1].detach() - before[0]
            expected = 0.1 * space.noise.member_noise(5, member, "layer0.weight", (4, 5))
            torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
        for (_, p), b in zip(params, before):
            assert torch.equal(p, b)


def test_subtract_restore_is_close_and_restore_survives_exceptions():
    params = make_params()
    before = [p.detach().clone() for _, p in params]
    space = InPlaceSpace(params, MemberNoise(0, 4), restore="subtract")
    with space.perturbed(0, [1], 0.1):
        pass
    for (_, p), b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)

    exact = InPlaceSpace(params, MemberNoise(0, 4), restore="copy")
    snapshot = [p.detach().clone() for _, p in params]
    with pytest.raises(RuntimeError, match="boom"):
        with exact.perturbed(0, [0], 0.1):
            raise RuntimeError("boom")
    for (_, p), b in zip(params, snapshot):
        assert torch.equal(p, b)


def test_space_rejects_bad_arguments():
    params = make_params()
    with pytest.raises(ValueError, match="unique"):
        InPlaceSpace(params + params[:1], MemberNoise(0, 4))
    with pytest.raises(ValueError, match="one member"):
        with InPlaceSpace(params, MemberNoise(0, 4)).perturbed(0, [0, 1], 0.1):
            pass


# ---------------------------------------------------------------------------------------------- chunked noise


def test_chunk_zero_is_the_whole_tensor_draw_of_before_chunks():
    # The seed and length of chunk 0 are those of the whole-tensor noise before chunks existed: a tensor of at most
    # chunk_size elements has the same noise, so golden values and the quickstart result do not move.
    old = torch.randn(4, 6, generator=torch.Generator().manual_seed(derive_seed(7, "noise", 3, 1, "w")))
    assert torch.equal(MemberNoise(7, 4).direction(3, 1, "w", (4, 6)), old)
    assert torch.equal(MemberNoise(7, 4, chunk_size=24).direction(3, 1, "w", (4, 6)), old)
    chunked = MemberNoise(7, 4, chunk_size=10).direction(3, 1, "w", (4, 6)).flatten()
    assert torch.equal(
        chunked[:10], torch.randn(10, generator=torch.Generator().manual_seed(derive_seed(7, "noise", 3, 1, "w")))
    )


def test_chunked_noise_is_the_concatenation_of_its_chunks_each_seeded_apart():
    noise = MemberNoise(7, 4, chunk_size=10)
    full = noise.direction(2, 1, "w", (5, 7))  # 35 elements: chunks of 10, 10, 10, 5
    chunks = [noise.direction_chunk(2, 1, "w", 35, j) for j in range(4)]
    assert [c.numel() for c in chunks] == [10, 10, 10, 5]
    assert torch.equal(full.flatten(), torch.cat(chunks))
    # every chunk is its own stream (not a continuation of chunk 0's generator, not a copy of another chunk)
    assert not torch.equal(chunks[1], chunks[2])
    assert not torch.equal(chunks[1], torch.randn(20, generator=noise.generator(2, 1, "w"))[10:])
    assert noise.num_chunks(35) == 4 and noise.num_chunks(0) == 0
    with pytest.raises(IndexError, match="chunk 4"):
        noise.direction_chunk(2, 1, "w", 35, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        MemberNoise(7, 4, chunk_size=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_a_shards_noise_drawn_from_its_chunks_only_equals_the_slice_of_the_full_noise(world, monkeypatch):
    noise = MemberNoise(7, 4, chunk_size=10)
    numel = 35
    full = noise.direction(2, 1, "w", (numel,))
    partition = -(-numel // world)  # ZeRO-3: ceil, the last rank's shard is short
    drawn = []
    original = noise.direction_chunk
    monkeypatch.setattr(noise, "direction_chunk", lambda *a, **k: drawn.append(a[4]) or original(*a, **k))
    for rank in range(world):
        start = rank * partition
        length = max(0, min(partition, numel - start))
        drawn.clear()
        part = noise.direction_slice(2, 1, "w", numel, start, length)
        assert torch.equal(part, full[start : start + length])
        overlapping = sorted({i // 10 for i in range(start, start + length)})
        assert drawn == overlapping, f"rank {rank} drew chunks {drawn}, needs only {overlapping}"
    assert noise.chunk_spans(35, 8, 15) == [(0, 8, 0, 2), (1, 0, 2, 10), (2, 0, 12, 3)]
    with pytest.raises(ValueError, match="not inside"):
        noise.chunk_spans(35, 30, 10)


def _chunked_space(restore="copy", chunk_size=7, dtype=torch.float32):
    torch.manual_seed(0)
    params = [
        ("a", torch.nn.Parameter(torch.randn(5, 6, dtype=dtype))),  # 30 elements: 5 chunks of 7 (the last 2)
        ("b", torch.nn.Parameter(torch.randn(6, 5, dtype=dtype).t())),  # strided: edited through a flat copy
        ("c", torch.nn.Parameter(torch.randn(3, dtype=dtype))),  # smaller than a chunk
    ]
    return InPlaceSpace(params, MemberNoise(1, 4, chunk_size=chunk_size), restore=restore), params


@pytest.mark.parametrize("restore", ["copy", "subtract"])
def test_chunk_by_chunk_perturb_and_restore(restore):
    space, params = _chunked_space(restore)
    assert not params[1][1].is_contiguous()
    before = [p.detach().clone() for _, p in params]
    for member in range(4):
        start = [p.detach().clone() for _, p in params]  # subtract restores leave ~1e-7 drift: compare to these
        with space.perturbed(3, [member], 0.1):
            for (name, p), b in zip(params, start):
                eps = space.noise.member_noise(3, member, name, p.shape)
                assert torch.equal(p.detach(), b + eps * 0.1), name  # same ops as whole-tensor noise, exactly
        for (name, p), b in zip(params, before):
            if restore == "copy":
                assert torch.equal(p.detach(), b), name
            else:
                torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("chunk_size", [7, 2**20])
def test_apply_update_is_bit_identical_to_gradients_and_torch_sgd(chunk_size, weight_decay, dtype):
    coefficients = torch.tensor([0.7, -1.3])
    grad_space, grad_params = _chunked_space(chunk_size=chunk_size, dtype=dtype)
    grad_space.write_gradients(2, coefficients)
    expected_norm = sum(float(p.grad.double().square().sum()) for _, p in grad_params) ** 0.5
    for name, p in grad_params:  # the pseudo-gradient itself, against the whole-tensor noise
        g = sum(c * grad_space.noise.direction(2, k, name, p.shape) for k, c in enumerate(coefficients.tolist()))
        torch.testing.assert_close(p.grad.float(), g, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    groups = [
        {"params": [grad_params[0][1], grad_params[1][1]], "weight_decay": weight_decay},
        {"params": [grad_params[2][1]], "weight_decay": 0.0},  # like the Trainer's no-decay group
    ]
    torch.optim.SGD(groups, lr=0.05).step()

    space, params = _chunked_space(chunk_size=chunk_size, dtype=dtype)
    grad_sq = space.apply_update(2, coefficients, lr=0.05, weight_decay=[weight_decay, weight_decay, 0.0])
    for (name, p), (_, q) in zip(params, grad_params):
        assert p.grad is None
        assert torch.equal(p.detach(), q.detach()), name
    assert grad_sq**0.5 == pytest.approx(expected_norm, rel=1e-6)  # the norm of what p.grad would hold
    with pytest.raises(ValueError, match="2 values for 3 evolved tensors"):
        space.apply_update(2, coefficients, lr=[0.1, 0.1])
