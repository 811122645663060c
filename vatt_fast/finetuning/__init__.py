"""The parts of ``python -m vatt_fast.finetune`` (:mod:`vatt_fast.finetune`), by job.

================= ==========================================================================
``labels``        the classes (from the train split's labels), the clips' targets, the checks
``model``         :class:`Classifier` (a pretrained encoder + head), loading a pretraining
                  checkpoint with position interpolation and every key accounted for
``recipe``        augmentation, label-smoothed loss, per-group gradient clipping
``evaluate``      the multi-view and single-view test, top-k accuracy, mAP
================= ==========================================================================

The run itself (flags, checkpoints, resume, SIGTERM, DDP/FSDP, logging, run folder) is the
trainer's machinery, :mod:`vatt_fast.training`.
"""

from vatt_fast.finetuning.evaluate import (
    evaluate_classifier,
    make_views,
    mean_average_precision,
    predict_views,
    topk_accuracy,
)
from vatt_fast.finetuning.labels import LabelSpace, build_label_space
from vatt_fast.finetuning.model import Classifier, interpolate_positions, load_pretrained
from vatt_fast.finetuning.recipe import AudioAugment, VideoAugment, classification_loss, smooth_targets

__all__ = [
    "AudioAugment",
    "Classifier",
    "LabelSpace",
    "VideoAugment",
    "build_label_space",
    "classification_loss",
    "evaluate_classifier",
    "interpolate_positions",
    "load_pretrained",
    "make_views",
    "mean_average_precision",
    "predict_views",
    "smooth_targets",
    "topk_accuracy",
]
