"""Classification metrics for facial expression recognition."""
from typing import Dict, List, Sequence

import torch

__all__ = ['confusion_matrix', 'metrics_from_confusion']


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count (true label, prediction) pairs into a ``(num_classes, num_classes)`` int64 matrix.

    Rows are true labels and columns predictions.
    """
    preds = preds.reshape(-1).long().cpu()
    labels = labels.reshape(-1).long().cpu()
    if preds.shape != labels.shape:
        raise ValueError(f'{preds.numel()} predictions for {labels.numel()} labels.')
    bad = (labels < 0) | (labels >= num_classes) | (preds < 0) | (preds >= num_classes)
    if bool(bad.any()):
        raise ValueError(f'Labels and predictions must lie in [0, {num_classes}); found {labels[bad][:5].tolist()} '
                         f'/ {preds[bad][:5].tolist()}.')
    index = labels * num_classes + preds
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(matrix: torch.Tensor, label_names: Sequence[str]) -> Dict:
    """Return accuracy, mean class accuracy, per-class recall and the matrix as plain Python values.

    ``mean_class_accuracy`` averages the recall of the classes that occur in the labels.
    A class without samples has recall None and is left out of the mean.
    """
    matrix = matrix.long()
    n = int(matrix.sum())
    correct = int(matrix.diag().sum())
    support = matrix.sum(dim=1)
    recall: Dict[str, object] = {}
    present: List[float] = []
    for i, name in enumerate(label_names):
        if int(support[i]) == 0:
            recall[name] = None
        else:
            value = float(matrix[i, i]) / float(support[i])
            recall[name] = value
            present.append(value)
    return {
        'accuracy': correct / n if n else 0.0,
        'mean_class_accuracy': sum(present) / len(present) if present else 0.0,
        'per_class_recall': recall,
        'n': n,
        'confusion_matrix': matrix.tolist(),
    }
