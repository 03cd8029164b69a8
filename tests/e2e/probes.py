"""Probe callbacks for CLI subprocess tests, enabled with ``--trainer.callbacks+=tests.e2e.probes.<Name>`` and
configured by environment variables (a probe without its variable does nothing).

- ``BatchProbe`` ($ZIGMA_BATCH_PROBE = path prefix): appends one JSON line per training batch to
  ``<prefix>.rank<r>``: the global step, and per sample the float64 sum of x and its sum weighted by column index
  (so a left-right flip changes it); at training start it writes ``<prefix>.rank<r>.meta`` (loader class, world
  size, loader state after any resume). Optionally pauses at one point ($ZIGMA_PROBE_PAUSE = ``start:<step>`` for
  ``on_train_batch_start`` while ``trainer.global_step == step``, i.e. inside the next step after its batch was
  fetched, or ``end:<step>`` for ``on_train_batch_end`` once step ``step`` is done, before ``ModelCheckpoint``
  runs), writing ``<prefix>.paused`` and sleeping until ``<prefix>.release`` exists, so the test can signal or kill
  the process at a known point.
- ``ReplicaProbe`` ($ZIGMA_REPLICA_PROBE = path prefix): after every optimizer step all-gathers a float64 checksum
  vector of the raw and EMA weights and compares the ranks bit for bit; appends ``<step> ok`` to
  ``<prefix>.rank<r>`` and, on a mismatch, appends the step and the differing entries to ``<prefix>.fail``.

Below them: helpers that read what the runs left (probe records, checkpoints) and compare checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch

_PAUSE_SECONDS = 120.0


def batch_fingerprint(x: torch.Tensor) -> dict[str, list[float]]:
    """Per-sample ``sum`` and column-weighted ``wsum`` of x (B, C, H, W), float64 (flip-sensitive)."""
    x = x.detach().double().cpu()
    columns = torch.arange(x.shape[-1], dtype=torch.float64)
    return {"sum": x.sum((1, 2, 3)).tolist(), "wsum": (x * columns).sum((1, 2, 3)).tolist()}


def read_batches(prefix: Path | str, rank: int = 0) -> list[dict]:
    """The records ``BatchProbe`` wrote for ``rank`` (in order), or [] if none."""
    path = Path(f"{prefix}.rank{rank}")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_meta(prefix: Path | str, rank: int = 0) -> dict:
    """What ``BatchProbe`` saw at training start on ``rank``: loader class, world size, loader state."""
    return json.loads(Path(f"{prefix}.rank{rank}.meta").read_text())


class BatchProbe(L.Callback):
    """Records a fingerprint of every training batch per global step (see the module docstring)."""

    def __init__(self):
        self.prefix = os.environ.get("ZIGMA_BATCH_PROBE")
        hook, _, step = os.environ.get("ZIGMA_PROBE_PAUSE", "").partition(":")
        self.pause = (hook, int(step)) if step else None

    def _maybe_pause(self, hook: str, trainer) -> None:
        if self.pause != (hook, trainer.global_step) or not self.prefix:
            return
        Path(f"{self.prefix}.paused").write_text(f"{hook}:{trainer.global_step}\n")
        release, deadline = Path(f"{self.prefix}.release"), time.monotonic() + _PAUSE_SECONDS
        while not release.exists() and time.monotonic() < deadline:  # signal handlers run in between the sleeps
            time.sleep(0.05)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.prefix:  # the training loader as the Trainer holds it, after any resume
            loader = trainer.train_dataloader
            meta = {"loader": type(loader).__name__, "world_size": trainer.world_size,
                    "state": loader.state_dict() if hasattr(loader, "state_dict") else None}  # fmt: skip
            Path(f"{self.prefix}.rank{trainer.global_rank}.meta").write_text(json.dumps(meta) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.prefix:
            record = {"step": trainer.global_step, **batch_fingerprint(batch["x"])}
            with open(f"{self.prefix}.rank{trainer.global_rank}", "a") as f:
                f.write(json.dumps(record) + "\n")
        self._maybe_pause("start", trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_pause("end", trainer)


def weight_checksums(pl_module) -> torch.Tensor:
    """(2 * P,) float64: for every raw then EMA parameter tensor, its sum and its sum weighted by element index."""
    rows = []
    for module in (pl_module.model, pl_module.ema.network):
        for p in module.parameters():
            flat = p.detach().double().reshape(-1)
            rows += [flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()]
    return torch.stack(rows)


class ReplicaProbe(L.Callback):
    """Checks after every optimizer step that all ranks hold identical raw and EMA weights."""

    def __init__(self):
        self.prefix = os.environ.get("ZIGMA_REPLICA_PROBE")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.prefix:
            return
        local = weight_checksums(pl_module)
        gathered = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, local)  # gloo: CPU tensors
        gathered = torch.stack(gathered)  # (world, 2P)
        bad = (gathered != gathered[0]).any(0).nonzero().flatten().tolist()
        if bad and trainer.global_rank == 0:
            detail = {"step": trainer.global_step, "entries": bad[:20], "values": gathered[:, bad[:5]].tolist()}
            with open(f"{self.prefix}.fail", "a") as f:
                f.write(json.dumps(detail) + "\n")
        with open(f"{self.prefix}.rank{trainer.global_rank}", "a") as f:
            f.write(f"{trainer.global_step} {'ok' if not bad else 'MISMATCH'} world={gathered.shape[0]}\n")


# ---------------------------------------------------------------------------------------- reading what runs left
def load(path: Path) -> dict:
    """A checkpoint, as resume reads it (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def max_differences(ckpt: dict, reference: dict) -> dict[str, float]:
    """Max |Δ| between two checkpoints over raw weights, EMA weights and AdamW's exp_avg / exp_avg_sq / step."""
    sd, ref = ckpt["state_dict"], reference["state_dict"]
    assert sd.keys() == ref.keys()
    out = {}
    for group, keys in (("weights", [k for k in ref if k.startswith("model.")]),
                        ("ema", [k for k in ref if k.startswith("ema.")])):  # fmt: skip
        assert keys
        out[group] = max((sd[k].double() - ref[k].double()).abs().max().item() for k in keys if ref[k].numel())
    opt, ref_opt = ckpt["optimizer_states"][0]["state"], reference["optimizer_states"][0]["state"]
    assert opt.keys() == ref_opt.keys() and len(ref_opt) > 0
    for name in ("exp_avg", "exp_avg_sq", "step"):
        out[name] = max((opt[i][name].double() - ref_opt[i][name].double()).abs().max().item() for i in ref_opt)
    return out


def loader_state(ckpt: dict) -> dict:
    """The training loader's state where Lightning keeps it in a checkpoint."""
    return ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


def by_step(records: list[dict]) -> dict[int, dict]:
    """``BatchProbe`` records keyed by global step (asserting no step saw two batches)."""
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step saw two batches: {steps}"
    return {r["step"]: r for r in records}
