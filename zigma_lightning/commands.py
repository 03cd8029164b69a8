"""The ``zigma`` command (also ``python -m zigma``): LightningCLI's ``fit validate test predict`` and the tools.

    zigma fit --config configs/quickstart.yaml      # train (see zigma_lightning.cli)
    zigma prepare images --help                     # encode a dataset into shards (datamodules.prepare)
    zigma reference-stats --help                    # Inception statistics of real images for FID
    zigma sample --ckpt last.ckpt --count 50000 --out samples/   # samples.npz for FID evaluators
    zigma export last.ckpt --out export/            # EMA weights: model.safetensors + config.json

Each tool is imported only when named, so ``zigma --help`` is quick and a tool's optional dependency is needed
only by that tool. A missing optional dependency stops with one line naming the extra that provides it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from zigma_lightning.extras import missing_extra_message

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# name -> (module whose main(argv) runs it, one-line summary)
TOOLS = {
    "prepare": ("datamodules.prepare", "encode images, videos or captions into webdataset shards with a manifest"),
    "reference-stats": ("zigma_lightning.reference_stats", "Inception statistics of real images, for FID"),
    "sample": ("zigma_lightning.sample", "N samples from a checkpoint: resumable, bounded memory, samples.npz"),
    "export": ("zigma_lightning.export", "a checkpoint's EMA weights as safetensors + config.json"),
}


def usage() -> str:
    tools = "\n".join(f"  {name:<16} {summary}" for name, (_, summary) in TOOLS.items())
    return (
        "usage: zigma {fit,validate,test,predict} [--config FILE] [--key value ...]\n"
        "       zigma TOOL [arguments]\n\n"
        "ZigMa (zigzag Mamba diffusion) with PyTorch Lightning.\n\n"
        "LightningCLI subcommands (zigma fit --help lists every setting):\n"
        "  fit              train (--ckpt_path last resumes the newest run)\n"
        "  validate, test   evaluate a checkpoint (--ckpt_path)\n"
        "  predict          write samples of a checkpoint (--ckpt_path)\n\n"
        f"tools (zigma TOOL --help):\n{tools}\n"
    )


def run_tool(name: str, argv: list[str]):
    module_name, _ = TOOLS[name]
    module = importlib.import_module(module_name)
    return module.main(argv)


def main(argv: Sequence[str] | None = None):
    """Dispatch ``argv`` (None: ``sys.argv[1:]``) to a LightningCLI subcommand or a tool; returns what it returns."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    name, rest = args[0], args[1:]
    try:
        if name in TOOLS:
            return run_tool(name, rest)
        if name in LIGHTNING_SUBCOMMANDS or name.startswith("-"):
            from zigma_lightning.cli import main as lightning_main

            lightning_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
            return 0
    except ModuleNotFoundError as err:
        line = missing_extra_message(err.name or "")
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    print(f"error: unknown command {name!r}; choose one of {', '.join([*LIGHTNING_SUBCOMMANDS, *TOOLS])}",
          file=sys.stderr)  # fmt: skip
    sys.exit(2)
