"""zigma-lightning's application wiring: the command line, resume and SLURM helpers, the checkpoint plugin."""
