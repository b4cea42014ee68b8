"""Which experts tokens pick together: accumulated on logging steps, for `coe-dist placement plan`.

    CoELayer routing records (logging steps; original expert ids, whatever the placement)
        per (layer, iteration): pairs [N, N] (picked in the same iteration), follows [N, N] (picked in the last
        iteration, then this one), sample [S, K] (rank 0's tokens' choices)
    -> one all-reduce of the counts -> rank 0's running totals -> <run_dir>/coselection.safetensors at every
       checkpoint save (atomic; continued after a resume)

Cheap: two bincounts per layer and iteration on logging steps only, and one all-reduce of C x L x 2 x N^2
counts. These are statistics, not training state: a resume from an older checkpoint keeps the newer totals.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save

from coe_dist.atomic_file import write_atomic
from coe_dist.model import CoETransformer

FILE = "coselection.safetensors"
SAMPLE_STEPS = 8  # logging steps of sampled choices kept (the newest), to predict a placement's traffic


def _count_keys(model: CoETransformer) -> list[str]:
    """The counters this model records, in one order on every rank: layer{l}/iter{t}/pairs|follows."""
    keys = []
    for layer in model.coe_layers():
        for t in range(layer.config.iterations):
            keys += [f"layer{layer.layer}/iter{t}/pairs"] + ([f"layer{layer.layer}/iter{t}/follows"] if t else [])
    return keys


class CoSelection:
    def __init__(self, run_dir: Path, rank: int, enabled: bool = True) -> None:
        self.path, self.rank, self.enabled = Path(run_dir) / FILE, rank, enabled
        self.totals: dict[str, torch.Tensor] = {}
        if enabled and rank == 0 and self.path.is_file():
            self.totals = load_file(str(self.path))

    def add(self, model: CoETransformer, world_size: int) -> None:
        """Collective when world_size > 1: after a recorded forward, on every rank (a no-op when disabled)."""
        layers = {f"layer{layer.layer}": layer.routing_record for layer in model.coe_layers() if layer.routing_record}
        if not self.enabled or not layers:
            return
        keys = [k for k in _count_keys(model) if k.split("/")[0] in layers]
        counts = torch.stack([layers[k.split("/")[0]]["/".join(k.split("/")[1:])].double().cpu() for k in keys])
        if world_size > 1:
            dist.all_reduce(counts)
        if self.rank != 0:
            return
        for key, c in zip(keys, counts, strict=True):
            self.totals[key] = self.totals.get(key, torch.zeros_like(c)) + c
        for layer in model.coe_layers():
            for t in range(layer.config.iterations if layer.routing_record else 0):
                key = f"layer{layer.layer}/iter{t}/sample"
                new = layer.routing_record[f"iter{t}/sample"].to(torch.int32).cpu()
                old = self.totals.get(key, new[:0])
                self.totals[key] = torch.cat([old, new])[-SAMPLE_STEPS * len(new):]

    def save(self) -> None:
        if self.rank == 0 and self.totals:
            write_atomic(self.path, save({k: v.contiguous() for k, v in self.totals.items()}))


def read(run: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The statistics of a run directory (or of the run a checkpoint directory belongs to)."""
    run = Path(run)
    for d in (run, run.parent.parent):  # RUN, or RUN/checkpoints/step_N
        if (d / FILE).is_file():
            return load_file(str(d / FILE)), d
    raise FileNotFoundError(f"{run}: no {FILE} (routing statistics are written at each checkpoint save of a run "
                            "with CoE layers; train with log.log_interval steps and a save first)")
