"""Feature labels from paired codes, and the protocol's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jsae.data.judges import concepts_from_captions
from jsae.labels import FeatureLabels, label_features
from jsae.protocol.stats import bootstrap_ci, cohens_h, images_for_halfwidth, interaction_test


def test_labels_kinds_purity_and_lookup(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 400
    y = (torch.rand(n, 3, generator=g) < 0.3).float()  # concepts: red, square, dog
    zv, zt = torch.zeros(n, 5), torch.zeros(n, 5)
    zv[:, 0], zt[:, 0] = 2 * y[:, 0], 3 * y[:, 0]          # shared "red"
    zv[:, 1] = y[:, 1] * (1 + torch.rand(n, generator=g))  # vision-only "square"
    zt[:, 2] = y[:, 2]                                      # text-only "dog"
    zv[:, 3] = torch.rand(n, generator=g)                   # noise: unlabelled
    zv[:, 4] = y[:, 0] * 1.0 + (1 - y[:, 0]) * 1.0 * (torch.rand(n, generator=g) < 0.3).float()  # impure "red"
    labels = label_features(zv, zt, y, ["red", "square", "dog"])
    kinds = [(lab.label, lab.kind) for lab in labels.labels]
    assert kinds[:4] == [("red", "shared"), ("square", "vision-only"), ("dog", "text-only"), (None, "unlabelled")]
    assert labels.labels[0].purity == pytest.approx(1.0)
    assert 0.5 < labels.labels[4].purity < 0.95 and labels.labels[4].label == "red"
    assert labels.features_for("red") == [0]
    assert labels.features_for("square", kinds=("vision-only",)) == [1]
    with pytest.raises(ValueError, match=r"no shared feature is labelled 'cat'; labelled concepts: \['red'\]"):
        labels.features_for("cat")
    labels.save(tmp_path / "labels.json")
    assert FeatureLabels.load(tmp_path / "labels.json") == labels


def test_concepts_from_captions():
    y, words = concepts_from_captions(["a red dog", "the red cat", "a blue dog on the left"], min_count=2)
    assert words == ["dog", "red"]
    assert y.tolist() == [[1, 1], [0, 1], [1, 0]]
    with pytest.raises(ValueError, match="no caption word occurs 9 times"):
        concepts_from_captions(["a b"], min_count=9)


def test_bootstrap_interval_covers_and_shrinks():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.binomial(1, 0.3, 100))
    big = bootstrap_ci(rng.binomial(1, 0.3, images_for_halfwidth(0.05)))
    assert big.low < 0.3 < big.high and big.halfwidth <= 0.05 < small.halfwidth
    assert images_for_halfwidth(0.05) == 385
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([0.1, float("nan")])


def test_cohens_h():
    assert cohens_h(0.5, 0.5) == 0.0
    assert cohens_h(0.9, 0.1) == pytest.approx(1.85, abs=0.01)


def test_interaction_test_detects_different_layer_profiles():
    rng = np.random.default_rng(0)
    layers = np.repeat(np.arange(4), 60)
    same = np.concatenate([rng.normal(layers * 0.3, 1.0), rng.normal(layers * 0.3 + 0.5, 1.0)])
    diff = np.concatenate([rng.normal(layers * 0.3, 1.0), rng.normal(-layers * 0.3, 1.0)])
    models = np.repeat(["a", "b"], 240)
    two_layers = np.concatenate([layers, layers])
    assert interaction_test(diff, models, two_layers, n_perm=300).p_value < 0.01
    assert interaction_test(same, models, two_layers, n_perm=300).p_value > 0.05
    with pytest.raises(ValueError, match=">= 2 models"):
        interaction_test(same[:240], models[:240], two_layers[:240])
