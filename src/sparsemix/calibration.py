"""Calibration statistics gathered by forward hooks, as running averages in float32.

Inputs of any leading shape are flattened to tokens: x [..., in_features] -> [N, in_features].
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .solver import triton_available


def column_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [tokens, features] float32 -> (sum |x|, sum x, sum x^2), each [features] float32.
    On a GPU one Triton kernel reads x once; elsewhere three torch reductions."""
    if x.is_cuda and triton_available():
        from .moments_kernel import triton_column_sums
        return tuple(triton_column_sums(x).unbind(0))
    return torch.linalg.vector_norm(x, 1, dim=0), x.sum(0), (x * x).sum(0)


class InputStatistics:
    """H = (2/N) sum_t x_t x_t^T [in, in], E|x| [in] and E[x^2] [in] over N tokens seen so far."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.abs_mean = torch.zeros(features, dtype=torch.float32, device=device)
        self.sq_mean = torch.zeros(features, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # fp16 would overflow x x^T
        n = x.shape[0]
        total = self.tokens + n
        keep = self.tokens / total
        self.H.mul_(keep).addmm_(x.T, x, alpha=2.0 / total)
        absolute, _, squares = column_sums(x)
        self.abs_mean.mul_(keep).add_(absolute, alpha=1.0 / total)
        self.sq_mean.mul_(keep).add_(squares, alpha=1.0 / total)
        self.tokens = total

    def check_finite(self) -> None:
        """Once, after the last update (a check per batch would stall the GPU): a NaN or inf in any
        input reaches H's diagonal, since x_j^2 is added to H_jj."""
        if not torch.isfinite(self.H).all():
            raise FloatingPointError("non-finite calibration input")


class OutputStatistics:
    """Per output channel of the dense layer: E|y|, E[y], E[y^2] [out] over N tokens."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.abs_mean = torch.zeros(features, dtype=torch.float32, device=device)
        self.mean = torch.zeros(features, dtype=torch.float32, device=device)
        self.sq_mean = torch.zeros(features, dtype=torch.float32, device=device)

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).to(self.mean.device, torch.float32)
        total = self.tokens + y.shape[0]
        keep = self.tokens / total
        absolute, plain, squares = column_sums(y)
        self.abs_mean.mul_(keep).add_(absolute, alpha=1.0 / total)
        self.mean.mul_(keep).add_(plain, alpha=1.0 / total)
        self.sq_mean.mul_(keep).add_(squares, alpha=1.0 / total)
        self.tokens = total

    def check_finite(self) -> None:
        if not torch.isfinite(self.sq_mean).all():
            raise FloatingPointError("non-finite calibration output")

    @property
    def variance(self) -> torch.Tensor:
        return (self.sq_mean - self.mean**2).clamp(min=0)


@contextmanager
def collect_statistics(
    linears: Mapping[str, nn.Linear], shared_inputs: Sequence[Sequence[str]] = (),
) -> Iterator[tuple[dict[str, InputStatistics], dict[str, OutputStatistics]]]:
    """Hooks on ``linears`` while the block runs; yields (inputs, outputs) by linear name.

    Names listed together in ``shared_inputs`` read the same tensor (q/k/v, gate/up) and
    share one ``InputStatistics`` object, updated once per forward (groups naming linears not
    in ``linears`` are ignored).
    """
    inputs: dict[str, InputStatistics] = {}
    outputs: dict[str, OutputStatistics] = {}
    handles = []
    owner = {}
    shared = [list(group) for group in shared_inputs if all(name in linears for name in group)]
    for names in shared + [[n] for n in linears]:
        if names[0] in owner:
            continue
        stats = InputStatistics(linears[names[0]].in_features, linears[names[0]].weight.device)
        for name in names:
            inputs[name] = stats
            owner[name] = names[0]

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if owner[name] == name:
                inputs[name].update(args[0])
            outputs[name].update(output)
        return record

    for name, linear in linears.items():
        outputs[name] = OutputStatistics(linear.out_features, linear.weight.device)
        handles.append(linear.register_forward_hook(hook(name)))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()
    for name in linears:
        try:
            inputs[name].check_finite()
            outputs[name].check_finite()
        except FloatingPointError as error:
            raise FloatingPointError(f"{name}: {error}") from None
