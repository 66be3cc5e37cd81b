from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from PIL import Image
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torch import nn

from scripts.adapters import ModelFileError, read_model_file, tensor_state
from scripts.errors import ConfigError
from scripts.inferers import FundusInferer
from scripts.lora import LoRALinear, lora_modules
from scripts.network import SAM2LoRA
from scripts.prompts import PROMPT_MODES, parse_prompt
from scripts.sam2_models import HIERA_SIZES, CheckpointError, build_sam2_base, checkpoint_hiera_size
from tests.helpers import TRAIN, parameters_on_meta_device, randomise_adapters

IMAGE_SIZE = 64  # the smallest size Hiera accepts; keeps every test fast on a CPU
SAM_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
SAM_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_network(**kwargs) -> SAM2LoRA:
    torch.manual_seed(0)
    settings = {"model_size": "tiny", "random_init": True, "image_size": IMAGE_SIZE, **kwargs}
    return SAM2LoRA(**settings)


def without_adapters(network: SAM2LoRA) -> SAM2LoRA:
    """A copy whose LoRA layers are plain nn.Linear layers holding the same base weights."""
    plain = copy.deepcopy(network)
    for name, layer in list(lora_modules(plain.sam2)):
        linear = nn.Linear(layer.in_features, layer.out_features)
        linear.weight, linear.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(plain.sam2.get_submodule(parent_name), child, linear)
    assert not list(lora_modules(plain.sam2))
    return plain


@pytest.fixture(scope="module")
def network() -> SAM2LoRA:
    """One tiny network for the module: building one takes seconds, copying it a fraction."""
    return tiny_network().eval()


@pytest.fixture
def fresh(network) -> SAM2LoRA:
    """A copy of the module's network that a test may change."""
    return copy.deepcopy(network)


@pytest.fixture(scope="module")
def meta_checkpoint(module_folder) -> tuple:
    """A checkpoint in Meta's release format, written from a randomly initialised SAM 2 Hiera-tiny."""
    torch.manual_seed(123)
    base = build_sam2_base("tiny", image_size=IMAGE_SIZE)
    path = module_folder("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": base.state_dict()}, path)
    return path, base.state_dict()


def test_untrained_adapted_model_is_exactly_sam2(network):
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    points = torch.tensor([[[10.0, 20.0]], [[40.0, 30.0]]])
    labels = torch.ones(2, 1, dtype=torch.int64)
    plain = without_adapters(network)
    with torch.no_grad():
        assert torch.equal(network(images), plain(images))
        assert torch.equal(network(images, points, labels), plain(images, points, labels))


@pytest.mark.parametrize("height, width", [(IMAGE_SIZE, IMAGE_SIZE), (3 * IMAGE_SIZE - 10, 2 * IMAGE_SIZE + 6)])
def test_forward_reproduces_sam2_image_predictor(network, height, width):
    """Our decoding path agrees with the sam2 package's own single-image predictor on the same base weights, also
    for a photograph larger than the network's input, which both shrink with anti-aliasing."""
    plain = without_adapters(network)
    predictor = SAM2ImagePredictor(plain.sam2)
    predictor._bb_feat_sizes = [(IMAGE_SIZE // s, IMAGE_SIZE // s) for s in (4, 8, 16)]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    point, label = np.array([[21.0, 37.0]]), np.array([1])
    predictor.set_image(image)
    expected, expected_iou, _ = predictor.predict(point, label, multimask_output=False, return_logits=True)

    tensor = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - SAM_MEAN) / SAM_STD
    with torch.no_grad():
        ours = network.predict(tensor, torch.tensor(point[None]).float(), torch.tensor(label[None]))
    np.testing.assert_allclose(ours.logits[0, 0].numpy(), expected[0], atol=1e-4)
    np.testing.assert_allclose(ours.iou_predictions[0].numpy(), expected_iou, atol=1e-5)


def test_prompts_in_a_non_square_photographs_pixels_reach_the_decoder_as_sam2_image_predictor_puts_them(network):
    """A point and a box in a 100 x 40 photograph's pixels (a prompts file, a MONAI Label click) decoded by the
    bundle's inferer give the logits of sam2's own predictor told the same photograph's size and prompts. Both see the
    same network picture (the photograph resized to the network's square), so only the prompts' mapping is compared;
    the image comes without a collated batch's metadata, as MONAI Label hands it over."""
    height, width = 40, 100
    rng = np.random.default_rng(3)
    photograph = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    picture = np.asarray(Image.fromarray(photograph).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    point, box = [80.0, 12.0], [10.0, 5.0, 60.0, 30.0]

    predictor = SAM2ImagePredictor(without_adapters(network).sam2)
    predictor._bb_feat_sizes = [(IMAGE_SIZE // s, IMAGE_SIZE // s) for s in (4, 8, 16)]
    predictor.set_image(picture)
    predictor._orig_hw = [(height, width)]  # the frame the predictor maps prompts from
    _, _, low_res = predictor.predict(np.array([point]), np.array([1]), box=np.array(box), multimask_output=False,
                                      return_logits=True)
    expected = F.interpolate(torch.as_tensor(low_res)[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                             align_corners=False)

    tensor = (torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255 - SAM_MEAN) / SAM_STD
    image = MetaTensor(tensor, meta={"filename_or_obj": "/data/photo.png", "spatial_shape": np.array([height, width])})
    inferer = FundusInferer(image_size=IMAGE_SIZE).with_prompts(
        {"photo.png": {"points": [[*point, 1]], "box": box}}, {"photo.png": (height, width)}, "test"
    )
    with torch.no_grad():
        ours = inferer(image, network)
    assert ours.shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(ours[0, 0].numpy(), expected[0, 0].numpy(), atol=1e-4)
    with torch.no_grad():
        prompt_free = network(tensor)
    assert (ours - prompt_free).abs().max() > 1e-3, "the prompt was used"
    assert inferer.prompts_used["photo.png"]["given"] == {"points": [[*point, 1]], "box": box}


def test_merged_equals_unmerged_and_unmerge_restores_weights(fresh):
    network = fresh
    randomise_adapters(network)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    before = {k: v.clone() for k, v in tensor_state(network).items()}
    with torch.no_grad():
        unmerged = network(images)
        network.merge_adapters()
        merged = network(images)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    network.unmerge_adapters()
    for key, value in tensor_state(network).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_adapters_change_the_output(fresh):
    network = fresh
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        untrained = network(images)
        randomise_adapters(network)
        adapted = network(images)
    assert (adapted - untrained).abs().max() > 1e-3


def test_a_merged_layer_refuses_to_train_unless_its_network_unmerges_it(fresh):
    """A LoRA layer switched to training on its own while merged refuses (its gradient would reach the merged
    weight, not the adapters); the network's ``train()`` unmerges its layers first."""
    network = fresh
    network.merge_adapters()
    _, layer = next(iter(lora_modules(network)))
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, layer.in_features))
    network.train()(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert not layer.merged


def test_only_adapters_train_and_a_step_changes_only_them(fresh):
    network = fresh.train()
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert len(trainable) == 2 * len(network.adapted_layers)

    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=3e-4)
    target = (torch.rand(2, 1, 80, 72) > 0.8).float()
    loss = nn.functional.binary_cross_entropy_with_logits(network(torch.randn(2, 3, 80, 72)), target)
    loss.backward()
    optimiser.step()
    changed = {name for name, p in network.named_parameters() if not torch.equal(p, before[name])}
    assert changed, "the step changed nothing"
    assert changed <= trainable
    assert any(name.endswith(".lora_B") for name in changed)


@pytest.mark.parametrize("finetune", ["lora", "lora+decoder", "full"])
def test_every_trainable_weight_gets_a_gradient_from_a_training_step(finetune):
    """DistributedDataParallel waits for a gradient of each trainable weight in every step (a weight left without
    one stops a multi-GPU run), and the trainable count should be what trains: SAM 2's video memory, mask-prompt
    encoder and object-score head, which one image's segmentation never runs, stay frozen in every mode."""
    torch.manual_seed(0)
    network = SAM2LoRA(model_size="tiny", random_init=True, image_size=64, finetune=finetune).train()
    prompted = network(
        torch.randn(2, 3, 64, 64),
        point_coords=torch.tensor([[[10.0, 20.0], [30.0, 30.0]], [[5.0, 5.0], [0.0, 0.0]]]),
        point_labels=torch.tensor([[1, 2], [0, -1]]),
    )
    (prompted.mean() + network.latest_iou_predictions.mean()).backward()  # the loss reads both, as training's does
    without = [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert not without, without
    frozen = {name for name, p in network.named_parameters() if not p.requires_grad}
    assert any(name.startswith("sam2.memory_encoder.") for name in frozen)
    assert any(".pred_obj_score_head." in name for name in frozen)
    if finetune == "full":
        assert not any(name.startswith(("sam2.image_encoder.", "sam2.sam_mask_decoder.transformer.")) for name in frozen)


def test_batch_independence_with_per_image_prompts(network):
    torch.manual_seed(5)
    images = torch.randn(3, 3, 96, 80)
    points = torch.tensor([[[10.0, 12.0], [50.0, 60.0]], [[70.0, 5.0], [0.0, 0.0]], [[33.0, 44.0], [20.0, 20.0]]])
    labels = torch.tensor([[1, 0], [1, -1], [1, 1]])
    randomised = copy.deepcopy(network)
    randomise_adapters(randomised)
    with torch.no_grad():
        for model in (network, randomised):
            batched = model(images, points, labels)
            for i in range(3):
                alone = model(images[i : i + 1], points[i : i + 1], labels[i : i + 1])
                torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
            prompt_free = model(images)
            for i in range(3):
                torch.testing.assert_close(prompt_free[i : i + 1], model(images[i : i + 1]), atol=1e-5, rtol=1e-5)


def test_each_image_is_decoded_with_its_own_prompts(network):
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE).expand(2, -1, -1, -1)
    points = torch.tensor([[[5.0, 5.0]], [[60.0, 60.0]]])
    labels = torch.ones(2, 1, dtype=torch.int64)
    with torch.no_grad():
        out = network(images, points, labels)
    assert (out[0] - out[1]).abs().max() > 1e-4, "different prompts on the same image gave the same mask"


def test_box_prompts_are_corner_points(network):
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 60.0, 30.0]])
    corners = boxes.view(2, 2, 2)
    corner_labels = torch.tensor([[2, 3], [2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(network(images, boxes=boxes), network(images, corners, corner_labels))


def test_output_has_the_input_size_for_non_square_images():
    network = tiny_network(out_channels=2).eval()
    with torch.no_grad():
        output = network.predict(torch.randn(1, 3, 584, 565))
    assert output.logits.shape == (1, 2, 584, 565)
    assert output.iou_predictions.shape == (1, 2)


def test_bad_inputs_and_settings_are_named(network):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        network(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="together"):
        network(torch.randn(1, 3, 64, 64), point_coords=torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="out_channels"):
        tiny_network(out_channels=5)
    with pytest.raises(ValueError, match="Setting .model_size. must be one of base_plus, large, small, tiny"):
        tiny_network(model_size="huge")
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_network(image_size=100)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        tiny_network(lora_targets=["image_encoder.trunk.blocks.*.attn.qkvv"])


def test_random_initialisation_must_be_explicit_and_is_logged(caplog, tmp_path):
    with pytest.raises(CheckpointError, match=r"sam2\.1_hiera_tiny\.pt.*random_init=True"):
        SAM2LoRA("tiny", image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"not \['checkpoint', 'random_init'\]"):
        SAM2LoRA("tiny", image_size=IMAGE_SIZE, checkpoint=tmp_path / "x.pt", random_init=True)
    with caplog.at_level(logging.WARNING, logger="scripts.network"):
        tiny_network()
    assert any("RANDOM weights" in record.getMessage() for record in caplog.records)


def test_meta_checkpoint_round_trip(meta_checkpoint, caplog):
    path, state_dict = meta_checkpoint
    with caplog.at_level(logging.WARNING):
        network = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE)
    assert not any("RANDOM" in record.getMessage() for record in caplog.records)
    loaded = network.sam2.state_dict()
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key
    # the base weights keep Meta's keys, so the adapted network's base writes back in Meta's format
    extra = set(loaded) - set(state_dict)
    assert extra and all(key.endswith((".lora_A", ".lora_B", ".lora_merged")) for key in extra)


def test_adapter_only_round_trip(meta_checkpoint, tmp_path):
    path, _ = meta_checkpoint
    trained = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE).eval()
    randomise_adapters(trained, seed=7)
    adapter_file = trained.save_adapters(tmp_path / "adapters.pt")
    assert adapter_file.stat().st_size < 0.1 * path.stat().st_size

    restored = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, adapter_checkpoint=adapter_file).eval()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(trained(images), restored(images))

    other_rank = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, lora_rank=8)
    with pytest.raises(ModelFileError, match=r"adapters\.pt.*lora_rank: trained with 32, this run sets 8"):
        other_rank.load_adapters(adapter_file)
    with pytest.raises(ModelFileError, match="not an adapter file of this bundle"):
        other_rank.load_adapters(path)


def test_an_adapter_file_is_refused_on_other_base_weights(meta_checkpoint, tmp_path, caplog):
    """Adapters are right on their base alone: on another file of the same shapes they segmented wrongly, silently."""
    path, state_dict = meta_checkpoint
    trained = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE)
    randomise_adapters(trained, seed=5)
    adapter_file = trained.save_adapters(tmp_path / "adapters.pt")
    other = dict(state_dict)
    key = next(k for k in other if k.startswith("image_encoder.") and k.endswith(".weight"))
    other[key] = other[key].clone()
    other[key].view(-1)[0] += 1e-6  # one value of one tensor
    other_path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": other}, other_path)
    with pytest.raises(ModelFileError, match=r"adapters\.pt was trained on other base weights than this network's.*"
                       r"sam2\.1_hiera_tiny\.pt the bundle names .*download_large_files"):
        SAM2LoRA("tiny", checkpoint=other_path, image_size=IMAGE_SIZE, adapter_checkpoint=adapter_file)
    payload = torch.load(adapter_file, weights_only=True)
    del payload["base_digest"]  # as bundle 0.3.19 and earlier wrote them
    torch.save(payload, tmp_path / "adapters_0.3.19.pt")
    with caplog.at_level(logging.WARNING):
        SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, adapter_checkpoint=tmp_path / "adapters_0.3.19.pt")
    assert "does not record its base weights: they cannot be checked" in caplog.text


def test_adapters_saved_after_a_merge_and_unmerge_load_on_their_own_base(meta_checkpoint, tmp_path, caplog):
    """Merging and unmerging changes base weights in their last bits: the adapter file still names the base it
    was loaded on (it was refused there, as trained on other base weights). A network loaded merged cannot know
    its base: its file records none, with a warning, and loads with one."""
    path, _ = meta_checkpoint
    trained = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE).eval()
    randomise_adapters(trained, seed=11)
    before = {key: value.clone() for key, value in tensor_state(trained).items()}
    trained.merge_adapters()
    trained.unmerge_adapters()
    after = tensor_state(trained)
    assert any(not torch.equal(before[key], after[key]) for key in before), "the round trip should change some bits"
    adapter_file = trained.save_adapters(tmp_path / "adapters.pt")
    restored = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, adapter_checkpoint=adapter_file).eval()
    assert all(torch.equal(value, trained.adapter_state_dict()[key]) for key, value in restored.adapter_state_dict().items())

    trained.merge_adapters()
    loaded_merged = SAM2LoRA("tiny", random_init=True, image_size=IMAGE_SIZE).eval()
    loaded_merged.load_state_dict(trained.state_dict())
    loaded_merged.unmerge_adapters()
    with caplog.at_level(logging.WARNING):
        unknown_base = loaded_merged.save_adapters(tmp_path / "adapters_unknown_base.pt")
    assert "records no base weights to check them against" in caplog.text
    assert torch.load(unknown_base, weights_only=True)["base_digest"] is None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, adapter_checkpoint=unknown_base)
    assert "does not record its base weights: they cannot be checked" in caplog.text


def test_an_adapter_file_of_0_3_10_with_the_object_score_head_still_loads(meta_checkpoint, tmp_path, caplog):
    """lora+decoder files of 0.3.10 and earlier also held the object-score head, which got no gradient and is
    frozen since: its weights (Meta's, unchanged) are left out with a warning instead of refusing the file."""
    path, _ = meta_checkpoint
    trained = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, finetune="lora+decoder").eval()
    randomise_adapters(trained, seed=3)
    payload = torch.load(trained.save_adapters(tmp_path / "adapters.pt"), weights_only=True)
    head = {k: v for k, v in trained.state_dict().items() if ".pred_obj_score_head." in k}
    assert head and not set(head) & set(payload["state_dict"]), "0.3.11 files leave the frozen head out"
    payload["state_dict"].update(head)
    old_file = tmp_path / "adapters_0.3.10.pt"
    torch.save(payload, old_file)
    with caplog.at_level(logging.WARNING):
        restored = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, finetune="lora+decoder",
                            adapter_checkpoint=old_file).eval()
    assert f"holds {len(head)} weights of parts this network never runs" in caplog.text
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(trained(images), restored(images))


def test_a_lora_decoder_adapter_file_is_refused_by_a_lora_network(meta_checkpoint, tmp_path):
    """A lora network keeps the decoder at Meta's values: loading a lora+decoder file into it would silently run
    Meta's decoder instead of the trained one."""
    path, _ = meta_checkpoint
    trained = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, finetune="lora+decoder")
    adapter_file = trained.save_adapters(tmp_path / "adapters.pt")
    lora_only = SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE, finetune="lora")
    with pytest.raises(ModelFileError, match=r"finetune='lora\+decoder'.*keeps at Meta's values.*sam_mask_decoder"):
        lora_only.load_adapters(adapter_file)


def test_full_state_dict_round_trip_preserves_merged_state(network):
    trained = copy.deepcopy(network)
    randomise_adapters(trained)
    trained.merge_adapters()
    restored = copy.deepcopy(network)
    restored.load_state_dict(trained.state_dict())
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(trained(images), restored(images))
    restored.unmerge_adapters()
    trained.unmerge_adapters()
    torch.testing.assert_close(tensor_state(restored), tensor_state(trained))
    assert restored.state_dict()["_extra_state"] == trained.state_dict()["_extra_state"]


def test_weights_loaded_merged_unmerge_to_train(network):
    """A merged archive's model.pt (MONAI Label trains the model it serves): training mode unmerges the adapters,
    and the step trains them apart from the base weights."""
    trained = copy.deepcopy(network)
    randomise_adapters(trained)
    unmerged_state = {key: value.clone() for key, value in tensor_state(trained).items()}
    trained.merge_adapters()
    restored = copy.deepcopy(network)
    restored.load_state_dict(trained.state_dict())
    assert all(layer.merged for _, layer in lora_modules(restored))
    restored.train()
    assert not any(layer.merged for _, layer in lora_modules(restored))
    torch.testing.assert_close(tensor_state(restored), unmerged_state, atol=1e-6, rtol=0)
    restored(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)).sum().backward()
    assert all(layer.lora_B.grad is not None for _, layer in lora_modules(restored))


def test_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "sam2.1_hiera_tiny.pt"
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist") as caught:
        SAM2LoRA("tiny", checkpoint=missing, image_size=IMAGE_SIZE)
    assert "--bundle_path <bundle folder>" in str(caught.value)
    # In a bundle (a downloaded one too), MONAI's command names that bundle's folder.
    (tmp_path / "large_files.yml").write_text("large_files: []\n")
    in_bundle = tmp_path / "models" / "sam2.1_hiera_tiny.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"download_large_files --bundle_path {tmp_path}` fetches it")):
        SAM2LoRA("tiny", checkpoint=in_bundle, image_size=IMAGE_SIZE)


def test_corrupt_checkpoint_is_named(meta_checkpoint, tmp_path):
    path, _ = meta_checkpoint
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{truncated}.*corrupt or truncated"):
        SAM2LoRA("tiny", checkpoint=truncated, image_size=IMAGE_SIZE)
    not_meta = tmp_path / "plain_state_dict.pt"
    torch.save({"state_dict": {}}, not_meta)
    with pytest.raises(CheckpointError, match=f"{not_meta}.*Meta's format"):
        SAM2LoRA("tiny", checkpoint=not_meta, image_size=IMAGE_SIZE)


def test_a_model_file_given_for_the_other_setting_says_which_setting_takes_it(meta_checkpoint, network, tmp_path):
    """Meta's base checkpoint and a trained model.pt are both .pt files: a user gives one for the other."""
    path, base_state = meta_checkpoint
    trained = tmp_path / "model.pt"
    torch.save(network.state_dict(), trained)
    for given in (trained, tmp_path / "wrapped.pt"):
        if given.name == "wrapped.pt":
            torch.save({"model": network.state_dict()}, given)
        with pytest.raises(CheckpointError, match=f"{given}.*trained with this bundle.*--ckpt_path") as error:
            SAM2LoRA("tiny", checkpoint=given, image_size=IMAGE_SIZE)
        assert len(str(error.value)) < 300, "one line, not every key"
    bare = tmp_path / "bare.pt"
    torch.save(base_state, bare)
    with pytest.raises(CheckpointError, match=r"bare state dict; save it as torch.save\(\{'model'"):
        SAM2LoRA("tiny", checkpoint=bare, image_size=IMAGE_SIZE)
    with pytest.raises(ModelFileError, match=f"{path} is a SAM 2 base checkpoint.*--base_checkpoint to train from"):
        read_model_file(path)


def test_checkpoint_of_another_hiera_size_is_named(tmp_path):
    small = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": build_sam2_base("small", image_size=IMAGE_SIZE).state_dict()}, small)
    with pytest.raises(CheckpointError, match=f"{small}.*Hiera-small.*network is Hiera-tiny"):
        SAM2LoRA("tiny", checkpoint=small, image_size=IMAGE_SIZE)


def test_checkpoint_lacking_segmentation_weights_is_refused(meta_checkpoint, tmp_path):
    _, state_dict = meta_checkpoint
    partial = {k: v for k, v in state_dict.items() if not k.startswith("sam_mask_decoder.")}
    path = tmp_path / "partial.pt"
    torch.save({"model": partial}, path)
    with pytest.raises(CheckpointError, match="lacks .* weights of the segmentation network"):
        SAM2LoRA("tiny", checkpoint=path, image_size=IMAGE_SIZE)


@pytest.mark.parametrize("size", sorted(HIERA_SIZES))
def test_default_rank_trains_under_five_percent(size):
    with parameters_on_meta_device():
        network = SAM2LoRA(size, random_init=True)
        base = build_sam2_base(size)
    trainable, total = network.count_parameters()
    assert 0 < trainable < 0.05 * total
    used = sum(
        p.numel() for name, p in base.named_parameters() if name.startswith(("image_encoder", "sam_", "no_mem"))
    )
    assert trainable < 0.05 * used, "under 5% even of the parameters the segmentation path uses"
    assert sum(isinstance(m, LoRALinear) for m in network.modules()) == HIERA_SIZES[size].num_blocks + 28
    assert checkpoint_hiera_size(base.state_dict()) == HIERA_SIZES[size]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runs_on_cuda(fresh):
    network = fresh.cuda().eval()
    with torch.no_grad():
        output = network(torch.randn(1, 3, 80, 72, device="cuda"))
    assert output.device.type == "cuda" and output.shape == (1, 1, 80, 72)


def test_all_eight_prompt_modes_decoded_together_equal_one_call_per_mode(fresh):
    """Evaluation over the eight prompt modes decodes all of an image's prompts in one batched call, the shorter
    ones padded with ignored points: each mode's logits equal those of the mode decoded alone, for two images of a
    batch with references of their own, and the decoder runs once for the prompt-free answer and once per image."""
    randomise_adapters(fresh)
    height, width = 50, 70
    torch.manual_seed(4)
    tensor = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    label = torch.zeros(2, 1, height, width)
    label[0, 0, 10:30, 20:50] = 1
    label[1, 0, 25:45, 5:30] = 1
    images = MetaTensor(tensor, meta={"filename_or_obj": ["a.png", "b.png"],
                                      "spatial_shape": torch.tensor([[height, width], [height, width]])})
    modes = list(PROMPT_MODES)
    inferer = FundusInferer(image_size=IMAGE_SIZE, prompt_modes=modes)
    calls = []
    decode = fresh.decode
    fresh.decode = lambda *args, **kwargs: calls.append(kwargs.get("prompts_per_image", 1)) or decode(*args, **kwargs)
    with torch.no_grad():
        logits = inferer(images, fresh, label=label)
    del fresh.decode
    assert logits.shape == (2, len(modes), IMAGE_SIZE, IMAGE_SIZE)

    with torch.no_grad():
        embeddings = fresh.encode_images(tensor)
        for index, name in enumerate(["a.png", "b.png"]):
            one = type(embeddings)(embeddings.image_embedding[index : index + 1],
                                   tuple(h[index : index + 1] for h in embeddings.high_res_features),
                                   embeddings.input_size)
            lengths = set()
            for position, mode in enumerate(modes):
                prompt = parse_prompt(inferer.prompts_used[name][mode], name, (height, width))
                alone = fresh.decode(one, **prompt.to_network((height, width), (IMAGE_SIZE, IMAGE_SIZE)))
                torch.testing.assert_close(logits[index, position], alone.logits[0, 0], atol=1e-4, rtol=1e-4)
                if not prompt.empty:
                    lengths.add(len(prompt.points) + 2 * (prompt.box is not None))
            assert len(lengths) == 5  # 1, 2 (box, 2_points, auto_box), 3 (auto_points), 5, 7 points
    # The prompt-free decode of the batch, then per image one call for its seven prompted modes.
    assert calls == [1, 7, 7]


def test_an_evaluations_record_keeps_the_prompts_of_photographs_that_share_a_file_name(fresh):
    """Pooled datasets number their photographs alike (two clinics' 01.png): evaluation records each image's
    prompts under its path, as metrics_per_image.csv names it, so the second does not replace the first's."""
    height, width = 50, 70
    paths = ["/data/DRIVE/images/01.png", "/data/CHASE/images/01.png"]
    images = MetaTensor(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),
                        meta={"filename_or_obj": paths, "spatial_shape": torch.tensor([[height, width]] * 2)})
    label = torch.zeros(2, 1, height, width)
    label[0, 0, 10:30, 20:50] = 1
    label[1, 0, 25:45, 5:30] = 1
    inferer = FundusInferer(image_size=IMAGE_SIZE, prompt_modes=["none", "box"])
    with torch.no_grad():
        inferer(images, fresh.eval(), label=label)
    assert inferer.prompts_used[paths[0]]["box"]["box"] == [20, 10, 49, 29]
    assert inferer.prompts_used[paths[1]]["box"]["box"] == [5, 25, 29, 44]


def test_automatic_prompts_of_each_image_get_that_images_field_of_view(fresh, monkeypatch):
    """Automatic negative points go inside the field of view, not into the photograph's black border."""
    from scripts import inferers

    seen = []
    draw = inferers.auto_prompts
    monkeypatch.setattr(inferers, "auto_prompts", lambda *args, **kwargs: seen.append(kwargs["fov"]) or draw(*args, **kwargs))
    rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    fov = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    fov[0, 0] = torch.from_numpy((rows - 32) ** 2 + (cols - 32) ** 2 <= 28**2)
    fov[1, 0, 8:56, 4:60] = 1
    images = MetaTensor(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), meta={
        "filename_or_obj": ["a.png", "b.png"], "spatial_shape": torch.tensor([[50, 70], [50, 70]])})
    inferer = FundusInferer(image_size=IMAGE_SIZE, prompt_source="auto_points", auto_negative_points=2)
    with torch.no_grad():
        inferer(images, fresh, fov=fov)
    assert len(seen) == 2
    for index, retina in enumerate(seen):
        assert np.array_equal(retina, fov[index, 0].numpy() > 0.5), index


def test_a_prompt_mode_named_twice_is_refused():
    with pytest.raises(ConfigError, match="names 'box' more than once"):
        FundusInferer(image_size=IMAGE_SIZE, prompt_modes=["none", "box", "box"])


def test_ignored_points_leave_each_prompt_set_as_it_is_alone(fresh):
    """A one-point set padded to the length of a box-and-five-points set decodes as it does alone when the padding
    is ignored, and not when it is not (SAM's padding tokens are attended to)."""
    randomise_adapters(fresh)
    torch.manual_seed(5)
    with torch.no_grad():
        embeddings = fresh.encode_images(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        one = {"point_coords": torch.tensor([[[20.0, 30.0]]]), "point_labels": torch.tensor([[1]])}
        seven = {
            "point_coords": torch.tensor([[[5.0, 5.0], [50.0, 40.0], [10.0, 12.0], [30, 20], [40, 9], [8, 33], [25, 25]]]),
            "point_labels": torch.tensor([[2, 3, 1, 1, 0, 1, 0]]),
        }
        alone = [fresh.decode(embeddings, **prompt) for prompt in (one, seven)]
        coords = torch.cat([torch.nn.functional.pad(one["point_coords"], (0, 0, 0, 6)), seven["point_coords"]])
        labels = torch.cat([torch.nn.functional.pad(one["point_labels"], (0, 6), value=-1), seven["point_labels"]])
        ignored = torch.tensor([[False] + [True] * 6, [False] * 7])
        together = fresh.decode(embeddings, point_coords=coords, point_labels=labels, prompts_per_image=2,
                                ignored_points=ignored)
        attended = fresh.decode(embeddings, point_coords=coords, point_labels=labels, prompts_per_image=2)
    for position, expected in enumerate(alone):
        torch.testing.assert_close(together.logits[position], expected.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.iou_predictions[position], expected.iou_predictions[0], atol=1e-5, rtol=1e-5)
    assert (attended.logits[0] - alone[0].logits[0]).abs().max() > 1e-3, "padding that is attended to changes the answer"
    torch.testing.assert_close(attended.logits[1], alone[1].logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"ignored_points must have point_labels' shape \(2, 7\), got \(2, 6\)"):
        fresh.decode(embeddings, point_coords=coords, point_labels=labels, prompts_per_image=2, ignored_points=ignored[:, 1:])


def test_training_batches_decode_prompt_free_items_as_inference_does(fresh):
    """A training batch mixes prompt-free items (every slot padding) with prompted ones. Through the trainer's own
    prepare_batch (train.json), a prompt-free item decodes exactly as SAM 2's prompt-free input (one padding point)
    that inference and validation give, and a prompted one as its prompts alone; attended to, the padding slots
    would train the decoder on a prompt-free input that inference never gives."""
    from monai.bundle import ConfigParser
    from monai.data import list_data_collate

    from scripts.transforms import SamplePromptsd

    randomise_adapters(fresh)
    torch.manual_seed(7)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    label = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE)
    label[0, 20:40, 10:30] = 1
    items = []
    for no_prompt_prob in (1.0, 0.0):  # item 0 prompt-free, item 1 three points and a box
        sampler = SamplePromptsd(num_positive=3, use_box=True, no_prompt_prob=no_prompt_prob)
        sampler.set_random_state(3)
        items.append({"image": images[len(items)], "label": label, **sampler({"label": label})})
    batch = list_data_collate(items)
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser["architecture"] = "sam"
    inputs, _, _, kwargs = parser.get_parsed_content("train#prepare_batch")(batch, torch.device("cpu"))
    assert sorted(kwargs) == ["ignored_points", "point_coords", "point_labels"]
    with torch.no_grad():
        trained_on = fresh(inputs, **kwargs)
        prompt_free = fresh(images[:1])
        prompted = batch["point_labels"][1] != -1
        alone = fresh(images[1:], batch["point_coords"][1:, prompted], batch["point_labels"][1:, prompted])
        attended = fresh(inputs, batch["point_coords"], batch["point_labels"])
    torch.testing.assert_close(trained_on[0], prompt_free[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained_on[1], alone[0], atol=1e-5, rtol=1e-5)
    assert (attended[0] - prompt_free[0]).abs().max() > 1e-3, "five attended padding tokens are not SAM 2's input"
