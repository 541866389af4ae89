"""Average precision of one class of a multi-label benchmark (PASCAL VOC), two standard definitions.

Labels are VOC's ``1`` (positive), ``0`` or ``-1`` in the class files; ``-1`` marks an image whose only objects of
the class are *difficult* and is ignored (neither positive nor negative), as the VOC devkit does. Ranking by
descending score, precision p(k) and recall r(k) after the top k images:

* :func:`ap_11point` (VOC2007 devkit, ``VOCevalcls`` of 2007): the mean over t in {0, 0.1, ..., 1} of the highest
  precision at any recall >= t (0 when recall t is never reached). The thresholds are the floats ``k * 0.1``, as
  in the devkit's Python port (``np.arange(0., 1.1, 0.1)``), so e.g. a recall of exactly 3/10 does not reach
  ``0.30000000000000004``: numbers stay comparable with published ones.
* :func:`ap_area` (VOC2010+ devkit): the area under the precision-recall curve after making precision monotone
  non-increasing (each precision replaced by the highest precision at equal or higher recall).

Tied scores are broken by input order (stable sort), as the devkit's ``sort`` does.
"""

from __future__ import annotations

import numpy as np


def _pr(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) after each of the non-difficult images, ranked by descending score."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be matching 1-D arrays")
    keep = labels != -1
    scores, positive = scores[keep], labels[keep] == 1
    if not positive.any():
        raise ValueError("no positive example: average precision is undefined")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positive[order])
    ranks = np.arange(1, len(order) + 1)
    return tp / ranks, tp / positive.sum()


def ap_11point(scores, labels) -> float:
    """VOC2007 11-point interpolated AP (see module docstring); labels in {1, 0, -1}, -1 ignored."""
    precision, recall = _pr(scores, labels)
    return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))


def ap_area(scores, labels) -> float:
    """VOC2010+ AP: area under the monotone (interpolated) precision-recall curve; labels in {1, 0, -1}."""
    precision, recall = _pr(scores, labels)
    interpolated = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * interpolated))
