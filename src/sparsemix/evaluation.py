"""Perplexity by the GPTQ/SparseGPT protocol: exp(mean token NLL), each window scored on its own."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .layerwise import capture_layer_inputs, run_layer
from .models import adapter_for


@dataclass
class Perplexity:
    value: float
    tokens: int  # tokens scored (seqlen - 1 per window)
    windows: int
    seconds: float
    tokens_per_second: float  # tokens run through the model (windows x seqlen) per second


def window_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Summed NLL of predicting token t+1 from logits at t; logits [b, seq, vocab], windows [b, seq]."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1).to(logits.device),
        reduction="sum",
    )


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 8, device: torch.device | str = "cpu",
    layerwise: bool = False, progress: bool = False, desc: str = "eval",
) -> Perplexity:
    """Perplexity of ``model`` on ``windows`` [n, seqlen].

    ``layerwise`` keeps decoder layers where they are and moves one at a time to ``device``
    (for models larger than the GPU); otherwise the whole model runs on ``device``.
    """
    start = time.perf_counter()
    nll = torch.zeros((), dtype=torch.float64)
    if layerwise:
        adapter = adapter_for(model)
        inputs = capture_layer_inputs(model, windows, batch_size, device)
        hidden = inputs.hidden
        for i, layer in enumerate(adapter.layers(model)):
            home = next(layer.parameters()).device
            layer.to(device)
            hidden = run_layer(layer, hidden, inputs.kwargs[i])
            layer.to(home)
        for h, batch in zip(hidden, windows.split(batch_size)):
            for module in adapter.head(model):
                h = module(h)
            nll += window_nll(h, batch).double().cpu()
    else:
        model.to(device)
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            logits = model(batch.to(device), use_cache=False).logits
            nll += window_nll(logits, batch).double().cpu()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return Perplexity(math.exp(float(nll) / tokens), tokens, windows.shape[0], seconds, windows.numel() / seconds)
