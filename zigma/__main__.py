"""``python -m zigma ...``: the ``zigma`` command. The application (Lightning, datamodules) is imported only when
run, so ``import zigma`` keeps needing torch alone."""

if __name__ == "__main__":
    from zigma_lightning.commands import main

    raise SystemExit(main())
