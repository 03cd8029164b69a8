"""``zigma export CKPT --out DIR``: a training checkpoint's EMA weights as the small inference export.

    zigma export runs/quickstart/version_0/checkpoints/last.ckpt --out export/
    zigma export last.ckpt --out export/ --weights model    # the live weights (a run without EMA updates)

``DIR`` gets ``model.safetensors`` (the backbone's weights and persistent buffers), ``config.json`` (its constructor
arguments) and ``flow.json`` (transport, sampler and VAE settings): ``zigma.from_pretrained(DIR)`` loads the network,
``zigma sample --ckpt DIR`` samples exactly as from the checkpoint. Each file is written atomically, the weights
last. A checkpoint whose EMA never updated (or has none) is refused unless ``--weights model`` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from zigma.checkpoint import save_pretrained
from zigma_lightning.sample_model import CheckpointError, inference_settings, load_sampling_module


def export(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write the export of a Lightning checkpoint to ``out``; returns ``out``.

    Raises:
        CheckpointError, FileNotFoundError: one line (not a Lightning checkpoint, no EMA weights, ...).
    """
    module = load_sampling_module(checkpoint, weights=weights, lightning_only=True)
    return save_pretrained(module.ema.network, out, flow=inference_settings(module))


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when the export is written; a bad checkpoint prints one line ``error: ...`` and gives 2."""
    parser = argparse.ArgumentParser(prog="zigma export", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("checkpoint", help="a Lightning .ckpt written by zigma fit")
    parser.add_argument("--out", required=True, help="the export directory (created)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or live weights")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.weights)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {str(err).strip(chr(39))}", file=sys.stderr)
        return 2
    print(f"exported the {args.weights} weights of {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
