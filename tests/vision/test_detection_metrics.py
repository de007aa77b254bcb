"""mean_average_precision: COCOeval's numbers on in-memory boxes."""

import pytest
import torch

from lorakit.tasks.detection_metrics import mean_average_precision

pytest.importorskip("pycocotools")

TARGETS = [torch.tensor([[0, 10, 10, 50, 50], [1, 60, 60, 100, 120.0]]), torch.tensor([[0, 0, 0, 30, 30.0]])]


def perfect(targets):
    return [torch.cat([t[:, 1:], torch.full((len(t), 1), 0.9), t[:, :1]], 1) for t in targets]


def test_perfect_predictions_score_one():
    result = mean_average_precision(perfect(TARGETS), TARGETS, num_classes=2)
    assert result == {"map50": pytest.approx(1.0), "map": pytest.approx(1.0)}


def test_partial_case_is_cocos_101_point_value():
    """One class, two targets; ranked: a hit, then a miss. Recall 0.5 at precision 1 covers COCO's recall
    points 0, 0.01, ..., 0.50: AP = 51/101 at every IoU threshold (not the 0.5 of an exact area)."""
    targets = [torch.tensor([[0, 0, 0, 10, 10], [0, 50, 50, 60, 60.0]])]
    predictions = [torch.tensor([[0, 0, 10, 10, 0.9, 0], [100, 100, 110, 110, 0.8, 0]])]
    result = mean_average_precision(predictions, targets, num_classes=1)
    assert result["map50"] == pytest.approx(51 / 101) and result["map"] == pytest.approx(51 / 101)


def test_localisation_error_counts_only_at_strict_thresholds():
    targets = [torch.tensor([[0, 0, 0, 100, 100.0]])]
    predictions = [torch.tensor([[0, 0, 100, 72, 0.9, 0]])]  # IoU 0.72: a hit at 0.50..0.70, a miss above
    result = mean_average_precision(predictions, targets, num_classes=1)
    assert result["map50"] == pytest.approx(1.0) and result["map"] == pytest.approx(5 / 10)


def test_images_without_predictions_or_targets():
    predictions = perfect(TARGETS)[:1] + [torch.zeros(0, 6)] + [torch.tensor([[5, 5, 20, 20, 0.3, 1.0]])]
    targets = TARGETS + [torch.zeros(0, 5)]  # image 1's target missed; image 2 has a false positive only
    result = mean_average_precision(predictions, targets, num_classes=2)
    assert 0 < result["map50"] < 1
    nothing = mean_average_precision([torch.zeros(0, 6)] * 2, TARGETS, num_classes=2)
    assert nothing == {"map50": 0.0, "map": 0.0}
    with pytest.raises(ValueError, match="none of the 2 images has a target"):
        mean_average_precision(perfect(TARGETS), [torch.zeros(0, 5)] * 2, num_classes=2)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"predictions\[0\]: class 5 is not an integer in \[0, 2\)"):
        mean_average_precision([torch.tensor([[0, 0, 1, 1, 0.5, 5]])], TARGETS[:1], num_classes=2)
    with pytest.raises(ValueError, match=r"targets\[0\] has shape \(1, 4\)"):
        mean_average_precision([torch.zeros(0, 6)], [torch.zeros(1, 4)], num_classes=2)
