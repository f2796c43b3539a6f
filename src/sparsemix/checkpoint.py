"""Resumable compression: the state after every decoder layer, in a folder.

``progress.json`` (what run this is, how many layers are done, their statistics),
``layer_{i}.safetensors`` (each finished layer's weights), ``bits.safetensors``,
``grids.safetensors`` (what packing needs) and, for
``optimal``, ``sensitivity.pt`` (Fisher and plan, computed on the dense model). Every file is
written to a temporary name and renamed, so a kill leaves the previous state intact.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import CompressionConfig, ConfigError
from .files import write_via_temp
from .stats import CompressionStats

PROGRESS = "progress.json"


def run_key(config: CompressionConfig, windows: torch.Tensor, layers: int) -> str:
    """Identity of a compression run: configuration, calibration tokens, layer count."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    digest.update(windows.cpu().contiguous().numpy().tobytes())
    digest.update(str(layers).encode())
    return digest.hexdigest()[:16]


@dataclass
class Resumed:
    layers_done: int = 0
    stats: CompressionStats = field(default_factory=CompressionStats)
    bits: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: dict[str, torch.Tensor] = field(default_factory=dict)
    sensitivity: tuple[dict, dict] | None = None  # (fisher, plan) of optimal


class LayerCheckpoint:
    def __init__(self, directory: str | os.PathLike, key: str):
        self.directory, self.key = Path(directory), key
        self.directory.mkdir(parents=True, exist_ok=True)

    def load(self) -> Resumed:
        """What an earlier run of the same command finished; nothing if the folder is new."""
        progress_file = self.directory / PROGRESS
        if not progress_file.is_file():
            return Resumed()
        progress = json.loads(progress_file.read_text())
        if progress["key"] != self.key:
            raise ConfigError(f"--checkpoint-dir {self.directory} holds another run (different model, data or"
                              " settings); use an empty folder or the original command")
        bits_file = self.directory / "bits.safetensors"
        grids_file = self.directory / "grids.safetensors"
        sensitivity_file = self.directory / "sensitivity.pt"
        return Resumed(
            layers_done=progress["layers_done"],
            stats=CompressionStats.from_dict({"layers": progress["layers"]}),
            bits=load_file(str(bits_file)) if bits_file.is_file() else {},
            grids=load_file(str(grids_file)) if grids_file.is_file() else {},
            sensitivity=torch.load(sensitivity_file) if sensitivity_file.is_file() else None,
        )

    def layer_weights(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.directory / f"layer_{index}.safetensors"))

    def save_sensitivity(self, fisher: dict, plan: dict) -> None:
        write_via_temp(self.directory / "sensitivity.pt", lambda tmp: torch.save((fisher, plan), tmp))

    def save_layer(self, index: int, layer: torch.nn.Module, stats: CompressionStats, bits: dict,
                   grids: dict) -> None:
        """After layer ``index``: its weights, then bits, grids and statistics so far, then the progress mark."""
        weights = {name: t.detach().cpu().contiguous() for name, t in layer.state_dict().items()}
        write_via_temp(self.directory / f"layer_{index}.safetensors", lambda tmp: save_file(weights, tmp))
        write_via_temp(self.directory / "bits.safetensors", lambda tmp: save_file(dict(bits), tmp))
        write_via_temp(self.directory / "grids.safetensors", lambda tmp: save_file(dict(grids), tmp))
        progress = {"key": self.key, "layers_done": index + 1, "layers": stats.to_dict()["layers"]}
        write_via_temp(self.directory / PROGRESS, lambda tmp: Path(tmp).write_text(json.dumps(progress)))
