import torch

from sparsemix.calibration import InputStatistics, OutputStatistics
from sparsemix.config import AllocationConfig, ImportanceWeights
from sparsemix.importance import allocation_score, combined_importance, importance_dimensions, normalize_mean


def hand_case():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    inputs = InputStatistics(2)
    inputs.update(torch.tensor([[1.0, 2.0], [-1.0, 0.0]]))  # E[x^2] = (1, 2)
    outputs = OutputStatistics(3)
    outputs.update(torch.tensor([[1.0, 4.0, 0.0], [3.0, -4.0, 0.0]]))  # |y|: 2,4,0  var: 1,16,0
    hinv_diag = torch.tensor([0.5, 2.0])
    return importance_dimensions(W, hinv_diag, inputs, outputs)


def ratios(x):
    return (x / x.mean()).tolist()


def test_each_dimension_on_a_hand_case():
    dims = hand_case()
    for name, raw in {
        "activation": [2.0, 4.0, 0.0],
        "hessian": [1 / 0.5, 4 / 2.0, 1 / 0.5 + 1 / 2.0],
        "weight": [0.5, 1.0, 1.0],
        "output": [1.0, (4 * 2.0) ** 0.5, (1 + 2.0) ** 0.5],
        "stability": [1.0, 16.0, 0.0],
    }.items():
        torch.testing.assert_close(dims[name], torch.tensor(ratios(torch.tensor(raw))))
        assert abs(float(dims[name].mean()) - 1) < 1e-6


def test_all_zero_dimension_is_neutral():
    assert normalize_mean(torch.zeros(4)).tolist() == [1.0] * 4


def test_weights_renormalise_and_zero_weights_ablate():
    dims = hand_case()
    only_weight = combined_importance(dims, ImportanceWeights(0, 0, 3.0, 0, 0))
    torch.testing.assert_close(only_weight, dims["weight"])
    mix = combined_importance(dims, ImportanceWeights(activation=1, hessian=1, weight=0, output=0, stability=0))
    torch.testing.assert_close(mix, (dims["activation"] + dims["hessian"]) / 2)


def test_threshold3_ranks_by_activation_times_weight():
    dims = hand_case()
    score = allocation_score(dims, AllocationConfig(method="threshold3"))
    expected = dims["activation"] * dims["weight"]
    torch.testing.assert_close(score, expected / expected.mean())
