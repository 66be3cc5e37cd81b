"""The LoRA-adapted Hiera encoder as a FlexibleUNet backbone in MONAI's registry, the U-Net head, fine-tuning modes
and self-describing model files."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import FlexibleUNet, ResNetEncoder
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from scripts.adapters import ModelFileError, read_model_settings
from scripts.errors import ConfigError
from scripts.lora import LoRALinear, lora_modules, remove_lora
from scripts.network import build_network
from scripts.sam2_models import CheckpointError, build_sam2_base
from scripts.unet import HieraEncoder, SAM2UNet, register_backbones
from tests.helpers import QUICKSTART, TRAIN, randomise_adapters

SIZE = 64


@pytest.fixture(scope="module")
def meta_checkpoint(module_folder):
    """A checkpoint in Meta's release format (seeded random SAM 2 Hiera-tiny: Meta's cannot be fetched offline)."""
    torch.manual_seed(5)
    state = build_sam2_base("tiny", image_size=SIZE).state_dict()
    path = module_folder("meta") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    return path, state


@pytest.fixture(scope="module")
def unet() -> SAM2UNet:
    torch.manual_seed(0)
    return SAM2UNet("tiny", random_init=True, image_size=SIZE).eval()


def test_the_four_hiera_sizes_are_registered_and_other_backbones_stay():
    names = {"sam2-hiera-tiny", "sam2-hiera-small", "sam2-hiera-base_plus", "sam2-hiera-large"}
    assert names <= set(FLEXUNET_BACKBONE.register_dict)
    assert FLEXUNET_BACKBONE.register_dict["sam2-hiera-large"]["feature_channel"] == (32, 144, 288, 576, 1152)
    assert FLEXUNET_BACKBONE.register_dict["resnet18"]["type"] is ResNetEncoder
    before = copy.copy(FLEXUNET_BACKBONE.register_dict)
    register_backbones()  # importing again (MONAI Label reloads bundles) changes nothing
    assert FLEXUNET_BACKBONE.register_dict == before


def test_flexible_unet_builds_the_adapted_encoder_and_keeps_the_image_size():
    torch.manual_seed(0)
    network = FlexibleUNet(in_channels=3, out_channels=2, backbone="sam2-hiera-tiny", spatial_dims=2).eval()
    assert isinstance(network.encoder, HieraEncoder)
    adapted = [name for name, _ in lora_modules(network.encoder.trunk)]
    assert len(adapted) == 12 and all(name.endswith("attn.qkv") for name in adapted)
    assert not any(p.requires_grad for name, p in network.encoder.trunk.named_parameters() if "lora_" not in name)
    with torch.no_grad():
        output = network(torch.randn(1, 3, 100, 150))  # not square, not a multiple of 32
    assert output.shape == (1, 2, 100, 150)


def test_the_encoder_s_levels_halve_from_stride_2_to_32():
    encoder = HieraEncoder("tiny").eval()
    with torch.no_grad():
        levels = encoder(torch.randn(1, 3, 96, 160))
    assert [tuple(level.shape[1:]) for level in levels] == [
        (32, 48, 80), (96, 24, 40), (192, 12, 20), (384, 6, 10), (768, 3, 5)
    ]


def test_untrained_adapters_leave_the_encoder_output_exactly_unchanged():
    torch.manual_seed(1)
    encoder = HieraEncoder("tiny").eval()
    plain = copy.deepcopy(encoder)
    remove_lora(plain.trunk)
    assert not list(lora_modules(plain))
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for adapted, base in zip(encoder(images), plain(images)):
            assert torch.equal(adapted, base)
        randomise_adapters(encoder, seed=3)
        assert not torch.equal(encoder(images)[2], plain(images)[2]), "trained adapters do change it"


def test_meta_checkpoint_loads_into_the_backbone_bit_for_bit(meta_checkpoint, tmp_path, monkeypatch):
    path, state = meta_checkpoint
    for pretrained in (path, True):
        if pretrained is True:  # torch hub's cache, where MONAI's backbones keep downloaded weights
            monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
            (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
            (tmp_path / "hub" / "checkpoints" / path.name).symlink_to(path)
        encoder = HieraEncoder("tiny", pretrained=pretrained)
        trunk = {k: v for k, v in encoder.trunk.state_dict().items() if not k.endswith(("lora_A", "lora_B", "lora_merged"))}
        expected = {k.removeprefix("image_encoder.trunk."): v for k, v in state.items() if k.startswith("image_encoder.trunk.")}
        assert trunk.keys() == expected.keys()
        assert all(torch.equal(trunk[key], expected[key]) for key in expected)


def test_a_checkpoint_of_another_size_is_refused_by_name(tmp_path):
    small = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": build_sam2_base("small", image_size=SIZE).state_dict()}, small)
    with pytest.raises(CheckpointError, match=rf"{small}.*Hiera-small.*model_size='small'"):
        HieraEncoder("tiny", pretrained=small)


def test_batch_independence(unet):
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        together = unet(images)
        alone = torch.cat([unet(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_any_image_size_comes_back_at_its_size(unet):
    with torch.no_grad():
        assert unet(torch.randn(1, 3, 101, 77)).shape == (1, 1, 101, 77)


def test_prompts_to_the_unet_head_get_a_clear_error(unet):
    with pytest.raises(ConfigError, match="architecture 'unet' segments without prompts"):
        unet(torch.randn(1, 3, SIZE, SIZE), point_coords=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1))


def trainable(network: torch.nn.Module) -> set[str]:
    return {name for name, parameter in network.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize("architecture", ["sam", "unet"])
def test_what_each_fine_tuning_mode_trains(architecture):
    networks = {
        mode: build_network(architecture, model_size="tiny", random_init=True, image_size=SIZE, finetune=mode)
        for mode in ("lora", "lora+decoder", "full")
    }
    lora, decoder, full = (trainable(networks[mode]) for mode in ("lora", "lora+decoder", "full"))
    adapters = {name for name in lora if name.endswith((".lora_A", ".lora_B"))}
    assert adapters
    if architecture == "sam":
        assert lora == adapters, "the paper's mode trains the adapters alone"
        assert decoder - lora and all(name.startswith("sam2.sam_mask_decoder.") for name in decoder - lora)
        assert not any(name.startswith("sam2.sam_mask_decoder.") and "lora_" not in name for name in lora)
    else:
        new = {name for name in lora if name.startswith(("encoder.stem.", "decoder.", "segmentation_head."))}
        assert lora == adapters | new, "adapters and the modules without pretrained weights"
        assert decoder == lora, "the U-Net decoder is new: it trains in both LoRA modes"
    all_parameters = {name for name, _ in networks["full"].named_parameters()}
    assert not any("lora_" in name for name in full)
    if architecture == "sam":
        # SAM 2's video memory and object pointers, its mask-prompt encoder and object-score head: one image's
        # segmentation never runs them, so they stay frozen (tests/test_network.py: every trainable weight gets a
        # gradient).
        video_and_unused = (
            "sam2.memory_", "sam2.maskmem_", "sam2.mask_downsample.", "sam2.obj_ptr", "sam2.no_obj_", "sam2.no_mem_pos",
            "sam2.sam_prompt_encoder.mask_downscaling.", "sam2.sam_mask_decoder.pred_obj_score_head.",
        )
        frozen = all_parameters - full
        assert frozen and all(name.startswith(video_and_unused) for name in frozen), sorted(frozen)[:5]
        assert not any(name.startswith(video_and_unused) for name in full)
    else:
        assert full == all_parameters


def test_adapter_file_carries_the_new_modules_too(meta_checkpoint, tmp_path):
    path, _ = meta_checkpoint
    torch.manual_seed(2)
    trained = SAM2UNet("tiny", checkpoint=path, image_size=SIZE).eval()
    randomise_adapters(trained, seed=3)
    with torch.no_grad():
        for parameter in trained.decoder.parameters():
            parameter.mul_(1.01)
        trained.train()(torch.randn(2, 3, SIZE, SIZE))  # batch-norm statistics (buffers) change as in training
    trained.eval()
    adapters = trained.save_adapters(tmp_path / "adapters.pt")
    restored = SAM2UNet("tiny", checkpoint=path, image_size=SIZE, adapter_checkpoint=adapters).eval()
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(trained(images), restored(images))
        trained.merge_adapters()
        torch.testing.assert_close(trained(images), restored(images), atol=1e-4, rtol=1e-4)
    trained.unmerge_adapters()
    assert adapters.stat().st_size < 0.5 * path.stat().st_size


def test_model_files_say_what_they_are(unet, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(unet.state_dict(), path)
    settings = read_model_settings(path)
    assert settings["architecture"] == "unet" and settings["image_size"] == SIZE
    assert settings["channel_names"] == ["vessels"] and settings["model_size"] == "tiny"
    other = SAM2UNet("tiny", weights_follow=True, image_size=2 * SIZE)
    with pytest.raises(ModelFileError, match=rf"image_size: trained with {SIZE}, this run sets {2 * SIZE}"):
        other.load_state_dict(torch.load(path, weights_only=True))
    same = SAM2UNet("tiny", weights_follow=True, image_size=SIZE).eval()
    same.load_state_dict(torch.load(path, weights_only=True))
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(same(images), unet(images))


def test_the_bundle_config_builds_the_unet_head():
    parser = ConfigParser()
    parser.read_config([TRAIN, QUICKSTART])
    parser.update({"architecture": "unet", "finetune": "full", "image_size": SIZE})
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, FlexibleUNet) and isinstance(network, SAM2UNet)
    assert network.settings["architecture"] == "unet" and network.settings["finetune"] == "full"
    assert parser.get_parsed_content("loss")._iou_source == [], "no IoU head to learn from"
    assert sum(isinstance(module, LoRALinear) for module in network.modules()) == 0
