"""Deployable exports checked against PyTorch: ONNX with onnxruntime on real DRIVE images, TorchScript through
MONAI's ckpt_export, torch.export programs."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export
from torch.overrides import TorchFunctionMode

from scripts import onnx_backend
from scripts.onnx_backend import MIN_OPSET, opset_range
from scripts.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from tests.helpers import random_adapted_network, write_model_file
from tools.deploy import (
    OPSET,
    PromptFreeSegmenter,
    base_in_use,
    check_onnx,
    export_onnx,
    export_program,
    load_segmenter,
    main,
    source_record,
)

pytest.importorskip("onnxruntime", reason="onnx and onnxruntime are dev dependencies of the deployable exports")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
CONFIG_FILES = [str(CONFIGS / "inference.json")]  # it reads every network setting from the model file
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def trained(module_folder) -> Path:
    """A model.pt with non-zero adapters, as training leaves it."""
    path = module_folder("model") / "model.pt"
    torch.save(random_adapted_network(IMAGE_SIZE).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def segmenter(trained) -> PromptFreeSegmenter:
    return load_segmenter(trained)


@pytest.fixture(scope="module")
def exported(segmenter, module_folder) -> Path:
    """The ONNX export (opset 23) of the module's model, made once (an export takes tens of seconds here)."""
    folder = module_folder("onnx")
    path = export_onnx(segmenter, folder / "model.onnx")
    assert sorted(file.name for file in folder.iterdir()) == ["model.onnx"], "the partial file was renamed into place"
    return path


def drive_batch(drive_dir: Path, cases: list[str], model: Path) -> torch.Tensor:
    """DRIVE test images through the bundle's own inference preprocessing for ``model``."""
    parser = ConfigParser()
    parser.read_config(CONFIG_FILES)
    parser["ckpt_path"] = str(model)
    preprocessing = parser.get_parsed_content("preprocessing")
    images = [
        preprocessing({"image": str(drive_dir / "test" / "images" / f"{case}_test.tif")})["image"] for case in cases
    ]
    return torch.stack([torch.as_tensor(image) for image in images]).float()


def test_onnx_matches_pytorch_on_drive_images_with_a_dynamic_batch(trained, segmenter, exported, drive_dir):
    path = exported
    import onnxruntime

    # The file says how to feed it: the bundle's normalisation and the model's record.
    described = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    description = {key: json.loads(value) for key, value in described.get_modelmeta().custom_metadata_map.items()}
    settings = segmenter.network.settings
    assert description["sam2lora.mean"] == list(SAM_PIXEL_MEAN) and description["sam2lora.std"] == list(SAM_PIXEL_STD)
    assert description["sam2lora.image_size"] == IMAGE_SIZE == settings["image_size"]
    assert description["sam2lora.channel_names"] == list(settings["channel_names"])
    assert description["sam2lora.input_mode"] == settings["recorded"].get("input_mode", "resize")

    for cases in (["01", "02", "03"], ["04"]):  # exported with a batch of 2: both other sizes must work
        images = drive_batch(drive_dir, cases, trained)
        assert images.shape == (len(cases), 3, IMAGE_SIZE, IMAGE_SIZE)
        assert check_onnx(path, segmenter, images) < 1e-4
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"image": images.numpy()})
        with torch.no_grad():
            reference = segmenter(images).numpy()
        decided = np.abs(reference) > 1e-3  # away from the threshold, the masks must be the same
        assert decided.mean() > 0.99
        np.testing.assert_array_equal((logits > 0)[decided], (reference > 0)[decided])


class AttentionCounter(TorchFunctionMode):
    """Counts the scaled-dot-product attentions of a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def onnx_opset_and_attention_nodes(path: Path) -> tuple[int, int]:
    model = onnx.load(str(path))
    (opset,) = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    return opset, sum(node.op_type == "Attention" for node in model.graph.node)


def test_every_attention_is_one_onnx_attention_node_and_opset_18_is_on_request(segmenter, trained, exported, tmp_path):
    counter = AttentionCounter()
    with torch.no_grad(), counter:
        segmenter(segmenter.example(batch=1))
    assert counter.calls > 12, "Hiera-tiny's 12 blocks and the mask decoder's attentions"
    assert onnx_opset_and_attention_nodes(exported) == (OPSET, counter.calls)

    older = tmp_path / "model-opset18.onnx"
    assert main(["--format", "onnx", "--ckpt_path", str(trained), "--output", str(older), "--opset", "18"]) == 0
    assert onnx_opset_and_attention_nodes(older) == (18, 0), "opset 18 has no Attention operator"
    assert check_onnx(older, segmenter, segmenter.example(batch=1)) < 1e-4
    # The command's export says which model file it comes from; the module's own export, made without it, does not.
    described = {entry.key: entry.value for entry in onnx.load(older, load_external_data=False).metadata_props}
    assert json.loads(described["sam2lora.source"]) == {
        "model_file": "model.pt",
        "model_sha256": hashlib.sha256(trained.read_bytes()).hexdigest(),
        "exported_by": f"sam2lora-fundus {json.loads((CONFIGS / 'metadata.json').read_text())['version']}",
    }
    assert "sam2lora.source" not in {entry.key for entry in onnx.load(exported, load_external_data=False).metadata_props}


def test_the_source_record_names_an_adapters_only_model_s_base(tmp_path):
    adapters, base = tmp_path / "adapters.pt", tmp_path / "sam2.1_hiera_tiny.pt"
    adapters.write_bytes(b"adapters")
    base.write_bytes(b"base weights")
    record = source_record(adapters, base)
    assert (record["model_file"], record["base_checkpoint"]) == ("adapters.pt", "sam2.1_hiera_tiny.pt")
    assert record["model_sha256"] == hashlib.sha256(b"adapters").hexdigest()
    assert record["base_sha256"] == hashlib.sha256(b"base weights").hexdigest()


def test_torchscript_through_monai_ckpt_export(trained, segmenter, tmp_path):
    path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(path),
        ckpt_file=str(trained),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=CONFIG_FILES,
        use_trace=True,
        input_shape=[1, 3, IMAGE_SIZE, IMAGE_SIZE],
        ckpt_path=str(trained),
    )
    scripted = torch.jit.load(str(path))
    for batch in (1, 3):
        images = segmenter.example(batch)
        with torch.no_grad():
            torch.testing.assert_close(scripted(images), segmenter(images), atol=1e-4, rtol=1e-4)


def test_exported_program_with_a_dynamic_batch(segmenter, tmp_path):
    path = export_program(segmenter, tmp_path / "model.pt2")
    program = torch.export.load(str(path)).module()
    for batch in (1, 3):
        images = segmenter.example(batch)
        with torch.no_grad():
            torch.testing.assert_close(program(images), segmenter(images), atol=1e-5, rtol=1e-5)


def test_an_adapters_only_archive_s_model_deploys_on_its_base(tmp_path, capsys):
    """tools.deploy advised giving the base checkpoint but had no option to give it."""
    from scripts.sam2_models import build_sam2_base

    torch.manual_seed(0)
    base = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": build_sam2_base("tiny", image_size=IMAGE_SIZE).state_dict()}, base)
    network = random_adapted_network(IMAGE_SIZE, seed=3, checkpoint=base)
    adapters = network.save_adapters(tmp_path / "adapters.pt")
    images = PromptFreeSegmenter(network.eval()).example(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(load_segmenter(adapters, base)(images), network(images), atol=0, rtol=0)
    status = main(["--format", "exported_program", "--ckpt_path", str(adapters), "--output", str(tmp_path / "m.pt2")])
    assert status == 1 and (
        f"error: {adapters} holds adapters only: give Meta's base checkpoint they were trained on with it "
        "(sam2.1_hiera_tiny.pt; --base_checkpoint)." in capsys.readouterr().err
    )
    # An export records the base only where the model file needs it.
    assert base_in_use(adapters, base) == base
    assert base_in_use(adapters, None) is None


def test_a_base_given_with_a_full_model_is_said_to_be_unused_and_not_recorded(trained, tmp_path, caplog):
    base = tmp_path / "sam2.1_hiera_tiny.pt"
    base.write_bytes(b"not read")
    with caplog.at_level(logging.WARNING, logger="tools.deploy"):
        assert base_in_use(trained, base) is None
    assert f"--base_checkpoint {base} is not used: {trained} holds the whole network." in caplog.text


def test_cli_reports_a_missing_model(tmp_path, capsys):
    status = main(["--format", "onnx", "--ckpt_path", str(tmp_path / "none.pt"), "--output", str(tmp_path / "m.onnx")])
    assert status == 1
    assert f"error: Trained model {tmp_path / 'none.pt'} does not exist." in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_without_onnxruntime_says_so_before_exporting(tmp_path, capsys, monkeypatch):
    """It exported for minutes (at Hiera-large) before the check with onnxruntime failed, with no install hint."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it raises ImportError
    # A model path that does not exist: its error would come first if the model were read before the check.
    status = main(["--format", "onnx", "--ckpt_path", str(tmp_path / "none.pt"), "--output", str(tmp_path / "m.onnx")])
    assert status == 1
    assert "error: --format onnx needs onnxruntime and onnxscript" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_refuses_an_output_named_for_another_format(trained, tmp_path, capsys):
    status = main(["--format", "onnx", "--ckpt_path", str(trained), "--output", str(tmp_path / "m.ts")])
    assert status == 1
    assert f"error: --output {tmp_path / 'm.ts'} does not end in .onnx, the suffix of --format onnx." in (
        capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir())


def test_cli_keeps_an_existing_output_unless_told_to_replace_it(trained, tmp_path, capsys):
    existing = tmp_path / "m.pt2"
    existing.write_bytes(b"an earlier export")
    status = main(["--format", "exported_program", "--ckpt_path", str(trained), "--output", str(existing)])
    assert status == 1
    assert f"error: {existing} exists: choose another --output, or pass --overwrite to replace it." in (
        capsys.readouterr().err
    )
    assert existing.read_bytes() == b"an earlier export"


def test_an_onnx_export_that_disagrees_with_pytorch_is_not_kept(trained, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"an earlier export")
    # A mistranslated network: an export (stood in for by a file, the export itself being tested above) whose logits
    # differ from PyTorch's by 0.5.
    monkeypatch.setattr(
        onnx_backend, "export_onnx", lambda model, path, opset, source, destination: Path(path).write_bytes(b"onnx")
    )
    monkeypatch.setattr(onnx_backend, "check_onnx", lambda path, model, images: 0.5)
    status = main(["--format", "onnx", "--ckpt_path", str(trained), "--output", str(existing), "--overwrite"])
    assert status == 1
    error = capsys.readouterr().err
    assert f"The float32 export for {existing} disagrees with PyTorch: largest logit difference 0.5" in error
    assert existing.read_bytes() == b"an earlier export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx"], "no partial file is left"


@pytest.mark.parametrize("beyond", ["below", "above"])
def test_cli_refuses_an_opset_the_installation_cannot_export(beyond, tmp_path, capsys):
    """Both were exported: torch's exporter, which cannot convert its graph to them, wrote opset 18, silently for 17,
    and into 26 (onnxscript 0.7) opset 18 with opset 23's Attention nodes, which onnxruntime refused."""
    opsets, _ = opset_range()
    opset = 17 if beyond == "below" else opsets.stop
    # A model path that does not exist: its error would come first if the model were read before the check.
    arguments = ["--format", "onnx", "--ckpt_path", str(tmp_path / "none.pt"), "--output", str(tmp_path / "m.onnx")]
    with pytest.raises(SystemExit) as stopped:
        main([*arguments, "--opset", str(opset)])
    assert stopped.value.code == 2
    assert (
        f"error: argument --opset: {opset} is not an opset this installation exports: choose {MIN_OPSET} to "
        f"{opsets.stop - 1} (torch's exporter writes 18 to " in capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir())


def test_cli_refuses_an_opset_for_an_exported_program(tmp_path, capsys):
    """An exported program has no opset: an --opset given with it would be silently ignored."""
    arguments = ["--format", "exported_program", "--ckpt_path", str(tmp_path / "none.pt"), "--output",
                 str(tmp_path / "m.pt2"), "--opset", "18"]
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    assert ("error: argument --opset: --format exported_program has no opset; --opset is for --format onnx."
            in capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_an_onnx_file_of_another_opset_than_asked_is_not_kept(trained, tmp_path, capsys, monkeypatch):
    """An opset the exporter cannot convert to gets a file of opset 18, with a logged warning at most: it was kept
    as the export asked for. Here the exporter is made to write 18 whatever it is asked."""
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"an earlier export")
    export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: export(*args, **{**kwargs, "opset_version": 18}))
    status = main(["--format", "onnx", "--ckpt_path", str(trained), "--output", str(existing), "--overwrite"])
    assert status == 1
    assert (
        f"error: ONNX export to {existing} failed: torch's exporter wrote opset 18, not the {OPSET} asked for"
        in capsys.readouterr().err
    )
    assert existing.read_bytes() == b"an earlier export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx"], "no partial file is left"


def test_onnx_of_the_unet_head_matches_pytorch(tmp_path, caplog):
    model = write_model_file(tmp_path / "unet.pt", architecture="unet", image_size=IMAGE_SIZE)
    segmenter = load_segmenter(model)
    path = export_onnx(segmenter, tmp_path / "unet.onnx")
    images = segmenter.example(batch=3)  # exported with a batch of 2
    with torch.no_grad():
        assert segmenter(images).shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert check_onnx(path, segmenter, images) < 1e-4
    with caplog.at_level(logging.INFO, logger="tools.deploy"):
        assert main(["--format", "onnx", "--ckpt_path", str(model), "--output", str(tmp_path / "cli.onnx")]) == 0
    assert "largest difference" in caplog.text and "(logits)." in caplog.text, "the U-Net head has no IoU output"
