"""What several test modules share: the bundle's files, the `python -m monai.bundle run` command line as a user types
it, small networks with trained-looking adapters, and building networks without their memory."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from monai.bundle import run as monai_run
from torch import nn

from scripts.errors import user_error
from scripts.lora import lora_modules
from tests.preloaded import preloaded_python

if TYPE_CHECKING:
    from scripts.network import SAM2LoRA

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
# sys.argv[0] of `python -m monai.bundle ...`, which Python sets to the path of the module it runs.
BUNDLE_MAIN = str(Path(importlib.util.find_spec("monai.bundle.__main__").origin))
TRAIN = str(CONFIGS / "train.json")
INFER = str(CONFIGS / "inference.json")
EVALUATE = str(CONFIGS / "evaluate.json")
QUICKSTART = str(CONFIGS / "quickstart.json")
QUICKSTART_DISC_CUP = str(CONFIGS / "quickstart_disc_cup.json")
MULTI_GPU = str(CONFIGS / "multi_gpu_train.json")
# The quick start at test size: a few seconds per epoch on a CPU.
FAST = {"image_size": 64, "max_epochs": 1, "val_interval": 1, "num_workers": 0}
# The paper's head, for tests that are about it (the quick start trains the U-Net head in full).
SAM_LORA = {"architecture": "sam", "finetune": "lora"}


def _outside_the_repository(run_id: str, overrides: dict[str, Any]) -> None:
    """Refuse a test run that would write into the repository's bundle/eval or bundle/models, the defaults, where a
    user's quick start keeps its results (a new training run moves an earlier run's files away)."""
    needed = ["output_dir"] + (["ckpt_dir"] if run_id == "training" else [])
    missing = [name for name in needed if name not in overrides]
    if missing:
        raise ValueError(f"a test's {run_id} run must give {' and '.join(missing)} (a temporary folder)")


def bundle_command(
    run_id: str,
    configs: Sequence[str],
    bundle_root: str | Path = BUNDLE,
    meta_file: str = META,
    logging_file: str = LOGGING,
    launcher: Sequence[str] = (sys.executable,),
    **overrides: Any,
) -> list[str]:
    """``python -m monai.bundle run <run_id> --bundle_root ... --key value ...`` as a list of arguments.

    Args:
        run_id: ``training``, ``inference`` or ``evaluating``.
        configs: config files, passed as MONAI takes a list (one file: the file alone).
        bundle_root: the bundle folder.
        meta_file: the metadata file.
        logging_file: the logging config.
        launcher: what runs ``-m monai.bundle`` (the interpreter, or torchrun's arguments).
        overrides: ``--key value`` pairs.
    """
    _outside_the_repository(run_id, overrides)
    config = configs[0] if len(configs) == 1 else str(list(configs))
    command = [*launcher, "-m", "monai.bundle", "run", run_id, "--bundle_root", str(bundle_root)]
    command += ["--meta_file", meta_file, "--config_file", config, "--logging_file", logging_file]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def run_bundle(run_id: str, configs: Sequence[str], cwd: Path, timeout: float = 900, **overrides: Any):
    """Run :func:`bundle_command` in a fresh process, as a user runs it (forked from the preloaded interpreter,
    which saves the imports); the completed process."""
    arguments = bundle_command(run_id, configs, launcher=(), **overrides)
    return preloaded_python().run(arguments, cwd=cwd, timeout=timeout)


def fail_message(result: subprocess.CompletedProcess) -> str:
    """The end of a failed command's output, for an assertion message."""
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def run_in_process(run_id: str, configs: Sequence[str], **overrides: Any) -> Exception:
    """Run a bundle workflow in this process, expecting it to fail with one of the project's clear errors."""
    _outside_the_repository(run_id, overrides)
    with pytest.raises(Exception) as caught:
        monai_run(run_id, meta_file=META, config_file=list(configs), bundle_root=str(BUNDLE), **overrides)
    own = user_error(caught.value)
    assert own is not None, f"not one of our clear errors: {caught.value!r}"
    return own


def write_model_file(path: Path, architecture: str = "sam", image_size: int = 64, **settings: Any) -> Path:
    """A model file as training writes it (random weights), recording `settings` on top of the quick start's."""
    from scripts.network import build_network

    settings = {
        "model_size": "tiny",
        "channel_names": ["vessels"],
        "recorded": {"input_mode": "resize", "pixel_scale": 1.0},
        **settings,
    }
    network = build_network(architecture, image_size=image_size, random_init=True, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


def randomise_adapters(network: nn.Module, seed: int | torch.Generator = 1) -> None:
    """Draw the B matrix of every LoRA layer of ``network`` from N(0, 0.05²), as training leaves it.

    B starts at zero, so untrained adapters add nothing: merged and unmerged weights, or a file with and without the
    adapters, would give the same output whether or not the code under test handles them. 0.05 changes the output
    clearly and keeps it in a plausible range.

    Args:
        network: any module holding :class:`scripts.lora.LoRALinear` layers.
        seed: the seed of a generator of their own, or a generator to draw from (``torch.default_generator``: torch's
            global random stream).
    """
    generator = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
    with torch.no_grad():
        for _, layer in lora_modules(network):
            layer.lora_B.normal_(0.0, 0.05, generator=generator)


def random_adapted_network(
    image_size: int = 64, seed: int = 0, checkpoint: str | Path | None = None, **settings: Any
) -> SAM2LoRA:
    """A Hiera-tiny :class:`scripts.network.SAM2LoRA` with non-zero adapters, as after training.

    The adapters are drawn by :func:`randomise_adapters`: with their B at zero, as built, a merged and an unmerged
    network, or an export with and without the adapters, would be trivially equal. torch's global random stream is
    seeded with ``seed``, and the base weights (random, or ``checkpoint``'s), the A matrices and then the B matrices
    are drawn from it: the same arguments give the same network, and the stream is left in a seeded state.

    Args:
        image_size: side of the encoder's square input (64 is the smallest Hiera takes).
        seed: the seed of torch's global random stream.
        checkpoint: Meta's SAM 2 Hiera-tiny checkpoint to start from; random base weights without one.
        settings: other :class:`scripts.network.SAM2LoRA` arguments (``channel_names``, ``lora_rank``,
            ``finetune``, ``channels_last``...).

    Returns:
        the network, in training mode, adapters unmerged.
    """
    from scripts.network import SAM2LoRA

    torch.manual_seed(seed)
    network = SAM2LoRA("tiny", image_size=image_size, checkpoint=checkpoint, random_init=checkpoint is None, **settings)
    randomise_adapters(network, torch.default_generator)
    return network


@contextmanager
def parameters_on_meta_device() -> Iterator[None]:
    """Create every new module parameter on the meta device: shapes and counts without the memory.

    ``with torch.device("meta")`` cannot build Hiera, whose constructor reads tensor values (``.item()``), so
    parameters are moved to the meta device as they are registered instead (``nn.Module.register_parameter`` is
    patched for the length of the block, which is why this lives in the tests).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextmanager
def held_by_another_process(folder: Path, hold: Callable[[Path], Any] | None = None) -> Iterator[int]:
    """``folder`` held by a forked process killed on leaving: as another inference's start-up holds it, or by
    ``hold`` (training's ``claim_checkpoint_folder``).

    Yields:
        The holding process's id.
    """
    from scripts.inputs import hold_output_folder

    ready_read, ready_write = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            (hold or hold_output_folder)(folder)
            os.write(ready_write, b"held")
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_read, 4) == b"held"
        yield holder
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.close(ready_read)
        os.close(ready_write)
