"""Tests of the benchmark script: it runs, writes a well-formed report and measures what the bundle runs. It times
nothing itself."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.atomic import OutputError
from scripts.errors import ConfigError
from scripts.lora import lora_modules
from scripts.network import SAM2LoRA
from tools import benchmark

RUN_IN_FRESH_PROCESS = benchmark._in_fresh_process  # kept before the report fixture replaces it

SMALLEST = [
    "--model-sizes", "tiny",
    "--image-sizes", "64",
    "--batch-size", "1",
    "--repeats", "1",
    "--warmup", "0",
    "--switches",
    "--data-images", "3",
    "--data-epochs", "2",
    "--num-workers", "0",
    "--device", "cpu",
    "--photographs", "150x100", "50x40",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def logger_levels():
    """The benchmark quiets loggers for its own processes; run in the tests' process, they are set back after."""
    levels = {name: logging.getLogger(name).level for name in benchmark.QUIET_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def report(module_folder, monkeypatch_module) -> tuple[dict, str]:
    """The smallest complete run, in this process (spawning one process per case would triple the time)."""
    monkeypatch_module.setattr(benchmark, "_in_fresh_process", lambda function, **kwargs: function(**kwargs))
    output = module_folder("benchmark")
    assert benchmark.main([*SMALLEST, "--output-dir", str(output)]) == 0
    return json.loads((output / "benchmark.json").read_text()), (output / "benchmark.md").read_text()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_report_has_every_row_asked_for(report):
    content, _ = report
    assert content["machine"]["device"] == "cpu"
    assert [row["variant"] for row in content["inference"]] == [
        "SAM 2 (no adapters)",
        "adapters unmerged",
        "adapters merged",
    ]
    configurations = [(row["mode"], row["switches"]) for row in content["training"]]
    assert configurations == [("LoRA", []), ("full fine-tuning", [])]
    lora, full = content["training"][:2]
    assert 0 < lora["trainable_parameters"] < 0.05 * lora["total_parameters"]
    bundle_full = SAM2LoRA("tiny", random_init=True, image_size=64, finetune="full")
    assert (full["trainable_parameters"], full["total_parameters"]) == bundle_full.count_parameters()
    repeats = content["settings"]["repeats"]
    for row in content["training"]:
        assert row["step_time_s"] > 0 and row["peak_memory_mib"] >= row["memory_before_steps_mib"] > 0
        assert len(row["step_samples_s"]) == repeats and row["step_time_s"] == statistics.median(row["step_samples_s"])
    for row in content["inference"]:
        assert row["latency_ms"] > 0 and row["throughput"] > 0
        assert len(row["latency_samples_ms"]) == repeats
        assert row["latency_ms"] == pytest.approx(statistics.median(row["latency_samples_ms"]))
    assert [row["prompt_modes"] for row in content["prompt_modes"]] == [1, 8]
    assert all(row["seconds_per_image"] > 0 for row in content["prompt_modes"])
    assert content["prompt_modes"][0]["relative"] == content["prompt_modes"][0]["relative_with_metrics"] == 1.0
    one, eight = content["prompt_modes"]
    assert one["metrics_seconds_per_image"] > 0 and eight["metrics_seconds_per_image"] > 0
    assert eight["relative_with_metrics"] == pytest.approx(
        (eight["seconds_per_image"] + eight["metrics_seconds_per_image"])
        / (one["seconds_per_image"] + one["metrics_seconds_per_image"])
    )
    (pipeline,) = content["data_loading"]
    assert pipeline["iterations"] == pipeline["training_images"] > 0  # batch 1, the second epoch counted
    assert 0 < pipeline["data_fraction"] == pytest.approx(pipeline["data_time_ms"] / pipeline["step_time_ms"])
    backends = {row["backend"]: row for row in content["backends"]}
    assert list(backends) == ["PyTorch eager (float32)", "onnxruntime float32", "onnxruntime int8"]
    eager = backends["PyTorch eager (float32)"]
    assert eager["speed_up"] == 1.0 and eager["mask_dice"] == 1.0 and eager["max_probability_difference"] == 0.0
    for name in ("onnxruntime float32", "onnxruntime int8"):
        row = backends[name]
        assert row["export_s"] > 0 and row["latency_ms"] > 0
        assert row["speed_up"] == pytest.approx(eager["latency_ms"] / row["latency_ms"])
        assert row["latency_ms"] == pytest.approx(statistics.median(row["latency_samples_ms"]))
        assert row["images"].startswith("synthetic")
    assert backends["onnxruntime float32"]["max_probability_difference"] < 1e-3
    modes = {(row["photograph"], row["input_mode"]): row for row in content["input_modes"]}
    assert list(modes) == [
        ("150 x 100", "resize"), ("150 x 100", "sliding_window"), ("50 x 40", "resize"), ("50 x 40", "sliding_window")
    ]
    for key in [("150 x 100", "resize"), ("150 x 100", "sliding_window"), ("50 x 40", "resize")]:
        row = modes[key]
        assert row["seconds_per_image"] > 0 and row["peak_memory_mib"] >= row["memory_before_mib"] > 0
    # 64 px windows overlapping by a quarter: starts every 48 px, the last flush with the edge (MONAI's scan).
    windows = (math.ceil((150 - 64) / 48) + 1) * (math.ceil((100 - 64) / 48) + 1)
    assert modes[("150 x 100", "sliding_window")]["windows_total"] == windows == 6
    assert 0 < modes[("150 x 100", "sliding_window")]["windows_computed"] <= windows
    assert modes[("150 x 100", "resize")]["windows_total"] == 1
    assert modes[("50 x 40", "sliding_window")]["seconds_per_image"] is None, "smaller than a window: not measured"
    photograph_io = {row["photograph"]: row for row in content["photograph_io"]}
    assert list(photograph_io) == ["150 x 100", "50 x 40"]
    assert photograph_io["150 x 100"]["megapixels"] == 150 * 100 / 1e6
    for row in photograph_io.values():
        assert row["read_s"] > 0 and row["write_s"] > 0 and "measure_s" in row


def test_targets_are_computed_from_the_rows(report):
    content, _ = report
    targets = {row["target"]: row for row in content["targets"]}
    assert len(targets) == 11
    for index, backend in ((1, "float32"), (2, "int8")):
        speed_up = targets[f"onnxruntime {backend} speed-up over PyTorch eager (CPU, batch 1)"]
        assert content["backends"][index]["backend"] == f"onnxruntime {backend}"
        assert speed_up["value"] == content["backends"][index]["speed_up"]
        assert speed_up["met"] == (speed_up["value"] >= 2)
    modes = targets["evaluation over the eight prompt modes / over one: the network (time per image)"]
    assert modes["value"] == pytest.approx(content["prompt_modes"][1]["relative"]) and modes["met"] == (modes["value"] < 2)
    with_metrics = targets["evaluation over the eight prompt modes / over one: network and metrics (time per image)"]
    assert with_metrics["value"] == pytest.approx(content["prompt_modes"][1]["relative_with_metrics"])
    assert with_metrics["met"] == (with_metrics["value"] < 2)
    merged = targets["merged inference latency / SAM 2 latency"]
    rows = {row["variant"]: row for row in content["inference"]}
    assert merged["value"] == pytest.approx(
        rows["adapters merged"]["latency_ms"] / rows["SAM 2 (no adapters)"]["latency_ms"]
    )
    assert merged["met"] == (merged["value"] <= 1.02)
    memory = targets["LoRA training peak memory / full fine-tuning peak memory"]
    lora, full = content["training"][:2]
    assert memory["value"] == pytest.approx(lora["peak_memory_mib"] / full["peak_memory_mib"])


def test_markdown_holds_the_machine_and_a_table_per_measurement(report):
    content, markdown = report
    assert content["machine"]["cpu"] in markdown
    for heading in ("### Inference", "### Training step", "### Evaluation over prompt modes", "### Data pipeline",
                    "### CPU backends", "### Input modes", "### Photograph I/O", "### Targets"):
        assert heading in markdown
    assert markdown.count("| tiny | 64 |") == 3 + 2 + 2 + 1 + 3 + 4 + 11
    assert "smaller than the 64 px window" in markdown
    assert "Switches measured: none" in markdown
    # Each timed figure shows the range of its runs beside its median.
    merged = next(row for row in content["inference"] if row["variant"] == "adapters merged")
    samples = merged["latency_samples_ms"]
    assert f"| {merged['latency_ms']:.1f} ({min(samples):.1f}-{max(samples):.1f}) |" in markdown
    assert "process peak RSS" in markdown
    loads = [row["load_average_1min"] for part in ("inference", "training") for row in content[part]]
    assert all(isinstance(load, float) for load in loads) and "Load average (1 min): " in markdown


def test_a_load_above_the_benchmark_s_own_threads_is_cautioned_about(report):
    """Other jobs on the machine made unmerged adapters read 2.5 x SAM 2's latency instead of 1.08, with no word."""
    content, _ = report
    quiet = copy.deepcopy(content)
    quiet["machine"].update(load_average_at_start=0.1, torch_threads=2)
    for part in benchmark.PARTS:
        for row in quiet.get(part, []):
            row["load_average_1min"] = 1.9
    assert "other work shared the CPU" not in benchmark.render_markdown(quiet)
    quiet["inference"][0]["load_average_1min"] = 4.5
    assert "Above the 2 threads the benchmark keeps busy: other work shared the CPU" in benchmark.render_markdown(quiet)


def test_cases_run_in_a_process_of_their_own():
    assert RUN_IN_FRESH_PROCESS(os.getpid) != os.getpid()


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--repeats", "0"])
    assert "--repeats" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--switches", "warp_drive"])
    with pytest.raises(SystemExit):
        benchmark.main(["--photographs", "3504"])
    assert "'3504' is not WIDTHxHEIGHT" in capsys.readouterr().err
    for argument, value, least in (("--data-images", "2", 3), ("--num-workers", "-1", 0)):
        with pytest.raises(SystemExit):
            benchmark.main([*SMALLEST, argument, value])
        assert f"{argument} must be at least {least}, got {value}." in capsys.readouterr().err


def test_compile_is_not_timed_without_a_warm_up(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch.compile is measured on CUDA only
    assert benchmark.main([*SMALLEST, "--device", "cuda", "--switches", "compile"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: --warmup 0 with torch.compile measured") and error.count("\n") == 1, error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--device", "warp"], "error: --device 'warp' is not a device: cuda, cpu or auto."),
        (
            ["--model-sizes", "huge"],
            "error: Setting 'model_size' must be one of base_plus, large, small, tiny; got 'huge'.",
        ),
        (["--output-dir", "{file}"], "error: Output folder {file} is a file, not a folder: name a folder there."),
        (["--drive-dir", "{file}"], "error: --drive-dir {file}: there is no folder {file}/test/images"),
    ],
)
def test_bad_names_are_one_line_before_anything_is_measured(tmp_path, capsys, arguments, message):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    assert benchmark.main([*SMALLEST, *(a.format(file=file) for a in arguments)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(message.format(file=file)) and error.count("\n") == 1, error


def test_parts_measure_only_what_is_asked_and_a_stopped_run_keeps_what_it_measured(tmp_path, monkeypatch):
    def in_this_process_until_training(function, **kwargs):
        if function is benchmark.measure_training:
            raise KeyboardInterrupt  # the run is stopped (a lease's time limit) once training starts
        return function(**kwargs)

    monkeypatch.setattr(benchmark, "_in_fresh_process", in_this_process_until_training)
    stopped, finished = tmp_path / "stopped", tmp_path / "finished"
    with pytest.raises(KeyboardInterrupt):
        benchmark.main([*SMALLEST, "--parts", "inference", "training", "--output-dir", str(stopped)])
    assert sorted(p.name for p in stopped.iterdir()) == [benchmark.PARTIAL_REPORT]
    kept = json.loads((stopped / benchmark.PARTIAL_REPORT).read_text())
    assert len(kept["inference"]) == 3 and kept["training"] == [] and kept["prompt_modes"] == []

    assert benchmark.main([*SMALLEST, "--parts", "inference", "--output-dir", str(finished)]) == 0
    assert sorted(p.name for p in finished.iterdir()) == ["benchmark.json", "benchmark.md"]
    content = json.loads((finished / "benchmark.json").read_text())
    assert len(content["inference"]) == 3
    assert content["training"] == content["prompt_modes"] == content["data_loading"] == content["photograph_io"] == []
    assert [row["target"] for row in content["targets"]] == ["merged inference latency / SAM 2 latency"]


def test_an_earlier_runs_reports_are_moved_aside_not_replaced(tmp_path, monkeypatch, caplog):
    """A run with other --parts into the same folder used to replace benchmark.json, the earlier parts' figures."""
    earlier = {"benchmark.json": '{"training": "hours of GPU"}\n', "benchmark.md": "# earlier\n",
               benchmark.PARTIAL_REPORT: '{"inference": "a stopped run"}'}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    # Nothing is measured: what is kept aside, and when, does not depend on the report.
    monkeypatch.setattr(benchmark, "run_benchmark", lambda settings, progress: {"inference": "this run"})
    monkeypatch.setattr(benchmark, "render_markdown", lambda report: "# this run\n")

    with caplog.at_level(logging.WARNING):
        assert benchmark.main([*SMALLEST, "--parts", "inference", "--output-dir", str(tmp_path)]) == 0

    [kept] = (tmp_path / "earlier_benchmarks").iterdir()
    assert {path.name: path.read_text() for path in kept.iterdir()} == earlier
    assert json.loads((tmp_path / "benchmark.json").read_text()) == {"inference": "this run"}
    names = ", ".join(sorted(earlier))
    assert f"{tmp_path} held an earlier benchmark's reports ({names}): moved to {kept} before this benchmark writes " \
        "its own." in caplog.messages


def test_agreement_photographs_are_the_image_files_of_drive_s_test_folder(tmp_path):
    images = tmp_path / "test" / "images"
    images.mkdir(parents=True)
    (images / "Thumbs.db").write_bytes(b"\x00 not an image")
    (images / "._01_test.tif").write_bytes(b"macOS resource fork")
    with pytest.raises(ConfigError, match="holds no photograph"):
        benchmark._agreement_images(32, str(tmp_path))
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(images / "01_test.tif")
    pictures, source = benchmark._agreement_images(32, str(tmp_path))
    assert pictures.shape == (1, 3, 32, 32) and source == "DRIVE test images 01_test.tif"


def test_a_report_that_cannot_be_written_is_an_output_error(report, tmp_path):
    content, _ = report
    (tmp_path / "benchmark.md").mkdir()  # a folder where the report should go
    with pytest.raises(OutputError, match="benchmark.md"):
        benchmark.write_report(content, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["benchmark.json", "benchmark.md"], "no partial file"


def test_prompt_modes_are_measured_with_the_adapters_merged(monkeypatch):
    build, built = benchmark._network, []

    def recorded(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(benchmark, "_network", recorded)
    benchmark.measure_prompt_modes("tiny", 64, repeats=1, warmup=0, device="cpu", lora_rank=4)
    (network,) = built
    layers = [layer for _, layer in lora_modules(network)]
    assert layers and all(layer.merged for layer in layers), "evaluate.json merges them"


def test_the_window_overlap_is_inference_json_s(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(benchmark.BUNDLE_CONFIGS, configs)
    inference = json.loads((configs / "inference.json").read_text())
    inference["window_overlap"] = 0.5  # train.json keeps 0.25
    (configs / "inference.json").write_text(json.dumps(inference))
    monkeypatch.setattr(benchmark, "BUNDLE_CONFIGS", configs)
    row = benchmark.measure_input_modes("tiny", 64, (150, 100), "sliding_window", 1, 0, "cpu", lora_rank=4)
    # 64 px windows overlapping by half: starts every 32 px, the last flush with the edge (MONAI's scan).
    assert row["windows_total"] == (math.ceil((150 - 64) / 32) + 1) * (math.ceil((100 - 64) / 32) + 1) == 12


def test_the_warnings_about_random_weights_are_quieted():
    benchmark._quiet_logs()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # after _quiet_logs, which replaces the root logger's handlers
    logging.getLogger().addHandler(handler)
    try:
        benchmark._network("tiny", 64, 4)
    finally:
        logging.getLogger().removeHandler(handler)
    assert [record.getMessage() for record in records if record.levelno >= logging.WARNING] == []


def test_variants_take_turns_in_an_order_reversed_every_other_round():
    variants = {"SAM 2": 1, "unmerged": 2, "merged": 3}
    assert [name for name, _ in benchmark._in_turns(variants, 0)] == ["SAM 2", "unmerged", "merged"]
    assert [name for name, _ in benchmark._in_turns(variants, 1)] == ["merged", "unmerged", "SAM 2"]
    assert benchmark._in_turns(variants, 2) == benchmark._in_turns(variants, 0)
