"""The onnxruntime backend: PyTorch's answer from a cached export, rebuilt when stale or damaged, int8 on request,
and clear errors. Exports are of Hiera-tiny at 64 px (seconds); the figures at real sizes are the benchmark's."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from scripts import onnx_backend
from scripts.atomic import file_sha256
from scripts.errors import ConfigError
from scripts.inferers import FundusInferer
from scripts.lora import lora_modules
from scripts.network import SAM2LoRA, build_network
from scripts.onnx_backend import DeployError, OnnxBackend, PromptFreeSegmenter, inference_backend
from scripts.synthetic import write_dataset
from tests.helpers import (
    EVALUATE,
    FAST,
    INFER,
    TRAIN,
    fail_message,
    random_adapted_network,
    run_bundle,
    write_model_file,
)

pytest.importorskip("onnxruntime", reason="onnx, onnxscript and onnxruntime are the backend's optional dependencies")

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def network() -> SAM2LoRA:
    """A tiny network with non-zero adapters, as after training."""
    return random_adapted_network(IMAGE_SIZE).eval()


@pytest.fixture(scope="module")
def images() -> MetaTensor:
    generator = torch.Generator().manual_seed(1)
    return MetaTensor(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))


@pytest.fixture(scope="module")
def exported(network, module_folder) -> OnnxBackend:
    """One backend that exported the module's network into a cache of its own."""
    backend = OnnxBackend(module_folder("cache") / "model.onnxruntime.onnx")
    backend(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), network)
    return backend


def torch_logits(network: SAM2LoRA, images: torch.Tensor) -> torch.Tensor:
    network.merge_adapters()
    with torch.no_grad():
        return network(images.as_tensor() if isinstance(images, MetaTensor) else images)


def torch_iou(network: SAM2LoRA, images: torch.Tensor) -> torch.Tensor:
    """SAM's predicted IoU (B, C) of ``images`` from the PyTorch network itself."""
    network.merge_adapters()
    with torch.no_grad():
        return network.predict(images.as_tensor() if isinstance(images, MetaTensor) else images).iou_predictions


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_the_backend_gives_pytorchs_logits_through_the_bundles_inferer(network, images, exported):
    assert exported.rebuilt and exported.cache_path.is_file()
    logits = FundusInferer(image_size=IMAGE_SIZE, backend=exported)(images, network)
    assert isinstance(logits, MetaTensor) and logits.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(logits.as_tensor(), torch_logits(network, images), atol=1e-4, rtol=1e-4)


def test_the_backend_gives_pytorchs_predicted_iou_through_the_bundles_inferer(network, images, exported):
    """The SAM head's quality measure: what the inferer reports as ``last_iou`` (the measurements' predicted IoU and
    low-quality flags) is the PyTorch network's, through onnxruntime too, for any batch size."""
    outputs = {output.name: output.shape for output in exported.session.get_outputs()}
    assert list(outputs) == ["logits", "iou_predictions"]
    assert isinstance(outputs["iou_predictions"][0], str) and outputs["iou_predictions"][1:] == [1], "dynamic batch"

    three = MetaTensor(torch.cat([images.as_tensor(), images.as_tensor()[:1].flip(-1)]))  # exported with a batch of 2
    expected = torch_iou(network, three)
    assert expected.shape == (3, 1) and expected.std() > 1e-4, "images the head tells apart"
    by_torch, by_onnxruntime = FundusInferer(image_size=IMAGE_SIZE), FundusInferer(image_size=IMAGE_SIZE, backend=exported)
    with torch.no_grad():
        by_torch(three, network)
        by_onnxruntime(three, network)
    assert by_torch.last_iou is not None and by_onnxruntime.last_iou is not None
    torch.testing.assert_close(by_torch.last_iou, expected)
    torch.testing.assert_close(by_onnxruntime.last_iou, expected, atol=1e-5, rtol=1e-4)
    assert exported.latest_iou_predictions.shape == (3, 1)


def test_an_export_made_before_the_predicted_iou_was_an_output_is_rebuilt(network, images, exported, tmp_path, caplog):
    """A cache written by a version whose export had the logits alone: its record lacks the outputs, and run as it
    is it would report no predicted IoU (and flag nothing), so it is rebuilt, with a log line saying why."""
    cache = tmp_path / exported.cache_path.name
    sidecar = cache.with_name(cache.name + ".json")
    old = onnx.load(str(exported.cache_path))
    del old.graph.output[1:]  # the earlier one-output file: logits only
    onnx.save(old, str(cache))
    record = json.loads(exported.cache_path.with_name(exported.cache_path.name + ".json").read_text())
    assert record.pop("outputs") == ["logits", "iou_predictions"]
    sidecar.write_text(json.dumps({**record, "onnx_sha256": file_sha256(cache)}))
    assert [output.name for output in onnx_backend._session(cache).get_outputs()] == ["logits"]

    with caplog.at_level(logging.WARNING, logger="scripts.onnx_backend"):
        backend = OnnxBackend(cache)
        logits = backend(images, network)
    assert backend.rebuilt and "it was built from other outputs than logits and iou_predictions" in caplog.text
    assert json.loads(sidecar.read_text())["outputs"] == ["logits", "iou_predictions"]
    torch.testing.assert_close(logits, torch_logits(network, images), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(backend.latest_iou_predictions, torch_iou(network, images), atol=1e-5, rtol=1e-4)


def test_the_unet_head_exports_its_logits_alone():
    """No IoU head, no second output (and no predicted IoU reported)."""
    unet = build_network("unet", model_size="tiny", image_size=IMAGE_SIZE, channel_names=["vessels"], random_init=True)
    segmenter = PromptFreeSegmenter(unet.eval())
    assert segmenter.output_names == onnx_backend.export_outputs(unet) == ["logits"]
    images = segmenter.example(batch=1)
    with torch.no_grad():
        (logits,) = segmenter.outputs(images)
        torch.testing.assert_close(logits, unet(images), atol=0, rtol=0)
    assert "sam2lora.iou_predictions" not in onnx_backend.export_description(segmenter)


def test_the_export_logs_no_line_per_folded_constant_and_names_no_file_of_this_checkout(tmp_path, caplog):
    """The exporter's libraries log about 280 INFO lines for the U-Net head (a run's own lines would drown in them),
    and its nodes' stack traces named this checkout's files 3,000 times."""
    unet = build_network("unet", model_size="tiny", image_size=IMAGE_SIZE, channel_names=["vessels"], random_init=True)
    with caplog.at_level(logging.INFO):
        onnx_backend.export_onnx(PromptFreeSegmenter(unet.eval()), tmp_path / "unet.onnx")
    chatty = [record.name for record in caplog.records if record.name.startswith(("onnxscript", "onnx_ir", "torch"))]
    assert (tmp_path / "unet.onnx").is_file() and chatty == []
    assert logging.getLogger("onnx_ir").level == logging.NOTSET, "the exporter's loggers are given back as they were"
    assert b"onnx_backend.py" not in (tmp_path / "unet.onnx").read_bytes(), "no stack trace naming this checkout"


def test_a_later_run_reuses_the_cached_export(network, images, exported, caplog):
    modified = exported.cache_path.stat().st_mtime_ns
    later = OnnxBackend(exported.cache_path)
    with caplog.at_level(logging.INFO, logger="scripts.onnx_backend"):
        logits = later(images, network)
    assert not later.rebuilt and exported.cache_path.stat().st_mtime_ns == modified
    assert "using the cached export" in caplog.text
    torch.testing.assert_close(logits, torch_logits(network, images), atol=1e-4, rtol=1e-4)


def test_stale_damaged_or_unrecorded_caches_are_rebuilt_with_a_log_line(
    network, images, exported, tmp_path, caplog, monkeypatch
):
    cache = tmp_path / exported.cache_path.name
    sidecar = cache.with_name(cache.name + ".json")
    cache.write_bytes(exported.cache_path.read_bytes())
    sidecar.write_bytes(exported.cache_path.with_name(exported.cache_path.name + ".json").read_bytes())

    retrained = copy.deepcopy(network)
    with torch.no_grad():  # as another round of training would
        for parameter in retrained.sam2.sam_mask_decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    with caplog.at_level(logging.WARNING, logger="scripts.onnx_backend"):
        backend = OnnxBackend(cache)
        logits = backend(images, retrained)
    assert backend.rebuilt and "it was built from other weights" in caplog.text
    torch.testing.assert_close(logits, torch_logits(retrained, images), atol=1e-4, rtol=1e-4)
    assert (logits - torch_logits(network, images)).abs().max() > 1e-3, "the old export would answer otherwise"

    # Each other reason is detected, from the record alone (rebuilding for each would cost an export).
    rebuilt_file, rebuilt_record = cache.read_bytes(), sidecar.read_bytes()

    def stale_reason() -> str | None:
        backend = OnnxBackend(cache)
        return backend._stale_reason(sidecar, backend._settings(retrained), cache.read_bytes())

    assert stale_reason() is None
    for damage, message in (
        # e.g. another process's build of other weights, moved in after this one's record was written
        (lambda: cache.write_bytes(exported.cache_path.read_bytes()), "it is not the file its record"),
        (lambda: cache.write_bytes(rebuilt_file[:1000]), "it is not the file its record"),
        (lambda: sidecar.unlink(), "its record model.onnxruntime.onnx.json cannot be read"),
        (lambda: sidecar.write_text("null"), "its record model.onnxruntime.onnx.json is not a record of an export"),
        # a git pull or an upgrade that changes the network's code or the exporter
        (lambda: monkeypatch.setattr(onnx_backend, "code_fingerprint", lambda network: "0" * 64),
         "it was built from other code or library versions"),
    ):
        damage()
        assert message in stale_reason()
        cache.write_bytes(rebuilt_file)
        sidecar.write_bytes(rebuilt_record)
        monkeypatch.undo()

    # A file its record describes that onnxruntime cannot load (e.g. made for a newer onnxruntime) is rebuilt.
    cache.write_bytes(rebuilt_file[:1000])
    sidecar.write_text(json.dumps({**json.loads(rebuilt_record), "onnx_sha256": file_sha256(cache)}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.onnx_backend"):
        backend = OnnxBackend(cache)
        logits = backend(images, retrained)
    assert backend.rebuilt and "onnxruntime cannot load it" in caplog.text
    torch.testing.assert_close(logits, torch_logits(retrained, images), atol=1e-4, rtol=1e-4)

    # A rebuild refused (or killed) half-way leaves no record: its file never passes for the export it replaced.
    def refused(self, network, destination):
        destination.write_bytes(b"half of another export")
        raise DeployError("refused")

    monkeypatch.setattr(OnnxBackend, "_build", refused)
    with pytest.raises(DeployError):
        OnnxBackend(cache)(images, network)  # the original weights: the cache of the retrained ones is stale
    assert not sidecar.exists()


def test_a_build_removes_what_killed_builds_left_and_no_other_build_s_files(network, images, tmp_path):
    """SIGKILL during an int8 build left its float32 step (about a GB at Hiera-large) and a hidden partial file,
    which no later run removed."""
    cache = tmp_path / "model.onnxruntime-int8.onnx"
    killed_step = tmp_path / ".model.onnxruntime-int8.abc123"
    killed_step.mkdir()
    (killed_step / "float32.onnx").write_bytes(b"half an export")
    killed_partial = tmp_path / ".model.onnxruntime-int8.onnx.def456.onnx"
    killed_partial.write_bytes(b"half a quantization")
    running = tmp_path / ".model.onnxruntime-int8.onnx.ghi789.onnx"  # another process's build, under way
    running.write_bytes(b"being written")
    other_cache = tmp_path / ".model.onnxruntime.onnx.jkl012.onnx"  # the float32 cache's: not this build's
    other_cache.write_bytes(b"another cache's")
    day_old = time.time() - onnx_backend.LEFTOVER_AGE_S - 60
    for path in (killed_step, killed_partial, other_cache):
        os.utime(path, (day_old, day_old))
    OnnxBackend(cache, int8=True)(images, network)
    assert not killed_step.exists() and not killed_partial.exists()
    assert running.exists() and other_cache.exists()


def test_a_model_folder_that_cannot_be_written_exports_for_the_run_alone(network, images, tmp_path, monkeypatch,
                                                                          caplog):
    """A read-only mount or a shared install: the stale record could not be removed, and the run stopped with a
    traceback. The folder is read-only as os.access reports it (the tests run as root, whom chmod does not stop)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    (folder / "model.onnxruntime.onnx.json").write_text("{}")  # a stale record, left as it is
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    with caplog.at_level(logging.INFO, logger="scripts.onnx_backend"):
        logits = OnnxBackend(folder / "model.onnxruntime.onnx")(images, network)
    torch.testing.assert_close(logits, torch_logits(network, images), atol=1e-4, rtol=1e-4)
    assert sorted(path.name for path in folder.iterdir()) == ["model.onnxruntime.onnx.json"], "nothing written there"
    assert f"the model's folder {folder} cannot be written, so the export is not cached there" in caplog.text


def test_the_code_fingerprint_follows_the_libraries_and_the_networks_own_files(network, tmp_path, monkeypatch):
    first = onnx_backend.code_fingerprint(network)
    assert onnx_backend.code_fingerprint(copy.deepcopy(network)) == first
    version = onnx_backend.importlib.metadata.version
    monkeypatch.setattr(
        onnx_backend.importlib.metadata, "version", lambda name: "9.9" if name == "onnxscript" else version(name)
    )
    assert onnx_backend.code_fingerprint(network) != first
    monkeypatch.undo()

    # A module of a class defined in a file the network did not use before: that file's code counts.
    source = tmp_path / "extra_layers.py"
    source.write_text("import torch\n\nclass Doubling(torch.nn.Module):\n    def forward(self, x):\n        return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import extra_layers

    extended = copy.deepcopy(network)
    extended.extra = extra_layers.Doubling()
    with_extra = onnx_backend.code_fingerprint(extended)
    assert with_extra != first
    source.write_text(source.read_text().replace("2 * x", "3 * x"))
    assert onnx_backend.code_fingerprint(extended) != with_extra, "the file's code changed"

    # MONAI Label unloads the bundle's modules between requests: the bundle's own files still count.
    monkeypatch.delitem(sys.modules, "scripts.network")
    assert onnx_backend.code_fingerprint(network) == first


def test_the_quantizer_s_chatter_is_quieted_but_not_its_errors_nor_the_run_s_own_lines(caplog):
    from scripts.onnx_backend import _quantizer_logs_quiet

    root = logging.getLogger()
    with caplog.at_level(logging.INFO), pytest.raises(KeyError), _quantizer_logs_quiet():
        logging.info('Quantization parameters for tensor:"relu_8" not specified')  # noqa: LOG015 - as the quantizer logs
        logging.warning("Please consider to run pre-processing before quantization.")  # noqa: LOG015
        logging.getLogger("onnxruntime.quantization.onnx_quantizer").warning("its own logger's chatter")
        logging.error("a real error")  # noqa: LOG015
        logging.getLogger("scripts.inferers").info("the run's own line")
        raise KeyError("a failed quantization")
    assert [record.getMessage() for record in caplog.records] == ["a real error", "the run's own line"]
    assert not root.filters and logging.getLogger("onnxruntime").level == logging.NOTSET, "restored, even on error"


def test_int8_stores_int8_weights_and_keeps_the_masks(network, images, exported, tmp_path, caplog):
    backend = OnnxBackend(tmp_path / "model.onnxruntime-int8.onnx", int8=True)
    with caplog.at_level(logging.DEBUG):
        logits = backend(images, network)
    # onnxruntime's quantizer logs through the root logger: 92 of an int8 run's 116 lines were its chatter.
    chatter = [record.getMessage() for record in caplog.records if record.name == "root"]
    assert not chatter, chatter[:3]
    assert not logging.getLogger().filters and logging.getLogger("onnxruntime").level == logging.NOTSET
    assert backend.cache_path.stat().st_size < 0.5 * exported.cache_path.stat().st_size
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == [backend.cache_path.name, backend.cache_path.name + ".json"], "the float32 step is removed"
    reference = torch_logits(network, images)
    masks, expected = (logits > 0).numpy(), (reference > 0).numpy()
    dice = 2 * (masks & expected).sum() / (masks.sum() + expected.sum())
    assert dice > 0.9, dice
    assert 0 < (logits - reference).abs().max() < 0.5 * reference.abs().max()
    # The IoU head's matrix products are quantized too: close to PyTorch's, not equal.
    iou_difference = (backend.latest_iou_predictions - torch_iou(network, images)).abs().max()
    assert 0 < iou_difference < 0.05, iou_difference

    # One scale per output column of every quantized matrix product's weight (INT8_QUANTIZATION's per_channel).
    graph = onnx.load(str(backend.cache_path)).graph
    shapes = {initializer.name: list(initializer.dims) for initializer in graph.initializer}
    weights = [node.input[1] for node in graph.node if node.op_type == "MatMulInteger" and node.input[1] in shapes]
    assert weights, "the matrix products are quantized"
    for weight in weights:
        assert shapes[weight.removesuffix("_quantized") + "_scale"] == shapes[weight][-1:], weight
    # Convolutions stay float32 (INT8_QUANTIZATION's op_types): onnxruntime's ConvInteger is the slower one.
    operators = {node.op_type for node in graph.node}
    assert "Conv" in operators and "ConvInteger" not in operators, operators


def test_two_int8_builds_at_once_keep_their_own_float32_step(network, images, tmp_path, monkeypatch):
    """Another process's build of the same int8 cache runs to its end while this one has exported its float32
    step: each must quantize its own intermediate file, which the other neither replaces nor deletes."""
    cache_path = tmp_path / "model.onnxruntime-int8.onnx"
    export = onnx_backend.export_onnx
    interleaved = []

    def export_then_let_the_other_build_run(model, path, *args, **kwargs):
        written = export(model, path, *args, **kwargs)
        if not interleaved:
            interleaved.append(path)
            OnnxBackend(cache_path, int8=True)(images, network)
        return written

    monkeypatch.setattr(onnx_backend, "export_onnx", export_then_let_the_other_build_run)
    logits = OnnxBackend(cache_path, int8=True)(images, network)
    assert interleaved and logits.shape == torch_logits(network, images).shape
    assert sorted(path.name for path in tmp_path.iterdir()) == [cache_path.name, cache_path.name + ".json"]


def test_bad_backend_settings_and_unexportable_networks_are_named(network, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"backend 'tensorrt' is not one of torch, onnxruntime"):
        inference_backend("tensorrt", tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=r"onnx_int8 True needs backend 'onnxruntime'"):
        inference_backend("torch", tmp_path / "model.pt", int8=True)
    backend = inference_backend("onnxruntime", tmp_path / "model.pt", int8=True)
    assert backend.cache_path == tmp_path / "model.onnxruntime-int8.onnx"
    import onnxruntime

    with monkeypatch.context() as patch:
        patch.setattr(onnxruntime, "__version__", "1.22.1")
        with pytest.raises(ConfigError, match=r"needs onnxruntime 1.23 or later \(its exports use opset 23\); installed: 1.22.1"):
            inference_backend("onnxruntime", tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=r"Prompts need backend 'torch'"):
        FundusInferer(image_size=IMAGE_SIZE, prompt_source="auto_box", backend=backend)
    with pytest.raises(ConfigError, match=r"exports the bundle's SAM2LoRA or U-Net network; got Conv2d"):
        OnnxBackend(tmp_path / "conv.onnx")(torch.zeros(1, 3, 8, 8), torch.nn.Conv2d(3, 1, 1))

    def exporter_fails(*args, **kwargs):
        raise RuntimeError("aten::unsupported_op has no ONNX equivalent")

    monkeypatch.setattr(torch.onnx, "export", exporter_fails)
    with pytest.raises(DeployError, match=r"ONNX export to .*model.onnx failed \(RuntimeError: aten::unsupported_op"):
        OnnxBackend(tmp_path / "model.onnx")(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), network)
    assert not (tmp_path / "model.onnx").exists(), "no partial file is left"


def test_prompted_copies_for_interactive_requests_use_pytorch(exported):
    inferer = FundusInferer(image_size=IMAGE_SIZE, backend=exported)
    prompted = inferer.with_prompts({"a.png": {"points": [[10, 10, 1]]}}, {"a.png": (IMAGE_SIZE, IMAGE_SIZE)}, "test")
    assert prompted.backend is None and inferer.backend is exported


def test_bundle_inference_with_the_onnxruntime_backend_writes_pytorchs_masks(tmp_path):
    """``--backend onnxruntime`` on a folder, U-Net head: the export is cached next to the model, reused by the next
    run, and the probabilities and masks are PyTorch's."""
    model = write_model_file(tmp_path / "models" / "model.pt", architecture="unet")
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height) in (("wide.png", (90, 70)), ("square.png", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / name)
    outputs = {}
    for run, backend in (("torch", "torch"), ("exported", "onnxruntime"), ("cached", "onnxruntime")):
        outputs[run] = tmp_path / run
        result = run_bundle("inference", [INFER], cwd=tmp_path, dataset_dir=images, ckpt_path=model,
                            output_dir=outputs[run], backend=backend)
        assert result.returncode == 0, fail_message(result)
        log = result.stdout + result.stderr
        if run == "exported":
            assert "exporting the network to" in log and "(first use; later runs reuse it)" in log
        if run == "cached":
            assert "using the cached export" in log and "rebuilding" not in log
    cached = onnx.load(str(tmp_path / "models" / "model.onnxruntime.onnx"))
    assert [output.name for output in cached.graph.output] == ["logits"], "the U-Net head has no IoU head"
    for run in outputs:
        assert not any("predicted_iou" in column for column in read_csv(outputs[run] / "measurements.csv")[0])
    for name in ("wide", "square"):
        expected = np.asarray(Image.open(outputs["torch"] / f"{name}_prob.png"), dtype=int)
        for run in ("exported", "cached"):
            probability = np.asarray(Image.open(outputs[run] / f"{name}_prob.png"), dtype=int)
            assert probability.shape == expected.shape and np.abs(probability - expected).max() <= 1
            mask = np.asarray(Image.open(outputs[run] / f"{name}_mask.png"))
            assert (mask == np.asarray(Image.open(outputs["torch"] / f"{name}_mask.png"))).mean() > 0.999


def test_bundle_runs_of_the_sam_head_report_its_predicted_iou_with_the_onnxruntime_backend(tmp_path):
    """The SAM head through ``--backend onnxruntime``: inference's ``predicted_iou_<channel>`` columns and
    low-quality flags, and evaluation's per-image predicted IoU and ``quality_spearman``, are PyTorch's."""
    model = write_model_file(tmp_path / "models" / "model.pt")  # architecture "sam"
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for name, (width, height) in (("wide.png", (90, 70)), ("square.png", (64, 64)), ("tall.png", (60, 80))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(photos / name)
    rows, logs = {}, {}
    for backend in ("torch", "onnxruntime"):
        output = tmp_path / f"inference-{backend}"
        # Every predicted IoU is under 1: each image is flagged, its IoU written in the flag.
        result = run_bundle("inference", [INFER], cwd=tmp_path, dataset_dir=photos, ckpt_path=model,
                            output_dir=output, backend=backend, quality_threshold=1.0)
        assert result.returncode == 0, fail_message(result)
        rows[backend] = {row["image"]: row for row in read_csv(output / "measurements.csv")}
        logs[backend] = result.stdout + result.stderr
    assert "3 images, 3 flagged" in logs["torch"] and "3 images, 3 flagged" in logs["onnxruntime"]
    assert sorted(rows["onnxruntime"]) == sorted(rows["torch"]) and len(rows["torch"]) == 3
    for image, expected in rows["torch"].items():
        row = rows["onnxruntime"][image]
        assert float(row["predicted_iou_vessels"]) == pytest.approx(float(expected["predicted_iou_vessels"]), abs=1e-4)
        assert "low predicted quality (IoU" in row["flags"] and row["flags"] == expected["flags"]

    datalist = write_dataset(tmp_path / "data", count=6, size=96, seed=2)["vessels"]
    per_image, agreement = {}, {}
    for backend in ("torch", "onnxruntime"):  # the export cached by inference serves evaluation too
        output = tmp_path / f"evaluation-{backend}"
        # The training split's 4 images: quality_spearman ranks more than two.
        result = run_bundle("evaluating", [TRAIN, EVALUATE], cwd=tmp_path, datalist=datalist, ckpt_path=model,
                            output_dir=output, backend=backend, evaluate_split="training", **FAST)
        assert result.returncode == 0, fail_message(result)
        per_image[backend] = {row["image"]: float(row["predicted_iou"]) for row in read_csv(output / "measurements_per_image.csv")}
        agreement[backend] = json.loads((output / "measurement_agreement.json").read_text())["all"]
    assert len(per_image["torch"]) == 4 and all(np.isfinite(list(per_image["torch"].values())))
    assert per_image["onnxruntime"] == pytest.approx(per_image["torch"], abs=1e-4)
    assert np.isfinite(agreement["torch"]["quality_spearman"]), "a ranking to compare"
    assert agreement["onnxruntime"]["quality_spearman"] == pytest.approx(agreement["torch"]["quality_spearman"])
    assert agreement["onnxruntime"]["flagged"] == agreement["torch"]["flagged"]


def test_bundle_evaluation_measures_the_onnxruntime_backend(tmp_path):
    """``run evaluating --backend onnxruntime``: the field's metrics of the exported network on a labelled split, equal
    to PyTorch's in float32, the backend recorded with them; int8 evaluates its own export; prompts are refused."""
    datalist = write_dataset(tmp_path / "data", count=4, size=96, seed=2)["vessels"]
    model = write_model_file(tmp_path / "models" / "model.pt", architecture="unet")
    metrics, recorded = {}, {}
    for run, settings in (("torch", {}), ("float32", {"backend": "onnxruntime"}),
                          ("int8", {"backend": "onnxruntime", "onnx_int8": True})):
        output = tmp_path / run
        result = run_bundle("evaluating", [TRAIN, EVALUATE], cwd=tmp_path, datalist=datalist, ckpt_path=model,
                            output_dir=output, **FAST, **settings)
        assert result.returncode == 0, fail_message(result)
        summary = json.loads((output / "metrics_summary.json").read_text())
        metrics[run], recorded[run] = summary["summary"]["all"]["metrics"], summary["metadata"]["backend"]
    assert recorded == {"torch": "torch", "float32": "onnxruntime", "int8": "onnxruntime int8"}
    assert (tmp_path / "models" / "model.onnxruntime-int8.onnx").is_file()
    for key in ("vessels/fov/auc", "vessels/fov/dice", "vessels/image/auc"):
        assert metrics["float32"][key]["mean"] == pytest.approx(metrics["torch"][key]["mean"], abs=1e-3), key

    prompted = write_model_file(tmp_path / "models" / "sam.pt")
    result = run_bundle("evaluating", [TRAIN, EVALUATE], cwd=tmp_path, datalist=datalist, ckpt_path=prompted,
                        output_dir=tmp_path / "prompted", backend="onnxruntime", prompt_modes=["none", "box"], **FAST)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "Prompts need backend 'torch'" in log and "Traceback" not in log, log[-2000:]


def test_the_cpu_copy_of_a_network_computes_what_it_computes(network, images):
    """What a network on a GPU is exported from (the GPU case itself runs where there is one, below)."""
    network.merge_adapters()
    copy_on_cpu = onnx_backend.rebuilt_on_cpu(network)
    assert copy_on_cpu is not network and all(layer.merged for _, layer in lora_modules(copy_on_cpu))
    with torch.no_grad():
        torch.testing.assert_close(copy_on_cpu(images.as_tensor()), network(images.as_tensor()), atol=1e-5, rtol=0)
    assert onnx_backend.cpu_network(network) is network


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_network_on_the_gpu_is_exported_from_a_cpu_copy(network, images, tmp_path):
    on_gpu = copy.deepcopy(network).cuda()
    backend = OnnxBackend(tmp_path / "model.onnxruntime.onnx")
    logits = backend(images.as_tensor().cuda(), on_gpu)
    assert logits.device.type == "cuda" and next(on_gpu.parameters()).device.type == "cuda"
    torch.testing.assert_close(logits.cpu(), torch_logits(network, images), atol=1e-4, rtol=1e-4)
    assert backend.latest_iou_predictions.device.type == "cuda"
    torch.testing.assert_close(backend.latest_iou_predictions.cpu(), torch_iou(network, images), atol=1e-5, rtol=1e-4)


def test_sessions_run_on_the_threads_torch_was_given():
    """Not onnxruntime's default of every core: a process told to share the machine shares it in both."""
    import onnx
    from onnx import TensorProto, helper

    from scripts.onnx_backend import _session

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    onnx.checker.check_model(model)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert _session(model).get_session_options().intra_op_num_threads == threads
    finally:
        torch.set_num_threads(previous)
