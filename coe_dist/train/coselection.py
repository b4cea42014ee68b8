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


def layers_in(stats: dict[str, torch.Tensor]) -> list[int]:
    """The layer indices a statistics file covers (keys layer{l}/iter{t}/...)."""
    return sorted({int(key.split("/")[0].removeprefix("layer")) for key in stats})


class CoSelection:
    def __init__(self, run_dir: Path, rank: int, enabled: bool = True) -> None:
        self.path, self.rank, self.enabled = Path(run_dir) / FILE, rank, enabled
        self.totals: dict[str, torch.Tensor] = {}
        if enabled and rank == 0 and self.path.is_file():
            self.totals = load_file(str(self.path))

    def add(self, model: CoETransformer, world_size: int) -> None:
        """Collective when world_size > 1: after a recorded forward, on every rank (a no-op when disabled)."""
        records = [(f"layer{layer.layer}", layer.routing_record) for layer in model.coe_layers()
                   if layer.routing_record]
        if not self.enabled or not records:
            return
        # The same keys in the same order on every rank: the records are filled by the same code.
        counts = {f"{name}/{key}": c for name, rec in records for key, c in rec.items()
                  if key.endswith(("/pairs", "/follows"))}
        summed = torch.stack([c.double().cpu() for c in counts.values()])
        if world_size > 1:
            dist.all_reduce(summed)
        if self.rank != 0:
            return
        for key, c in zip(counts, summed, strict=True):
            self.totals[key] = self.totals.get(key, torch.zeros_like(c)) + c
        for name, rec in records:
            for key in (k for k in rec if k.endswith("/sample")):
                new = rec[key].to(torch.int32).cpu()
                old = self.totals.get(f"{name}/{key}", new[:0])
                if old.shape[1:] != new.shape[1:]:  # a resume changed moe.top_k: the older choices have another K
                    old = new[:0]
                self.totals[f"{name}/{key}"] = torch.cat([old, new])[-SAMPLE_STEPS * len(new):]

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
