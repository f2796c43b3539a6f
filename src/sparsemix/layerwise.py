"""Running a model one decoder layer at a time.

The calibration (or evaluation) windows go through the embeddings once while stand-ins record
what the model passes each decoder layer (masks, rotary embeddings); each layer can then be
run on its own, on whatever device, over the recorded inputs.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .models import Adapter, adapter_for, attention_core_memo


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records what the model passes it and returns its input."""

    def __init__(self, index: int, last: int, inputs: list, kwargs: list):
        super().__init__()
        self.index, self.last, self.inputs, self.kwargs = index, last, inputs, kwargs

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers called with positional arguments are not supported")
        if self.index == 0:
            self.inputs.append(hidden_states)
        self.kwargs[self.index].append(kwargs)
        if self.index == self.last:
            raise _Stop
        return hidden_states


@dataclass
class LayerInputs:
    """Hidden states entering the current layer (one tensor [batch, seq, hidden] per batch), and
    the keyword arguments the model passes each layer for each batch (masks, rotary embeddings)."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]  # [layer][batch]


@contextmanager
def _layers_replaced(model: nn.Module, adapter: Adapter, replacement: nn.ModuleList):
    """The model with its decoder-layer list swapped for ``replacement`` until the block ends."""
    parent_path, _, attr = adapter.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    setattr(parent, attr, replacement)
    try:
        yield
    finally:
        setattr(parent, attr, layers)


def move_outside_layers(model: nn.Module, adapter: Adapter, device: torch.device | str) -> None:
    """Embeddings, final norm, head and rotary tables to ``device``; decoder layers stay put."""
    with _layers_replaced(model, adapter, nn.ModuleList()):
        model.to(device)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str,
) -> LayerInputs:
    """Run ``windows`` [n, seqlen] through the embeddings; record each layer's call arguments."""
    adapter = adapter_for(model)
    count = len(adapter.layers(model))
    move_outside_layers(model, adapter, device)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in range(count)]
    recorders = nn.ModuleList(_Recorder(i, count - 1, hidden, kwargs) for i in range(count))
    with _layers_replaced(model, adapter, recorders):
        for batch in windows.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    return LayerInputs(hidden, kwargs)


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The layer applied to every batch; returns the new hidden states."""
    outputs = []
    for h, kw in zip(hidden, kwargs):
        out = layer(h, **kw)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def run_layer_until(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], last: list[nn.Module]) -> None:
    """The layer on every batch, each stopped once every module in ``last`` has run: a statistics
    pass needs nothing after the linears it watches (hooks registered earlier still fire)."""
    seen: set[int] = set()

    def stop_when_all_seen(module, args, output):
        seen.add(id(module))
        if len(seen) == len(last):
            raise _Stop

    handles = [module.register_forward_hook(stop_when_all_seen) for module in last]
    try:
        for h, kw in zip(hidden, kwargs):
            seen.clear()
            try:
                layer(h, **kw)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()


class SettledOutputs:
    """Outputs of a layer's submodules whose linears are all compressed: recorded once, replayed after.

    The true-sequential passes each rerun the layer up to the group at hand; a submodule whose
    linears are all final (q_proj once q/k/v are done, self_attn once o_proj is) returns the same
    tensors on every later pass, so recomputing it is waste. Exact: the tensors are the same ones.
    """

    def __init__(self, layer: nn.Module, linear_names: list[str], attention: tuple[str, tuple[str, ...]] | None = None,
                 inputs: list[torch.Tensor] = ()):
        """``attention``: (path of the attention module, the linears its attention core reads): once
        those are final the core (softmax(q k^T) v, the costly part) is recorded and replayed too.
        ``inputs``: the layer's input batches; a module without linears applied to one of them (the
        input norm) is computed once per batch, not once per pass."""
        self.layer, self.linear_names, self.attention = layer, linear_names, attention
        self.recorded: dict[str, list] = {}
        self.inputs = {id(x): x for x in inputs}
        self.memo: dict[str, dict[int, torch.Tensor]] = {}  # linear-free module -> id(layer input) -> output

    def _plan(self, module: nn.Module, prefix: str, done: set[str], record: bool):
        """(path, module, replay?) for the outermost settled submodules; inside one that is
        recorded now, the settled submodules already recorded are replayed."""
        for name, child in module.named_children():
            path = prefix + name
            inside = {n for n in self.linear_names if n == path or n.startswith(path + ".")}
            if not inside:
                continue
            settled = inside <= done
            if settled and path in self.recorded:
                yield path, child, True
                continue
            if settled and record:
                yield path, child, False
            yield from self._plan(child, path + ".", done, record)

    @contextmanager
    def replayed(self, done: set[str], record: bool = True):
        """Within the block, settled submodules (all their linears in ``done``) replay what they
        returned before, batch by batch; with ``record``, those seen first are recorded."""
        handles, patched, outer = [], [], []
        for path, module, replay in list(self._plan(self.layer, "", done, record)):
            if replay:
                outputs = iter(self.recorded[path])
                module.forward = lambda *args, _outputs=outputs, **kwargs: next(_outputs)
                patched.append(path)
            else:
                store = self.recorded.setdefault(path, [])
                handles.append(module.register_forward_hook(lambda m, a, out, _store=store: _store.append(out)))
            outer.append(path)
        memoized = [path for path in self._linear_free() if not any(path.startswith(o + ".") for o in patched)]
        for path in memoized:
            self._memoize(path)
        try:
            with self._attention_core(done, record, patched):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for path in patched + memoized:
                del self.layer.get_submodule(path).forward  # back to the class's forward
            for inner in [p for p in self.recorded if any(p.startswith(o + ".") for o in outer)]:
                del self.recorded[inner]  # inside a module that is now recorded: never needed again

    def _attention_core(self, done: set[str], record: bool, replayed_paths: list[str]):
        """The attention core's memo for this pass: replayed if recorded, recorded if asked, else none."""
        if self.attention is None:
            return nullcontext()
        path, inputs = self.attention
        key = path + ".<attention core>"  # under the module's path: dropped once the module itself is recorded
        if not set(inputs) <= done or path in replayed_paths or (key not in self.recorded and not record):
            return nullcontext()
        outputs = self.recorded.setdefault(key, [])
        return attention_core_memo(self.layer.get_submodule(path), outputs, replay=bool(outputs))

    def _linear_free(self) -> list[str]:
        """The outermost submodules holding no compressed linear (norms, activations): pure
        functions of their input whose parameters never change."""
        paths: list[str] = []
        for path, _ in self.layer.named_modules():  # parents before children
            if not path or any(path.startswith(p + ".") for p in paths):
                continue
            if not any(n == path or n.startswith(path + ".") or path.startswith(n + ".") for n in self.linear_names):
                paths.append(path)
        return paths

    def _memoize(self, path: str) -> None:
        """Until the block ends, ``path`` called on one of the layer's input batches returns what it
        returned for it before. Only those: other inputs change from pass to pass, and keeping
        their outputs would cost memory for nothing."""
        module = self.layer.get_submodule(path)
        forward, seen = module.forward, self.memo.setdefault(path, {})

        def memoized(*args, **kwargs):
            x = args[0] if len(args) == 1 and not kwargs else None
            if x is None or self.inputs.get(id(x)) is not x:  # the inputs stay alive: their ids are theirs
                return forward(*args, **kwargs)
            if id(x) not in seen:
                seen[id(x)] = forward(x)
            return seen[id(x)]
        module.forward = memoized
