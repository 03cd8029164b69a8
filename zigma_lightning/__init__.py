"""The ZigMa training application: the ``zigma`` command (``zigma_lightning.commands``), its LightningCLI
(``zigma_lightning.cli``), resume/SLURM run discovery (``zigma_lightning.resume``) and the crash-safe checkpoint-IO
Trainer plugin (``zigma_lightning.checkpoint_io``). ``import zigma`` (the library) never imports this package."""
