"""Counter-based noise (``MemberNoise(generator="philox")``): Philox4x32-10 as Random123 defines it, the compiled CPU
kernel equal to the torch ops bit for bit, a standard normal distribution, and the in-place space on top of it."""

import math
import re

import pytest
import torch

from trl_es.core import InPlaceSpace, MemberNoise, philox


needs_kernel = pytest.mark.skipif(not philox.kernel_status()[0], reason="no C compiler: torch ops only")
SEED = 0x1234_5678_9ABC_DEF0 & (2**63 - 1)


# Random123 tests/kat_vectors, the three `philox4x32 10` lines: counter, key, result (all hex words).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    words = philox.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(words[0].tolist()) == expected


def test_the_c_constants_enum_is_in_the_python_order():
    source = philox.SOURCE.read_text()
    names = re.search(r"enum \{([^}]*)\}", source).group(1).replace(" ", "").split(",")
    assert names[:-1] == list(philox.CONSTANTS) and names[-1] == "NUM_CONSTANTS"


# (start, count): partial first and last blocks and groups, a single element, counters beyond 2^32 blocks
RANGES = [(0, 1), (3, 1), (5, 2), (0, 1000), (3, 997), (31, 34), (2**33 + 1, 100), (2**40 + 7, 4099), (12345, 2**18)]


@needs_kernel
@pytest.mark.parametrize("start, count", RANGES)
def test_compiled_kernel_equals_the_torch_ops_bit_for_bit(start, count):
    compiled = philox.normals(SEED, start, count)
    assert torch.equal(compiled, philox.normals_torch(SEED, start, count))


@needs_kernel
def test_the_numbers_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = philox.normals(SEED, 11, 2**16)
        torch.set_num_threads(max(2, threads))
        many = philox.normals(SEED, 11, 2**16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_any_slice_is_the_slice_of_the_whole_stream():
    whole = philox.normals(SEED, 0, 5000)
    for start, count in [(0, 7), (1, 4096), (4093, 907), (4999, 1)]:
        assert torch.equal(philox.normals(SEED, start, count), whole[start : start + count])
        assert torch.equal(philox.normals_torch(SEED, start, count), whole[start : start + count])


def test_the_torch_ops_stand_in_when_the_kernel_cannot_build(monkeypatch):
    expected = philox.normals_torch(SEED, 9, 333)
    monkeypatch.setattr(philox, "_build", lambda: (None, "no C compiler found"))
    assert torch.equal(philox.normals(SEED, 9, 333), expected)
    target = torch.ones(333)
    philox.add_scaled_normals(target, SEED, 9, 0.25)
    assert torch.equal(target, torch.ones(333) + expected * 0.25)


def test_the_numbers_are_standard_normal_and_independent():
    x = philox.normals(SEED, 0, 2**20).double()
    assert abs(float(x.mean())) < 5 / math.sqrt(x.numel())  # 5 standard errors
    assert float(x.std()) == pytest.approx(1.0, abs=5e-3)
    assert float((x**3).mean()) == pytest.approx(0.0, abs=0.02)
    assert float((x**4).mean()) == pytest.approx(3.0, abs=0.05)
    # the normal CDF at a few points: each fraction within 5 standard errors of its expectation
    for z in (-2.0, -1.0, 0.0, 0.5, 1.5, 2.5):
        p = 0.5 * (1 + math.erf(z / math.sqrt(2)))
        assert abs(float((x <= z).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / x.numel())
    for lag in (1, 2, 3, 4, 5):  # within a block's four lanes, and across blocks
        correlation = float((x[:-lag] * x[lag:]).mean())
        assert abs(correlation) < 5 / math.sqrt(x.numel()), lag
    other = philox.normals(SEED + 1, 0, 2**20).double()  # a neighbouring key
    assert abs(float((x * other).mean())) < 5 / math.sqrt(x.numel())
    assert float(x.abs().max()) < math.sqrt(2 * 24 * math.log(2)) + 1e-3  # the 24-bit radius bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_add_is_the_draw_then_mul_then_add(dtype):
    torch.manual_seed(0)
    weights = torch.randn(10_001).to(dtype)
    expected = weights.clone().add_(philox.normals(SEED, 17, weights.numel()).mul_(-0.01).to(dtype))
    philox.add_scaled_normals(weights, SEED, 17, -0.01)
    assert torch.equal(weights, expected)


def test_member_noise_with_philox_does_not_depend_on_the_chunk_size():
    small, large = MemberNoise(5, 4, chunk_size=7, generator="philox"), MemberNoise(5, 4, generator="philox")
    whole = large.direction(2, 1, "w", (5, 9))
    assert torch.equal(small.direction(2, 1, "w", (5, 9)), whole)
    assert torch.equal(small.direction_slice(2, 1, "w", 45, 10, 20), whole.flatten()[10:30])
    chunks = [small.direction_chunk(2, 1, "w", 45, j) for j in range(small.num_chunks(45))]
    assert torch.equal(torch.cat(chunks), whole.flatten())
    for span in small.chunk_spans(45, 3, 30):
        part = small.span_noise(2, 1, "w", 45, span, "cpu")
        start = span.chunk * 7 + span.chunk_offset
        assert torch.equal(part, whole.flatten()[start : start + span.count])
    assert torch.equal(small.member_noise(2, 3, "w", (5, 9)), -whole)  # antithetic partner of direction 1
    # other steps, directions, tensors and the all-directions draw are other streams; the torch generator differs
    assert not torch.equal(large.direction(3, 1, "w", (5, 9)), whole)
    assert not torch.equal(large.direction(2, 0, "w", (5, 9)), whole)
    assert not torch.equal(large.direction(2, 1, "v", (5, 9)), whole)
    assert not torch.equal(MemberNoise(5, 4).direction(2, 1, "w", (5, 9)), whole)
    rows = large.all_directions(2, "w", (5, 9))
    assert rows.shape == (2, 5, 9) and not torch.equal(rows[1], whole)
    with pytest.raises(ValueError, match="generator must be one of"):
        MemberNoise(5, 4, generator="mt19937")


def _space(restore: str, chunk_size: int = 7):
    torch.manual_seed(0)
    params = [
        ("a", torch.nn.Parameter(torch.randn(5, 6))),
        ("b", torch.nn.Parameter(torch.randn(6, 5).t())),  # strided: edited through a flat copy
        ("c", torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))),  # not fp32: the torch path
    ]
    noise = MemberNoise(1, 4, chunk_size=chunk_size, generator="philox")
    return InPlaceSpace(params, noise, restore=restore), params


@pytest.mark.parametrize("restore", ["copy", "subtract"])
def test_in_place_space_perturbs_with_philox_noise_and_restores(restore):
    space, params = _space(restore)
    before = [p.detach().clone() for _, p in params]
    for member in range(4):
        with space.perturbed(3, [member], 0.1):
            for (name, p), b in zip(params, before):
                eps = space.noise.member_noise(3, member, name, p.shape)
                assert torch.equal(p.detach(), b + (eps * 0.1).to(p.dtype)), name
        for (name, p), b in zip(params, before):
            if restore == "copy":
                assert torch.equal(p.detach(), b), name
            else:
                torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6 if p.dtype == torch.float32 else 1e-2)
        before = [p.detach().clone() for _, p in params]


def test_apply_member_is_bit_identical_to_the_evaluated_member_and_the_update_to_torch_sgd():
    space, params = _space("copy")
    with space.perturbed(4, [2], 0.1):
        evaluated = [p.detach().clone() for _, p in params]
    space.apply_member(4, 2, 0.1)
    for (name, p), e in zip(params, evaluated):
        assert torch.equal(p.detach(), e), name

    coefficients = torch.tensor([0.7, -1.3])
    grad_space, grad_params = _space("copy", chunk_size=2**20)  # another chunking: the same noise
    grad_space.write_gradients(2, coefficients)
    torch.optim.SGD([p for _, p in grad_params], lr=0.05).step()
    space, params = _space("copy")
    space.apply_update(2, coefficients, lr=0.05)
    for (name, p), (_, q) in zip(params, grad_params):
        assert torch.equal(p.detach(), q.detach()), name


def test_each_number_is_the_exact_box_muller_transform_of_its_uniforms_to_within_1e_6():
    count, seed = 2**18, 99
    blocks = torch.arange(count // 4, dtype=torch.int64)
    zero = torch.zeros_like(blocks)
    words = philox.philox4x32_10(torch.stack((blocks & philox.MASK32, blocks >> 32, zero, zero), -1), (99, 0))

    def exact(a, b):  # float64, libm's log / cos / sin, on the same 24-bit uniforms
        radius = torch.sqrt(-2 * torch.log(((a >> 8) + 1).double() * 2**-24))
        angle = 2 * math.pi * (b >> 8).double() * 2**-24
        return radius * torch.cos(angle), radius * torch.sin(angle)

    z0, z1 = exact(words[:, 0], words[:, 1])
    z2, z3 = exact(words[:, 2], words[:, 3])
    expected = torch.stack((z0, z1, z2, z3), -1).view(-1)
    assert float((philox.normals(seed, 0, count).double() - expected).abs().max()) < 1e-6
