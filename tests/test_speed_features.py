"""Functional tests of the speed and memory features: what they compute must not change, what they save must be saved.

Timings are the benchmark's job (``python -m tools.benchmark``); nothing here measures time.
"""

from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedEvaluator
from torch import nn

import scripts.acceleration
from scripts.acceleration import loader_workers, set_tf32, usable_cores
from scripts.adapters import tensor_state
from scripts.handlers import MergeAdapters
from scripts.lora import LoRALinear, lora_modules
from scripts.network import SAM2LoRA
from tests.helpers import REPO, random_adapted_network
from tests.preloaded import preloaded_python

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def network() -> SAM2LoRA:
    return random_adapted_network(IMAGE_SIZE).eval()


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_image_encoder_runs_once_for_several_prompt_sets_per_image():
    network = random_adapted_network(IMAGE_SIZE).eval()
    encoder_calls = count_calls(network.sam2.image_encoder)
    images = torch.randn(2, 3, 80, 72)
    # three prompt sets per image, image-major: one point, two points (one negative), a box given as corners
    coords = torch.tensor([[[10.0, 12.0], [0.0, 0.0]], [[30.0, 40.0], [5.0, 60.0]], [[4.0, 6.0], [50.0, 70.0]]])
    labels = torch.tensor([[1, -1], [1, 0], [2, 3]])
    coords, labels = torch.cat([coords, coords + 3]), torch.cat([labels, labels])
    with torch.no_grad():
        embeddings = network.encode_images(images)
        decoded = network.decode(embeddings, coords, labels, prompts_per_image=3)
    assert encoder_calls[0] == 1
    assert decoded.logits.shape == (6, 1, 80, 72) and decoded.iou_predictions.shape == (6, 1)

    with torch.no_grad():
        for index in range(6):
            image = images[index // 3 : index // 3 + 1]
            alone = network.predict(image, coords[index : index + 1], labels[index : index + 1])
            torch.testing.assert_close(decoded.logits[index : index + 1], alone.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(decoded.iou_predictions[index], alone.iou_predictions[0], atol=1e-5, rtol=0)
    assert encoder_calls[0] == 7


def test_decode_checks_the_number_of_prompt_sets(network):
    with torch.no_grad():
        embeddings = network.encode_images(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
        with pytest.raises(ValueError, match=r"point_coords must have shape \(6, N, 2\)"):
            network.decode(embeddings, torch.zeros(4, 1, 2), torch.ones(4, 1), prompts_per_image=3)
        with pytest.raises(ValueError, match="positive integer"):
            network.decode(embeddings, prompts_per_image=0)
        assert network.decode(embeddings, prompts_per_image=2).logits.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE)


def test_merged_layer_is_a_plain_linear_product_that_compiles_without_graph_breaks():
    torch.manual_seed(0)
    layer = LoRALinear(16, 24, rank=4, alpha=8).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    unmerged = layer(x)
    # fullgraph=True fails on any graph break, e.g. a Python branch on a tensor such as the merged buffer
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), unmerged)
    layer.merge()
    torch.testing.assert_close(compiled(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=0, rtol=0)


def test_merged_state_follows_a_loaded_state_dict():
    torch.manual_seed(0)
    merged = LoRALinear(8, 8, rank=2, alpha=4)
    nn.init.normal_(merged.lora_B)
    merged.merge()
    fresh = LoRALinear(8, 8, rank=2, alpha=4)
    fresh.load_state_dict(merged.state_dict())
    assert fresh.merged
    fresh.unmerge()
    assert not fresh.merged and not bool(fresh.lora_merged)


def test_channels_last_switch_keeps_the_outputs(network):
    switched = random_adapted_network(IMAGE_SIZE, channels_last=True).eval()
    assert switched.sam2.image_encoder.trunk.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    points, labels = torch.tensor([[[20.0, 30.0]], [[40.0, 8.0]]]), torch.ones(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(switched(images, points, labels), network(images, points, labels), atol=1e-4, rtol=0)


def saved_tensor_bytes(network: SAM2LoRA, images: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes that autograd keeps for the backward pass of one forward pass (parameters excluded), and the loss."""
    parameters = {p.data_ptr() for p in network.parameters()}
    stored = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameters:
            stored[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = network(images).square().mean()
    return stored[0], loss


def test_activation_checkpointing_stores_less_and_gives_the_same_gradients():
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    plain = random_adapted_network(IMAGE_SIZE, lora_dropout=0.0).train()
    checkpointed = random_adapted_network(IMAGE_SIZE, lora_dropout=0.0, activation_checkpointing=True).train()
    plain_bytes, plain_loss = saved_tensor_bytes(plain, images)
    checkpointed_bytes, checkpointed_loss = saved_tensor_bytes(checkpointed, images)
    assert checkpointed_bytes < 0.7 * plain_bytes
    plain_loss.backward()
    checkpointed_loss.backward()
    plain_grads = {name: p.grad for name, p in plain.named_parameters() if p.requires_grad}
    checkpointed_grads = {name: p.grad for name, p in checkpointed.named_parameters() if p.requires_grad}
    assert plain_grads.keys() == checkpointed_grads.keys()
    assert any(grad.abs().sum() > 0 for name, grad in plain_grads.items() if "image_encoder" in name)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert set(checkpointed.state_dict()) == set(plain.state_dict()), "checkpointing must not rename weights"


def test_merge_adapters_handler_merges_for_the_run_only(network):
    """Merged for every iteration (an evaluator puts a network in training mode back into it after each one,
    which would unmerge the adapters from the second image on), unmerged and back in its mode afterwards."""
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    network.train()
    with torch.no_grad():
        expected = network.eval()(images)
    network.train()
    unmerged_weights = copy.deepcopy(tensor_state(network))
    seen_merged: list[bool] = []

    def forward(batch: torch.Tensor) -> torch.Tensor:
        seen_merged.append(all(layer.merged for _, layer in lora_modules(network.sam2)))
        return network(batch)

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[{"image": images, "label": torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)}] * 3,
        network=network,
        inferer=lambda batch, _: forward(batch),
        val_handlers=[MergeAdapters(network)],
        decollate=False,
    )
    evaluator.run()
    assert seen_merged == [True, True, True]
    torch.testing.assert_close(evaluator.state.output["pred"], expected, atol=1e-4, rtol=1e-4)
    assert not any(layer.merged for _, layer in lora_modules(network.sam2))
    assert network.training
    for key, value in tensor_state(network).items():
        torch.testing.assert_close(value, unmerged_weights[key], atol=1e-6, rtol=0)


def test_tf32_switch_sets_and_clears_cuda_precision():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        set_tf32(True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize(
    "cores, local_world_size, expected_cores, expected_workers",
    [(16, None, 16, 8), (16, "1", 16, 8), (16, "4", 4, 4), (16, "3", 5, 5), (16, "32", 1, 1), (16, "0", 16, 8),
     (16, "x", 16, 8), (2, None, 2, 2), (1, None, 1, 1)],
)
def test_each_rank_on_a_machine_takes_its_share_of_the_cores(monkeypatch, cores, local_world_size, expected_cores,
                                                             expected_workers):
    """Metric threads take a rank's share of the cores; loader workers the same, at most 8 (LOADER_WORKERS)."""
    monkeypatch.setattr(scripts.acceleration.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert usable_cores() == expected_cores
    assert loader_workers() == expected_workers
    assert loader_workers(most=3) == min(3, expected_cores)


def test_training_loaders_default_to_the_cores_share():
    """train.json's loaders (training, validation, evaluation) take ``loader_workers()`` unless told otherwise."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json"))
    assert parser.get_parsed_content("num_workers") == loader_workers()
    assert parser["train"]["dataloader"]["num_workers"] == parser["validate"]["dataloader"]["num_workers"] == "@num_workers"


# Page faults of each of four 48 MiB blocks malloc'd, written and freed in turn, in a process of its own: above the
# 32 MiB that glibc's dynamic mmap threshold reaches, so mapped afresh each time by default, as the activations at
# 1024 px are. (Tensors' own faults vary from run to run with torch's threads; glibc's are what this function sets.)
_FAULTS_OF_A_REUSED_BLOCK = """
import ctypes, ctypes.util, json, resource, sys
from scripts.acceleration import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(48 << 20)
    libc.memset(block, 1, 48 << 20)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "faults": [faults() for _ in range(4)]}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc (Linux)")
def test_memory_freed_stays_in_the_process_for_reuse():
    """Without it, a freed 48 MiB block goes back to the kernel and its 12288 pages fault in again when written."""
    measured = {}
    for mode in ("default", "keep"):
        result = preloaded_python().run(["-c", _FAULTS_OF_A_REUSED_BLOCK, mode], cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stderr
        measured[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    pages = 48 * 2**20 // 4096
    assert all(faults >= pages for faults in measured["default"]["faults"]), measured
    assert measured["keep"]["took"] is True, measured
    assert measured["keep"]["faults"][0] >= pages and max(measured["keep"]["faults"][1:]) < pages // 20, measured


def test_the_bundle_s_workflows_keep_freed_memory():
    """Training, inference and evaluation all gain from it (docs/performance.md)."""
    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    for name in ("train.json", "inference.json", "evaluate.json"):
        initialize = json.loads((configs / name).read_text())["initialize"]
        assert "$acceleration.keep_freed_memory()" in initialize, name
