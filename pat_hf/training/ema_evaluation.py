"""Evaluation of the EMA students next to the raw one, with the best metric taken over them all."""

from __future__ import annotations

from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from pat_hf.training.attributes import temporarily
from pat_hf.training.callbacks import ModelEmaCallback


class EmaEvaluationTrainer(Trainer):
    """A Trainer mixin for a model with a `student` (a distiller); `epoch_eval` keeps the last `eval` metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_eval: dict[str, float] = {}

    @property
    def ema_callback(self) -> ModelEmaCallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, ModelEmaCallback)), None)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Evaluate the raw student, then each EMA student in its place (metrics `<prefix>_ema_top1`, ...),
        and report the higher top-1 of them as `<prefix>_max_top1`, the reference's selection metric."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        top1 = [output.metrics.get(f"{metric_key_prefix}_top1")]
        for name, module in self.ema_callback.named_models() if self.ema_callback else []:
            prefix = f"{metric_key_prefix}_{name}"
            with temporarily(self.accelerator.unwrap_model(self.model), "student", module):
                ema_output = super().evaluation_loop(dataloader, f"{description} ({name})", prediction_loss_only,
                                                     ignore_keys, prefix)
            output.metrics.update(ema_output.metrics)
            top1.append(ema_output.metrics.get(f"{prefix}_top1"))
        top1 = [value for value in top1 if value is not None]
        if top1:
            output.metrics[f"{metric_key_prefix}_max_top1"] = max(top1)
        if metric_key_prefix == "eval":
            self.epoch_eval = dict(output.metrics)
        return output

