"""Model zoo: exact RepDistiller parameter counts, feature lists, 56x56 inputs."""

from __future__ import annotations

import pytest
import torch

from reference_experiments.models import (
    MODEL_NAMES,
    count_parameters,
    create_model,
    feature_shapes,
)

torch.set_num_threads(1)

PARAMS_100 = {
    "resnet110": 1_736_564,
    "resnet32": 472_756,
    "wrn_40_2": 2_255_156,
    "wrn_16_2": 703_284,
    "vgg13": 9_462_180,
    "vgg8": 3_965_028,
}


@pytest.mark.parametrize("name", sorted(PARAMS_100))
def test_parameter_counts_match_repdistiller(name):
    assert count_parameters(create_model(name, 100)) == PARAMS_100[name]


def test_model_names_cover_required():
    assert set(PARAMS_100) | {"digits_cnn", "digits_mlp"} <= set(MODEL_NAMES)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet18", 10)


@pytest.mark.parametrize("name", sorted(PARAMS_100))
@pytest.mark.parametrize("size", [32, 56])
def test_forward_and_features(name, size):
    torch.manual_seed(0)
    model = create_model(name, 7).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model(x, return_features=True)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, logits2)
    # RepDistiller order: 5 maps (resnet/wrn) or 6 (vgg), last = pooled embedding
    assert len(feats) == (6 if name.startswith("vgg") else 5)
    emb = feats[-1]
    assert emb.dim() == 2 and emb.shape[0] == 2
    head = model.classifier if name.startswith("vgg") else model.fc
    assert emb.shape[1] == head.in_features
    torch.testing.assert_close(head(emb), logits)
    for f in feats[:-1]:
        assert f.dim() == 4 and f.shape[0] == 2
    # spatial resolution never increases along the list (hint layer = feats[2])
    sizes = [f.shape[-1] for f in feats[:-1]]
    assert sizes == sorted(sizes, reverse=True)
    assert feature_shapes(model, (3, size, size)) == [tuple(f.shape[1:]) for f in feats]


def test_feature_shapes_known_values_and_batch_dim():
    m = create_model("resnet32", 100)
    assert feature_shapes(m, (3, 32, 32)) == [
        (16, 32, 32),
        (16, 32, 32),
        (32, 16, 16),
        (64, 8, 8),
        (64,),
    ]
    assert feature_shapes(m, (4, 3, 56, 56))[3] == (4, 64, 14, 14)
    vgg = create_model("vgg8", 100)
    assert feature_shapes(vgg, (3, 32, 32))[3:] == [(512, 4, 4), (512, 4, 4), (512,)]
    # RepDistiller applies the 4th max-pool only to 64-pixel inputs
    assert feature_shapes(vgg, (3, 64, 64))[4] == (512, 4, 4)
    m.train()
    feature_shapes(m, (3, 32, 32))
    assert m.training  # flag restored


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp"])
def test_digits_models(name):
    model = create_model(name, 10, in_channels=1)
    x = torch.randn(5, 1, 8, 8)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (5, 10)
    assert len(feats) >= 4  # FitNets uses feats[2], VID feats[1:-1]
    assert feats[-1].dim() == 2
    assert len(feature_shapes(model, (1, 8, 8))) == len(feats)
    assert count_parameters(model) < 200_000


def test_in_channels():
    m = create_model("wrn_16_2", 10, in_channels=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
