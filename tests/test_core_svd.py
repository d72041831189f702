"""Singular-value space (ESSA): exact weights at the start, members equal explicit U diag(s') V^T rebuilds, exact
restore whatever fails, the update is the hand-computed noise sum, and LoRA results load with plain peft."""

import pytest
import torch
from torch import nn

from trl_es.core.noise import MemberNoise
from trl_es.core.svd import SVDSpace, svd_target_modules


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8).to(dtype)
        self.fc2 = nn.Linear(8, 5).to(dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def lora_mlp():
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: random B as well as A, like an adapter after its SFT warm start (B starts at 0).
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(MLP(), config)


def bits(tensor):
    """The raw bits, so -0.0 != 0.0 and NaN payloads count: 'bit-identical' means this."""
    return tensor.detach().view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[tensor.dtype]).clone()


def weight_bits(model):
    return {name: bits(p) for name, p in model.named_parameters()}


def assert_bits(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), before[name]), f"{name} changed"


def make_space(model=None, population=4, **kwargs):
    model = model or MLP()
    space = SVDSpace(svd_target_modules(model), MemberNoise(0, population), **kwargs)
    return model, space


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_is_bit_identical_until_the_values_move(dtype):
    model = MLP(dtype)
    with torch.no_grad():
        model.fc1.weight[0, 0] = -0.0  # a signed zero survives too (M + 0.0 would turn it into +0.0)
    before = weight_bits(model)
    model, space = make_space(model)
    assert_bits(model, before)
    space.after_update()
    space.set_vector(space.get_vector())
    assert_bits(model, before)
    for name, weight in space.rebuilt_weights().items():
        assert torch.equal(bits(weight), before[name])


def test_top_fraction_and_search_dim():
    _, space = make_space(svd_fraction=0.5)  # ranks 6 and 5 -> 3 + 3
    assert [t.numel() for _, t in space.named_tensors()] == [3, 3]
    assert space.search_dim == 6 and space.mode == "linear"
    assert [name for name, _ in space.named_tensors()] == ["fc1.weight.singular_values", "fc2.weight.singular_values"]
    assert make_space(svd_fraction=0.01)[1].search_dim == 2  # at least one value per matrix
    assert make_space(svd_fraction=1.0)[1].search_dim == 11
    layer = nn.Linear(30, 40)
    assert SVDSpace([("l", layer)], MemberNoise(0, 2), svd_fraction=0.1).search_dim == 3  # not 4 (float error)
    for _, values in space.named_tensors():
        assert values.dtype == torch.float32 and values.is_leaf


def explicit_weight(original, k, new_top):
    """U diag(s') V^T from a float64 SVD of M, with the top k singular values replaced by ``new_top``."""
    u, s, vh = torch.linalg.svd(original.double(), full_matrices=False)
    s = s.clone()
    s[:k] = new_top.double()
    return (u * s) @ vh


def test_members_equal_explicit_rebuilds_both_signs():
    model, space = make_space(population=6)
    reference = MLP()
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(3, 6)
    for member in range(6):  # three mirrored pairs
        with space.perturbed(step=2, members=[member], sigma=0.05):
            got = model(x)
            for name, values in space.named_tensors():
                weight_name = name.removesuffix(".singular_values")
                eps = space.noise.member_noise(2, member, name, values.shape)
                expected = explicit_weight(originals[weight_name], values.numel(), values.detach() + 0.05 * eps)
                weight = dict(model.named_parameters())[weight_name]
                torch.testing.assert_close(weight.double(), expected, rtol=0, atol=1e-5)
                reference.get_parameter(weight_name).data.copy_(expected)
        torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)
        reference.load_state_dict(originals)
        for name, p in model.named_parameters():
            assert torch.equal(p, originals[name])
    with pytest.raises(ValueError, match="one member at a time"):
        with space.perturbed(0, [0, 1], 0.1):
            pass


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_restore_is_exact_when_any_target_fails(error, monkeypatch):
    model, space = make_space()
    before = weight_bits(model)
    write = space._write
    for failing in range(len(space.named_tensors())):
        calls = []

        def flaky(target, values, failing=failing, calls=calls):
            if len(calls) == failing:
                raise error(f"injected at target {failing}")
            calls.append(target.name)
            write(target, values)

        monkeypatch.setattr(space, "_write", flaky)
        with pytest.raises(error, match="injected"):
            with space.perturbed(0, [1], 0.1):
                pass
        assert_bits(model, before)
    monkeypatch.setattr(space, "_write", write)
    with pytest.raises(ValueError, match="in the body"):
        with space.perturbed(0, [1], 0.1):
            assert not torch.equal(model.fc1.weight, MLP().fc1.weight)
            raise ValueError("in the body")
    assert_bits(model, before)


def test_write_gradients_is_the_fp32_noise_sum():
    _, space = make_space(population=6)
    coefficients = torch.tensor([0.5, -1.25, 2.0])
    space.write_gradients(3, coefficients)
    for name, values in space.named_tensors():
        expected = sum(c * space.noise.direction(3, k, name, values.shape) for k, c in enumerate(coefficients))
        torch.testing.assert_close(values.grad, expected, rtol=1e-6, atol=1e-7)
        assert values.grad.dtype == torch.float32
    with pytest.raises(ValueError, match=r"one coefficient per noise direction \(3\)"):
        space.write_gradients(3, torch.zeros(6))


def test_optimizer_step_after_update_and_vector_round_trip():
    model, space = make_space()
    before = weight_bits(model)
    optimizer = torch.optim.SGD([t for _, t in space.named_tensors()], lr=0.1)
    space.write_gradients(0, torch.tensor([1.0, -1.0]))
    optimizer.step()
    space.after_update()
    moved = space.get_vector()
    rebuilt = space.rebuilt_weights()
    for name, p in model.named_parameters():
        if name in rebuilt:
            assert torch.equal(p, rebuilt[name]) and not torch.equal(bits(p), before[name])
        else:
            assert torch.equal(bits(p), before[name])  # biases are not evolved
    target = moved + torch.linspace(-0.3, 0.3, space.search_dim)
    space.set_vector(target)
    assert torch.equal(space.get_vector(), target)
    assert all(torch.equal(p, space.rebuilt_weights()[n]) for n, p in model.named_parameters() if n in rebuilt)
    space.set_vector(make_space()[1].get_vector())  # back to the start: bit-identical again
    assert_bits(model, before)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        space.set_vector(torch.zeros(5))


def test_perturbed_by_explicit_offsets():
    model, space = make_space()
    before = weight_bits(model)
    start = space.get_vector()
    offset = torch.linspace(-0.2, 0.4, space.search_dim)
    x = torch.randn(2, 6)
    with space.perturbed_by(space.split_vector(offset)):
        got = model(x)
    assert_bits(model, before)
    space.set_vector(start + offset)
    torch.testing.assert_close(got, model(x), rtol=0, atol=0)
    space.set_vector(start)
    # a missing name means no offset for that tensor
    first = space.named_tensors()[0][0]
    with space.perturbed_by({first: torch.ones(3)}):
        assert torch.equal(bits(model.fc2.weight), before["fc2.weight"])
        assert not torch.equal(bits(model.fc1.weight), before["fc1.weight"])
    with pytest.raises(KeyError, match="unknown evolved tensors"):
        space.perturbed_by({"fc3.weight.singular_values": torch.zeros(3)})
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        space.perturbed_by({first: torch.zeros(4)})


def test_bad_input_is_named():
    model = MLP()
    noise = MemberNoise(0, 2)
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="svd_fraction must be in"):
            SVDSpace([("fc1", model.fc1)], noise, svd_fraction=fraction)
    with pytest.raises(ValueError, match="no modules to decompose"):
        SVDSpace([], noise)
    with pytest.raises(ValueError, match=r"repeated: \['fc1'\]"):
        SVDSpace([("fc1", model.fc1), ("fc1", model.fc2)], noise)
    with pytest.raises(ValueError, match="'b.weight' is the same tensor as 'a.weight'"):
        SVDSpace([("a", model.fc1), ("b", model.fc1)], noise)
    odd = nn.Linear(3, 3)
    odd.weight = nn.Parameter(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"odd.weight: SVD needs a 2-D weight, got shape \(2, 3, 3\)"):
        SVDSpace([("odd", odd)], noise)
    with pytest.raises(TypeError, match="'act' is Tanh"):
        SVDSpace([("act", nn.Tanh())], noise)
    with pytest.raises(
        ValueError, match=r"matches no nn.Linear layer of the model; nn.Linear layers: \['fc1', 'fc2'\]"
    ):
        svd_target_modules(model, ["q_proj"])
    peft_model = lora_mlp()
    base_linear = ("plain", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="LoRA layers .* and plain layers"):
        SVDSpace(svd_target_modules(peft_model) + [base_linear], noise)


def test_lora_factors_decomposed_separately_and_load_with_plain_peft(tmp_path):
    from peft import PeftModel

    model = lora_mlp()
    before = weight_bits(model)
    targets = svd_target_modules(model)
    assert [name for name, _ in targets] == ["base_model.model.fc1", "base_model.model.fc2"]
    assert [name for name, _ in svd_target_modules(model, ["fc2"])] == ["base_model.model.fc2"]
    space = SVDSpace(targets, MemberNoise(0, 4), svd_fraction=0.5)
    assert space.mode == "lora"
    assert [name for name, _ in space.named_tensors()] == [
        f"base_model.model.{layer}.lora_{factor}.default.weight.singular_values"
        for layer in ("fc1", "fc2")
        for factor in "AB"
    ]
    assert space.search_dim == 4 * 2  # rank 4 -> 2 values per factor, two factors, two layers
    assert_bits(model, before)
    with space.perturbed(1, [2], 0.1):
        changed = {n for n, p in model.named_parameters() if not torch.equal(bits(p), before[n])}
    assert changed == {n for n in before if ".lora_A." in n or ".lora_B." in n}
    assert_bits(model, before)

    space.set_vector(space.get_vector() * 1.5)
    x = torch.randn(4, 6)
    expected = model(x)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MLP(), tmp_path)
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    state = dict(model.named_parameters())
    for name, weight in space.rebuilt_weights().items():
        assert torch.equal(weight, state[name])


def test_resume_from_a_checkpoint_of_moved_weights(tmp_path):
    model, space = make_space()
    optimizer = torch.optim.SGD([t for _, t in space.named_tensors()], lr=0.2)
    space.write_gradients(0, torch.tensor([1.0, -2.0]))
    optimizer.step()
    space.after_update()
    torch.save(space.state_dict(), tmp_path / "svd.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with space.perturbed(1, [3], 0.1):
        member_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    # A new process: the model comes back with its moved weights, the space is rebuilt over it, then loads.
    resumed_model = MLP()
    resumed_model.load_state_dict(torch.load(tmp_path / "model.pt"))
    resumed = SVDSpace(svd_target_modules(resumed_model), MemberNoise(0, 4))
    values_before = [t for _, t in resumed.named_tensors()]
    resumed.load_state_dict(torch.load(tmp_path / "svd.pt", weights_only=True))
    assert [t for _, t in resumed.named_tensors()] == values_before  # same tensors: optimizers keep working
    assert torch.equal(resumed.get_vector(), space.get_vector())
    with resumed.perturbed(1, [3], 0.1):
        for n, p in resumed_model.named_parameters():
            assert torch.equal(p, member_weights[n]), n
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, model.state_dict()[n])

    with pytest.raises(ValueError, match=r"evolves 3 singular values \(svd_fraction=0.5\), this space 6"):
        SVDSpace(svd_target_modules(MLP()), MemberNoise(0, 4), svd_fraction=1.0).load_state_dict(space.state_dict())
    with pytest.raises(ValueError, match="build the space over the same target modules"):
        SVDSpace([("fc1", MLP().fc1)], MemberNoise(0, 4)).load_state_dict(space.state_dict())
