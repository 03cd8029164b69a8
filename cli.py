"""``python cli.py fit|validate|test|predict --config configs/...yaml [--key value ...]``: the same entry point as
the ``zigma`` command's LightningCLI subcommands (``zigma_lightning.cli.main``), usable from a clone without
installing."""

from zigma_lightning.cli import main

if __name__ == "__main__":
    main()
