import pytest
import torch

from fedlm.core import ParamSpec, flatten, unflatten


def test_flatten_then_unflatten_restores_every_tensor():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    spec = ParamSpec(("a", "b", "c"), ((3, 4), (5,), (2, 2, 2)))
    vector = flatten(tensors)
    assert vector.dtype == torch.float32 and vector.shape == (spec.numel,) == (25,)
    for original, restored in zip(tensors, unflatten(vector, spec)):
        assert torch.equal(original, restored)


def test_flatten_casts_to_float32_and_detaches():
    weight = torch.ones(2, dtype=torch.float16, requires_grad=True)
    vector = flatten([weight])
    assert vector.dtype == torch.float32 and not vector.requires_grad


def test_unflatten_rejects_a_vector_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"expected \[6\]"):
        unflatten(torch.zeros(5), ParamSpec(("w",), ((2, 3),)))


def test_first_difference_names_the_parameter():
    spec = ParamSpec(("a", "b"), ((2,), (3,)))
    assert spec.first_difference(ParamSpec(("a", "b"), ((2,), (3,)))) is None
    assert "'b' has shape [4]" in spec.first_difference(ParamSpec(("a", "b"), ((2,), (4,))))
    assert "'x'" in spec.first_difference(ParamSpec(("a", "x"), ((2,), (3,))))
    assert "missing parameter 'b'" in spec.first_difference(ParamSpec(("a",), ((2,),)))
    assert "extra parameter 'c'" in spec.first_difference(ParamSpec(("a", "b", "c"), ((2,), (3,), (1,))))
