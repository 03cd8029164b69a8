"""What a training run prints on the console: the progress bar of step-limited runs.

Lightning 2.6's ``RichProgressBar`` labels the training bar ``f"Epoch {epoch}/{trainer.max_epochs - 1}"`` whenever
``max_epochs`` is not None (``_get_train_description``). A run bounded by ``max_steps`` alone has ``max_epochs = -1``
(the fit loop's "unbounded"), so the quickstart's bar read "Epoch 6/-2". :class:`StepLimitedRichProgressBar` shows
"Epoch 6" when the epoch count is unbounded and Lightning's label otherwise. (``TQDMProgressBar`` never shows the
bound, so it needs nothing.)
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepLimitedRichProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training label has no epoch bound when ``trainer.max_epochs`` is None or < 0."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        # as Lightning's, padded to the validation label's width so the bar does not flicker
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
