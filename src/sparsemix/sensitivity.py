"""How much each output channel matters to the model's final loss, and a model-wide bit plan.

For a small change dy of a linear's outputs, the calibration loss grows by about
1/2 sum_i E[g_i^2] E[dy_i^2] (the Fisher / Gauss-Newton approximation), where g is the gradient
of the summed token loss with respect to the output. The OBS row loss of the solver is
E[dy_i^2], so Fisher x row loss puts every row of every layer on one scale: the end loss.
"""
from __future__ import annotations

import torch
from torch import nn

from .allocation import knapsack
from .calibration import collect_statistics
from .config import CompressionConfig
from .engine import budget_for, groups_of, option_costs, row_loss_table, solvable_weight
from .evaluation import window_nll
from .layerwise import capture_layer_inputs, run_layer
from .models import adapter_for


def linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    """'layers.{i}.{name}' -> every compressible linear, in the driver's order."""
    adapter = adapter_for(model)
    return {f"layers.{i}.{name}": linear for i, layer in enumerate(adapter.layers(model))
            for name, linear in adapter.linears(layer).items()}


def output_fisher(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 8, device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """E[(d loss / d y_i)^2] per output channel of every linear -> {name: [out_features]} (float32, CPU).

    One forward and backward pass per batch of calibration ``windows`` [n, seqlen], loss = summed
    next-token cross entropy; weights get no gradients. The whole model visits ``device``.
    """
    linears = linear_names(model)
    sums = {name: torch.zeros(linear.out_features, dtype=torch.float64, device=device)
            for name, linear in linears.items()}

    def hook(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            sums[name].add_(grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(0))

        def record(module, args, output):
            output.register_hook(accumulate)
        return record

    home = next(model.parameters()).device
    trainable = {p: p.requires_grad for p in model.parameters()}
    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    tokens = 0
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        with torch.enable_grad():
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                embeds = embed(batch).detach().requires_grad_(True)  # a graph through activations only
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                window_nll(logits, batch).backward()
                tokens += batch[:, 1:].numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.to(home)
    return {name: (total / max(tokens, 1)).float().cpu() for name, total in sums.items()}


@torch.no_grad()
def plan_model_bits(
    model: nn.Module, windows: torch.Tensor, config: CompressionConfig, device: torch.device | str = "cpu",
    batch_size: int = 8, fisher: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One bit budget for the whole model -> {linear name: bits [rows]}.

    Every linear's row-loss table is estimated on the dense model's activations (one forward
    per layer), weighted by the output Fisher, and a single knapsack over all rows of all
    linears spends the model's budget where it lowers the estimated end loss the most.
    """
    adapter = adapter_for(model)
    inputs = capture_layer_inputs(model, windows, batch_size, device)
    hidden = inputs.hidden
    tables, costs, shapes, budget = [], [], {}, 0.0
    for i, layer in enumerate(adapter.layers(model)):
        home = next(layer.parameters()).device
        layer.to(device)
        linears = adapter.linears(layer)
        with collect_statistics(linears, shared_inputs=adapter.sequential) as (in_stats, _):
            outputs = run_layer(layer, hidden, inputs.kwargs[i])
        for name, linear in linears.items():
            full = f"layers.{i}.{name}"
            W, Hinv = solvable_weight(linear.weight, in_stats[name].H, config.prune.percdamp)
            table = row_loss_table(W, Hinv, config).losses
            if fisher is not None:
                table = table * fisher[full].double()[:, None]
            rows, cols = W.shape
            tables.append(table)
            costs.append(option_costs(rows, cols, groups_of(cols, config), config))
            budget += budget_for(rows, cols, config)
            shapes[full] = rows
        hidden = outputs
        layer.to(home)
    choice = knapsack(torch.cat(tables), torch.cat(costs), budget)
    bits = torch.tensor(config.allocation.bit_options)[choice]
    return dict(zip(shapes, bits.split(list(shapes.values()))))
