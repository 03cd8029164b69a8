"""The seeded per-sample class labels: values pinned to those drawn before the draw had one home."""

import pytest
import torch

from zigma.conditions import class_labels


@pytest.mark.parametrize(
    ("num_classes", "count", "seed", "expected"),
    [  # computed at 624718f with torch.randint(num_classes, (count,), generator=torch.Generator().manual_seed(seed))
        (10, 8, 0, [4, 9, 3, 0, 3, 9, 7, 3]),
        (1000, 6, 3, [986, 48, 737, 667, 360, 280]),
        (2, 12, 12345, [0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1]),
    ],
)
def test_labels_are_the_values_drawn_before(num_classes, count, seed, expected):
    labels = class_labels(num_classes, count, seed)
    assert labels.dtype == torch.int64 and labels.device.type == "cpu"
    assert labels.tolist() == expected


def test_labels_do_not_depend_on_the_global_generator():
    torch.manual_seed(1)
    first = class_labels(7, 20, 5)
    torch.manual_seed(2)
    torch.rand(3)
    assert torch.equal(first, class_labels(7, 20, 5))
