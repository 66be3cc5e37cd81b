"""MONAI Label end to end: the real server (monailabel_app/serve.sh) on 127.0.0.1 serving an exported archive,
inference on PNG and JPG fundus images through the REST API, labels saved through it, and training through it.

Needs ``.venv-monailabel`` (``bash monailabel_app/install.sh``); skipped without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from scripts.fundus_io import read_label_mask
from scripts.network import load_trained
from scripts.synthetic import write_dataset
from scripts.writers import label_map
from tests.helpers import random_adapted_network
from tests.preloaded import preloaded_python
from tools.export import BUNDLE_NAME, export_bundle

REPO = Path(__file__).resolve().parents[1]
SERVER_PYTHON = REPO / ".venv-monailabel" / "bin" / "python"
SERVE = REPO / "monailabel_app" / "serve.sh"
IMAGE_SIZE = 64
WIDTH, HEIGHT = 120, 100  # non-square, so that a transposed label cannot pass
START_TIMEOUT = 420
TRAIN_TIMEOUT = 600
INTERACTIVE = f"{BUNDLE_NAME}_interactive"

pytestmark = pytest.mark.skipif(
    not SERVER_PYTHON.is_file(),
    reason=f"{SERVER_PYTHON} is missing: create the MONAI Label venv with `bash monailabel_app/install.sh`",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
            timeout: float = 300) -> tuple[int, bytes, dict]:
    """An HTTP request with the standard library; returns status, body and headers (errors included)."""
    call = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def multipart(field: str, path: Path) -> tuple[bytes, dict]:
    """One file as a multipart/form-data body, as MONAI Label's clients upload labels."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served_model(path: Path) -> Path:
    """A Hiera-tiny SAM2LoRA with non-zero adapters (as after training), saved as training saves model.pt.

    Seeded so that its prediction on the test images has both vessel and background pixels (checked below):
    a constant label would make the comparison with the bundle's own inference vacuous.
    """
    network = random_adapted_network(IMAGE_SIZE, seed=2, channel_names=["vessels"])
    torch.save(network.state_dict(), path)
    return path


class Server:
    """The MONAI Label server started by serve.sh as a process group of its own."""

    def __init__(self, root: Path, archive: Path, studies: Path, options: Sequence[str] = ()) -> None:
        self.app = root / "app"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        # Nothing of this repository on the path: the served bundle must import its own `scripts`.
        # The thread count of this test process (tests/conftest.py), which the bundle runs compared with share: float
        # sums in the same order, the same masks.
        kept = ("PATH", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS")
        environment = {key: os.environ[key] for key in kept if key in os.environ}
        environment["HOME"] = str(root)
        # The studies folder relative to where serve.sh is started, as a user types it (the server runs elsewhere).
        command = ["bash", str(SERVE), "--studies", os.path.relpath(studies, root), "--bundle", str(archive), "--app", str(self.app),
                   "--port", str(self.port), "--", *options]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=root, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def log_tail(self, characters: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status, body, _ = request(f"{self.url}/info/", timeout=5)
                if status == 200:
                    return json.loads(body)
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"the server did not answer /info/ within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        # The whole group: serve.sh exec's the server, which starts training tasks as child processes.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def setup(module_folder) -> dict:
    root = module_folder("monailabel")
    write_dataset(root / "synthetic", count=3, size=128, seed=5)
    studies = root / "studies"
    studies.mkdir()
    corrected = root / "corrected"
    corrected.mkdir()
    sources = sorted((root / "synthetic" / "images").glob("*.png"))
    vessels = sorted((root / "synthetic" / "vessels").glob("*.png"))
    disc = np.asarray(Image.open(min((root / "synthetic" / "disc").glob("*.png"))).resize((WIDTH, HEIGHT)))
    rows, cols = np.nonzero(disc > 127)
    for name, image, mask in (("wide.png", sources[0], vessels[0]), ("photo.jpg", sources[1], vessels[1])):
        picture = Image.open(image).convert("RGB").resize((WIDTH, HEIGHT), Image.BILINEAR)
        picture.save(studies / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        # A grader's corrected label as MONAI Label's clients send it: PNG, 0 background, 1 vessel.
        label = (np.asarray(Image.open(mask).resize((WIDTH, HEIGHT), Image.NEAREST)) > 127).astype(np.uint8)
        Image.fromarray(label).save(corrected / f"{name.split('.')[0]}.png")
    # A phone's picture stored sideways with an EXIF orientation, which viewers and the bundle read differently.
    turned = Image.open(sources[2]).convert("RGB").resize((WIDTH, HEIGHT))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    turned.save(studies / "turned.jpg", exif=exif)
    model = served_model(root / "model.pt")
    result = export_bundle(root / "dist", model, weights="full")
    assert result.weights == "full", result.reason
    server = Server(root, result.archive, studies)
    try:
        info = server.wait_ready(START_TIMEOUT)
        yield {"root": root, "studies": studies, "corrected": corrected, "server": server, "info": info,
               "archive": result.archive,
               "bundle": server.app / "model" / BUNDLE_NAME,
               "disc": (int(cols.mean()), int(rows.mean()), int(cols.max() - cols.min()) // 2)}
    finally:
        server.stop()


def bundle_inference(bundle: Path, images: Path, output: Path, prompts_file: Path | None = None) -> None:
    """``python -m monai.bundle run inference`` from the served bundle's folder, with its configs and model.

    The preloaded interpreter runs it (it has imported this repository's `scripts`, of which the served bundle's are
    a copy); that the served bundle stands alone is what the server itself shows.
    """
    command = ["-m", "monai.bundle", "run", "inference", "--meta_file", "configs/metadata.json",
               "--config_file", "configs/inference.json", "--logging_file", "configs/logging.conf",
               "--dataset_dir", str(images), "--output_dir", str(output), "--num_workers", "0"]
    if prompts_file is not None:
        command += ["--prompts_file", str(prompts_file)]
    result = preloaded_python().run(command, cwd=bundle, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def form(fields: dict[str, str]) -> tuple[bytes, dict]:
    """Text fields as a multipart/form-data body, as MONAI Label's clients send an inference request's ``params``."""
    boundary = uuid.uuid4().hex
    body = "".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        for name, value in fields.items()
    ) + f"--{boundary}--\r\n"
    return body.encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def infer(server: Server, image_id: str, model: str = BUNDLE_NAME, params: dict | None = None) -> np.ndarray:
    """``POST /infer/<model>?image=<id>&output=image`` (with ``params``, e.g. clicks): the label image as an array."""
    body, headers = form({"params": json.dumps(params or {})})
    status, body, _ = request(f"{server.url}/infer/{model}?image={image_id}&output=image", "POST", body, headers)
    assert status == 200, f"{status}: {body[:500]!r}\n{server.log_tail()}"
    path = server.app.parent / f"rest_{model}_{image_id}_{uuid.uuid4().hex[:8]}.png"
    path.write_bytes(body)
    assert body[:8] == b"\x89PNG\r\n\x1a\n", "a PNG label, whatever the image's format"
    return np.asarray(Image.open(path))


def train(server: Server, settings: dict) -> dict:
    """``POST /train/<model>``, then poll ``GET /train/`` until that task has ended (bounded)."""
    status, answer, _ = request(f"{server.url}/train/{BUNDLE_NAME}", "POST", json.dumps(settings).encode(),
                                {"Content-Type": "application/json"})
    assert status == 200, answer[:500]
    task_id = json.loads(answer)["id"]
    deadline = time.monotonic() + TRAIN_TIMEOUT
    task: dict = {}
    while time.monotonic() < deadline:
        _, answer, _ = request(f"{server.url}/train/?check_if_running=false", timeout=30)
        task = json.loads(answer)
        if task.get("id") == task_id and task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(2)
    pytest.fail(f"training did not finish within {TRAIN_TIMEOUT} s: {task}\n{server.log_tail()}")


def run_in_server_python(folder: Path, code: str) -> Any:
    """Run ``code`` in the server's Python (MONAI Label's venv) in ``folder``; the JSON its last line prints."""
    probe = folder / "probe.py"
    probe.write_text(code)
    environment = {key: os.environ[key] for key in ("PATH", "LANG", "OMP_NUM_THREADS") if key in os.environ}
    result = subprocess.run([str(SERVER_PYTHON), str(probe)], cwd=folder, env={**environment, "HOME": str(folder)},
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_server_lists_the_bundle_with_its_label_and_trainer(setup):
    info = setup["info"]
    model = info["models"][BUNDLE_NAME]
    assert model["type"] == "segmentation" and model["dimension"] == 2
    assert model["labels"] == {"vessels": 1}, "label value 1 for vessels (0 is the background)"
    interactive = info["models"][INTERACTIVE]
    assert interactive["type"] == "deepgrow" and interactive["labels"] == {"vessels": 1}
    train_options = info["trainers"][BUNDLE_NAME]["config"]
    assert train_options["learning_rate"] == 0.0001 and train_options["batch_size"] == 2, "the bundle's defaults"
    assert train_options["num_workers"] is None, "an expression of the bundle's is left to the bundle, not shown raw"
    assert (setup["bundle"] / "scripts" / "network.py").is_file(), "the archive was extracted into the app"


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses listening on ``port``, read from the kernel's socket table (no traffic is sent)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def test_server_listens_on_loopback_only(setup):
    server = setup["server"]
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log.read_text(errors="replace")
    assert listening_addresses(server.port) == {"127.0.0.1"}


def test_repository_scripts_are_not_importable_by_the_server_python(tmp_path):
    command = [str(SERVER_PYTHON), "-c", "import scripts"]
    environment = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, check=False, cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "No module named 'scripts'" in result.stderr


def test_the_app_s_disc_cup_label_is_the_bundle_writer_s_a_cup_outside_the_disc_included(tmp_path):
    """/infer's label maker (FundusLabeld, in the server's Python) against the bundle's own writer (label_map): a cup
    partly outside the disc is labelled only inside it by both, as the measurements clip it, and a cup in a hole of
    the disc is labelled cup."""
    probabilities = np.zeros((2, 20, 30), np.float32)
    probabilities[0, 6:18, 8:22] = 0.8  # disc
    probabilities[1, 2:10, 12:18] = 0.7  # cup, its top rows above the disc
    probabilities[1, 12, 24] = 0.9  # a cup pixel with no disc around it
    probabilities[0, 12:15, 11:14] = 0.2  # a hole in the disc (the pale cup missed), the cup there
    probabilities[1, 12:15, 11:14] = 0.9
    np.save(tmp_path / "probabilities.npy", probabilities)
    probe = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from main import FundusLabeld; "
        "labels = FundusLabeld('pred', 0.5)({'pred': np.load('probabilities.npy')})['pred']; np.save('labels.npy', labels.T)"
    )
    subprocess.run([str(SERVER_PYTHON), "-c", probe, str(REPO / "monailabel_app")], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, timeout=300)
    served = np.load(tmp_path / "labels.npy")
    np.testing.assert_array_equal(served, label_map(probabilities >= 0.5, ["disc", "cup"]))
    assert served[3, 14] == 0 and served[8, 14] == 2 and served[12, 24] == 0 and served[16, 10] == 1
    assert (served[12:15, 11:14] == 2).all()


def test_infer_png_and_jpg_returns_aligned_labels_equal_to_bundle_inference(setup, tmp_path):
    server = setup["server"]
    bundle_output = tmp_path / "bundle_inference"
    bundle_inference(setup["bundle"], setup["studies"], bundle_output)
    for image_id in ("wide", "photo"):
        label = infer(server, image_id)
        assert label.shape == (HEIGHT, WIDTH), f"{image_id}: the image's height x width, not transposed"
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        reference = np.asarray(Image.open(bundle_output / f"{image_id}_mask.png"))  # 0/255, same threshold
        assert 0.02 < (reference > 0).mean() < 0.98, "a constant reference would make the comparison vacuous"
        np.testing.assert_array_equal(label.astype(np.int32) * 255, reference, err_msg=image_id)


def test_clicks_segment_as_the_bundle_segments_the_same_prompts(setup, tmp_path):
    """Click-to-segment: each set of clicks gives the label that ``monai.bundle run inference --prompts_file`` gives
    for the same points and box (whose decoding tests/test_network.py checks against sam2's own predictor), so a
    click lands where the grader put it on a non-square image; moving or adding clicks changes the label."""
    server = setup["server"]
    x, y, radius = setup["disc"]
    clicks = {  # MONAI Label's fields, in the image's pixels: [x, y], x the column
        "inside_disc": {"foreground": [[x, y]]},
        "with_background": {"foreground": [[x, y]], "background": [[8, HEIGHT - 8]]},
        "moved_with_box": {"foreground": [[WIDTH - 1 - x, HEIGHT - 1 - y]],
                           "roi": [max(x - radius, 0), max(y - radius, 0), min(x + radius, WIDTH - 1),
                                   min(y + radius, HEIGHT - 1)]},
    }
    # MONAI Label's SAM 2 task sends a 3D roi [x0, y0, x1, y1, z0, z1]: on a 2D image, the same box
    clicks["moved_with_3d_box"] = {**clicks["moved_with_box"], "roi": [*clicks["moved_with_box"]["roi"], 0, 0]}
    # The same photograph under one name per click set, each with its own entry in one prompts file.
    images = tmp_path / "images"
    images.mkdir()
    prompts = {}
    for name, fields in clicks.items():
        (images / f"{name}.png").write_bytes((setup["studies"] / "wide.png").read_bytes())
        points = [[*p, 1] for p in fields.get("foreground", [])] + [[*p, 0] for p in fields.get("background", [])]
        prompts[f"{name}.png"] = {"points": points, **({"box": fields["roi"][:4]} if "roi" in fields else {})}
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    bundle_inference(setup["bundle"], images, tmp_path / "bundle_inference", prompts_file)
    used = json.loads((tmp_path / "bundle_inference" / "prompts_used.json").read_text())["images"]
    assert used["inside_disc.png"]["given"]["points"] == [[x, y, 1]], "the bundle decoded the prompts file's points"

    labels = {}
    for name, fields in clicks.items():
        labels[name] = infer(server, "wide", INTERACTIVE, fields)
        assert labels[name].shape == (HEIGHT, WIDTH), name
        reference = np.asarray(Image.open(tmp_path / "bundle_inference" / f"{name}_mask.png"))
        assert 0.005 < (reference > 0).mean() < 0.995, f"{name}: a constant reference would make this vacuous"
        np.testing.assert_array_equal(labels[name].astype(np.int32) * 255, reference, err_msg=name)
    automatic = infer(server, "wide")
    assert not np.array_equal(labels["inside_disc"], automatic), "a click changes the prompt-free label"
    assert not np.array_equal(labels["inside_disc"], labels["with_background"]), "adding a click changes it"
    assert not np.array_equal(labels["inside_disc"], labels["moved_with_box"]), "moving the click changes it"
    assert np.array_equal(infer(server, "wide", INTERACTIVE, {}), automatic), "no click: the prompt-free label"


def test_served_weights_are_held_once_and_reloaded_in_place(setup, tmp_path):
    """Both tasks serve one network: the click task builds none, and the automatic task serves the network it was
    built with instead of MONAI Label's deep copy of it (at Hiera-large each copy is about 0.9 GB for the server's
    life). A model file that changed, or another file of ``models/`` named as ``model_filename``, is loaded into that
    network, merged as the bundle's inference merges it. MONAI Label's ``preload`` setting loads it at start-up (the
    click task asked for it before it knew the automatic task). In the server's Python, on a copy of the served
    bundle, with the served app's main.py; the expected weights are computed from the files (``W + (alpha / rank)
    B A``)."""
    bundle = shutil.copytree(setup["bundle"], tmp_path / "bundle")  # a copy: the server keeps serving the original
    report = run_in_server_python(
        tmp_path,
        "import gc, json, os, sys, torch\n"
        f"sys.path.insert(0, {str(setup['server'].app)!r})\n"
        "import main\n"
        f"bundle = {str(bundle)!r}\n"
        "models = os.path.join(bundle, 'models')\n"
        "automatic = main.FundusInferTask(bundle, {})\n"
        "clicks = main.FundusInteractiveTask(bundle, {}, automatic)\n"
        "kind = type(automatic.network)\n"
        "def alive():\n"
        "    gc.collect()\n"
        "    return sum(type(o) is kind for o in gc.get_objects())\n"
        "def merged_as_in(name):\n"
        "    state = torch.load(os.path.join(models, name), weights_only=True)\n"
        "    settings = state['_extra_state']\n"
        "    prefix = next(k for k in state if k.endswith('lora_B'))[:-len('lora_B')]\n"
        "    expected = state[prefix + 'weight'] + (state[prefix + 'lora_B'] @ state[prefix + 'lora_A'])"
        " * (settings['lora_alpha'] / settings['lora_rank'])\n"
        "    layer = automatic.network.get_submodule(prefix.rstrip('.'))\n"
        "    return bool(torch.allclose(layer.weight, expected, atol=1e-6)) and layer.merged\n"
        "report = {'built': alive()}\n"
        "network = automatic._get_network('cpu', {})\n"
        "report.update(served=alive(), same=network is automatic.network is clicks._get_network('cpu', {}),"
        " model=merged_as_in('model.pt'))\n"
        "state = torch.load(os.path.join(models, 'model.pt'), weights_only=True)\n"
        "torch.save({k: v * 3 if k.endswith('lora_B') else v for k, v in state.items()},"
        " os.path.join(models, 'model_best.pt'))\n"
        "other = automatic._get_network('cpu', {'model_filename': ['model_best.pt']})\n"
        "report.update(best=merged_as_in('model_best.pt'), best_same=other is network, best_alive=alive())\n"
        "os.remove(os.path.join(models, 'model_best.pt'))\n"
        "again = clicks._get_network('cpu', {})\n"
        "report.update(back=merged_as_in('model.pt'), back_same=again is network, back_alive=alive())\n"
        # another archive's model.pt, unzipped (every entry dated 2020-01-01) and moved over the served one
        "served = os.path.join(models, 'model.pt')\n"
        "def unzip_over_served(content):\n"
        "    torch.save(content, served + '.unzipped')\n"
        "    os.utime(served + '.unzipped', ns=(1577836800 * 10**9, 1577836800 * 10**9))\n"
        "    os.replace(served + '.unzipped', served)\n"
        "    clicks._get_network('cpu', {})\n"
        "    return os.stat(served)\n"
        "before = unzip_over_served(state)\n"
        "after = unzip_over_served({k: v * 2 if k.endswith('lora_B') else v for k, v in state.items()})\n"
        "report.update(same_date=after.st_mtime_ns == before.st_mtime_ns,"
        " swapped=merged_as_in('model.pt'))\n"
        "preloaded = main.FundusInferTask(bundle, {'preload': 'true'})\n"
        "preloaded_clicks = main.FundusInteractiveTask(bundle, {'preload': 'true'}, preloaded)\n"
        "report.update(one_lock=clicks._serving is automatic._serving)\n"
        "report.update(preloaded=list(preloaded._networks) == ['cpu']"
        " and preloaded_clicks._get_network('cpu', {}) is preloaded.network)\n"
        "print(json.dumps(report))\n",
    )
    # One network from start-up on (two once MONAI Label's copy is served, three before the click task built none).
    assert report == {
        "built": 1, "served": 1, "same": True, "model": True,
        "best": True, "best_same": True, "best_alive": 1,
        "back": True, "back_same": True, "back_alive": 1, "same_date": True, "swapped": True,
        "one_lock": True, "preloaded": True}


def test_automatic_model_on_onnxruntime_follows_the_served_model_file(setup, tmp_path):
    """``--conf backend onnxruntime``: a real server whose automatic model runs the bundle's onnxruntime export
    answers with the bundle's own label, exports once next to the model file, and after training-like replacement
    of that file answers with the new model's label from a rebuilt export; clicks still run PyTorch."""
    server = Server(tmp_path, setup["archive"], setup["studies"], ["--conf", "backend", "onnxruntime"])
    try:
        server.wait_ready(START_TIMEOUT)
        bundle = server.app / "model" / BUNDLE_NAME
        labels, references = {}, {}
        for model in ("trained", "retrained"):
            if model == "retrained":  # as training through MONAI Label does: a new file replaces model.pt
                state = torch.load(bundle / "models" / "model.pt", weights_only=True)
                # Adapters of the other sign: another function as well conditioned. Scaled up, random adapters make
                # this random network chaotic (float32 then differs from float64 by tenths of a logit), which the
                # export's check against PyTorch rightly refuses.
                torch.save({k: -v if k.endswith("lora_B") else v for k, v in state.items()}, tmp_path / "new.pt")
                os.replace(tmp_path / "new.pt", bundle / "models" / "model.pt")
            labels[model] = infer(server, "wide")
            bundle_inference(bundle, setup["studies"], tmp_path / model)
            references[model] = np.asarray(Image.open(tmp_path / model / "wide_mask.png")) > 0
            assert 0.02 < references[model].mean() < 0.98, "a constant reference would make the comparison vacuous"
            # onnxruntime's float32 sums in its own order: a pixel at the threshold may flip.
            assert ((labels[model] > 0) == references[model]).mean() > 0.999, model
        assert not np.array_equal(labels["trained"], labels["retrained"]), "the replaced model's label is served"
        log = server.log.read_text(errors="replace")
        assert "(first use; later runs reuse it)" in log and "it was built from other weights" in log, log[-3000:]
        assert (bundle / "models" / "model.onnxruntime.onnx").is_file()
        clicks = infer(server, "wide", INTERACTIVE, {})
        np.testing.assert_array_equal(clicks.astype(np.int32) * 255, references["retrained"].astype(np.int32) * 255)
    finally:
        server.stop()


def test_bad_backend_settings_stop_the_app_with_one_line(setup, tmp_path):
    bundle = shutil.copytree(setup["bundle"], tmp_path / "bundle")
    unknown, int8_on_torch, not_a_flag = run_in_server_python(
        tmp_path,
        "import json, sys\n"
        f"sys.path.insert(0, {str(setup['server'].app)!r})\n"
        "import main\n"
        "messages = []\n"
        "for conf in ({'backend': 'tensorrt'}, {'onnx_int8': 'true'}, {'backend': 'onnxruntime', 'onnx_int8': 'maybe'}):\n"
        "    try:\n"
        f"        main.FundusInferTask({str(bundle)!r}, conf)\n"
        "        messages.append(None)\n"
        "    except main.MONAILabelException as error:\n"
        "        messages.append(error.msg)\n"
        "print(json.dumps(messages))\n",
    )
    assert "backend 'tensorrt' is not one of torch, onnxruntime" in unknown, unknown
    assert "onnx_int8 True needs backend 'onnxruntime'" in int8_on_torch, int8_on_torch
    assert not_a_flag == "--conf onnx_int8 must be true or false, got 'maybe'.", not_a_flag
    assert all("\n" not in message for message in (unknown, int8_on_torch, not_a_flag))


def refused_inference(server, model: str, image: str, status: int) -> str:
    """The detail of an ``/infer`` request for ``image`` that ``model`` refuses with ``status``."""
    body, headers = form({"params": "{}"})
    answered, answer, _ = request(f"{server.url}/infer/{model}?image={image}&output=image", "POST", body, headers)
    assert answered == status, f"{model}: {answered}: {answer[:500]!r}"
    return json.loads(answer)["detail"]


def test_a_picture_with_an_exif_orientation_is_refused_in_one_line(setup):
    for model in (BUNDLE_NAME, INTERACTIVE):
        detail = refused_inference(setup["server"], model, "turned", 422)
        assert detail.startswith("turned.jpg carries an EXIF orientation") and "Save it upright" in detail, detail


def test_an_image_id_not_in_the_datastore_is_a_404_naming_it(setup):
    """An unknown id reached the bundle's reader as the path "" (HTTP 500, `image file not found: .`)."""
    server = setup["server"]
    for model in (BUNDLE_NAME, INTERACTIVE):
        detail = refused_inference(server, model, "nosuch", 404)
        assert detail.startswith("Image 'nosuch' is not in the datastore") and "\n" not in detail, detail
    assert infer(server, "wide").shape == (HEIGHT, WIDTH), "the server answers the next request"


def test_an_unreadable_picture_and_an_unserved_model_are_answered_in_one_line(setup, tmp_path):
    """Both were a bare HTTP 500: the bundle's own message (naming the file) reached only the server's log, and
    MONAI Label's answer to an unknown model has no status of its own."""
    server = setup["server"]
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"not a picture")
    for model in (BUNDLE_NAME, INTERACTIVE):
        detail = refused_inference(server, model, urllib.request.quote(str(bogus)), 422)
        assert detail.startswith(f"cannot read image {bogus}") and "\n" not in detail, detail
    detail = refused_inference(server, "nosuch", "wide", 404)
    assert detail.startswith("No model 'nosuch' is served here") and INTERACTIVE in detail, detail
    assert infer(server, "wide").shape == (HEIGHT, WIDTH), "the server answers the next request"


def test_a_model_file_that_does_not_fit_is_refused_and_the_served_network_kept(setup):
    """``model_filename`` may name any file of ``models/``: one whose tensors do not all fit was loaded in part (every
    tensor that fitted) before torch reported the others, and later requests were served by the mixture."""
    server, models = setup["server"], setup["bundle"] / "models"
    before = infer(server, "wide")
    state = torch.load(models / "model.pt", weights_only=True)
    changed = {key: value + 1 if value.is_floating_point() else value for key, value in state.items()
               if isinstance(value, torch.Tensor)}
    changed["_extra_state"] = state["_extra_state"]
    del changed[next(key for key in changed if key.endswith("lora_B"))]
    torch.save(changed, models / "unfit.pt")
    (models / "damaged.pt").write_bytes(b"PK not a model")
    try:
        for name, message in (("unfit.pt", "does not fit the served network (lacks 1, e.g. "),
                              ("damaged.pt", "cannot be read (")):
            body, headers = form({"params": json.dumps({"model_filename": name})})
            status, answer, _ = request(f"{server.url}/infer/{BUNDLE_NAME}?image=wide&output=image", "POST", body,
                                        headers)
            assert status == 422, f"{name}: {status}: {answer[:500]!r}"
            detail = json.loads(answer)["detail"]
            assert detail.startswith(f"Model file {name} ") and message in detail, detail
            assert "latest_checkpoint.pt is a training checkpoint" in detail, detail
        np.testing.assert_array_equal(infer(server, "wide"), before)
    finally:
        (models / "unfit.pt").unlink()
        (models / "damaged.pt").unlink()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"foreground": [[WIDTH + 5, 10]]}, f"lies outside the {WIDTH}x{HEIGHT} image"),
        ({"roi": [50, 10, 20, 40]}, "needs x0 <= x1 and y0 <= y1"),
        ({"roi": [5, 6, 50, 60, 1, 2]}, "a 2D image has slice 0 only"),
        ({"background": [[10, 10, 3]]}, "a point of a 2D image is [x, y]"),
        ({"foreground": "10,10"}, "'foreground' must be a list of [x, y] points"),
        ({"foreground": [[True, 3]]}, "a point is [x, y, label]; got [True, 3, 1]"),
        ({"foreground": [[10, 10, False]]}, "a point of a 2D image is [x, y] (or [x, y, 0])"),
        ({"roi": [5, 6, 50, 60, False, True]}, "a 2D image has slice 0 only"),
        # Too large for a float (JSON's integers have no limit): OverflowError, a bare 500.
        ({"foreground": [[int("9" * 400), 10]]}, "has a coordinate that is not a finite number"),
        ({"roi": [int("9" * 400), 6, 50, 60]}, "has a coordinate that is not a finite number"),
        # Not lists, but falsy: silently the prompt-free result.
        ({"foreground": 0}, "'foreground' must be a list of [x, y] points; got 0"),
        ({"background": ""}, "'background' must be a list of [x, y] points; got ''"),
        ({"roi": False}, "a box is [x0, y0, x1, y1]; got False"),
        # A device the server does not have: a bare 500, or an error blaming the model file.
        ({"device": "nonsense"}, "device 'nonsense' is not a device: one of cpu"),  # and a GPU server's GPUs
        ({"device": "cpu:1"}, "device 'cpu:1' is not a device of this server: one of cpu"),
    ],
)
def test_bad_clicks_get_a_one_line_answer(setup, fields, message):
    server = setup["server"]
    body, headers = form({"params": json.dumps(fields)})
    status, answer, _ = request(f"{server.url}/infer/{INTERACTIVE}?image=wide&output=image", "POST", body, headers)
    assert status == 422, f"{status}: {answer[:500]!r}"
    detail = json.loads(answer)["detail"]
    assert message in detail and "\n" not in detail, detail


def test_a_label_is_a_png_whatever_the_request_asks(setup):
    """result_extension and result_dtype were settings of the request: .jpg gave a lossy label holding 2 (the cup's
    value), float32 a bare 500."""
    server = setup["server"]
    reference = infer(server, "wide")
    for params in ({"result_extension": ".jpg"}, {"result_dtype": "float32"}):
        np.testing.assert_array_equal(infer(server, "wide", params=params), reference)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"learning_rate": "$__import__('pathlib').Path('{marker}').touch() or 1e-4"}, "'learning_rate' must be a number"),
        ({"device": "cpu') if __import__('pathlib').Path('{marker}').touch() else torch.device('cpu"}, "is not a device"),
        (
            {"tracking": "mlflow", "tracking_run_name": "$__import__('pathlib').Path('{marker}').touch()"},
            "'tracking_run_name' must be plain",
        ),
        # MONAI Label passes the list on whole, and MONAI's parser evaluates the strings inside it.
        (
            {"tracking": "mlflow", "tracking_uri": ["http://127.0.0.1:9", "$__import__('pathlib').Path('{marker}').touch()"]},
            "'tracking_uri' must be plain text",
        ),
        ({"max_epochs": "10"}, "'max_epochs' must be a number; got '10'"),
        ({"tracking": "bogus"}, "'tracking' must be mlflow or None; got 'bogus'"),
        ({"model_filename": "../../model.pt"}, "'model_filename' names a file of the bundle's models folder"),
    ],
)
def test_a_train_request_s_values_are_data_never_code(setup, tmp_path, settings, message):
    """The request's settings become overrides of train.json, whose parser evaluates a string starting with '$'."""
    marker = tmp_path / "evaluated"
    settings = json.loads(json.dumps(settings).replace("{marker}", str(marker)))
    task = train(setup["server"], {"max_epochs": 1, "num_workers": 0, **settings})
    # MONAI Label's task log shows the exception's arguments as Python writes them, quotes escaped.
    details = "\n".join(task.get("details", [])).replace("\\'", "'")
    assert task["status"] == "ERROR" and message in details, details[-3000:]
    assert not marker.exists()


def test_train_on_labels_saved_through_the_api(setup, tmp_path):
    server = setup["server"]
    model = setup["bundle"] / "models" / "model.pt"
    before = sha256(model)
    label_before = infer(server, "wide")
    # Training before any label is saved fails with a message that says what to do.
    task = train(server, {"max_epochs": 1, "num_workers": 0})
    assert task["status"] == "ERROR"
    assert "No image in the datastore has a final label" in "\n".join(task.get("details", [])), task
    assert sha256(model) == before

    for image_id in ("wide", "photo"):
        body, headers = multipart("label", setup["corrected"] / f"{image_id}.png")
        status, answer, _ = request(f"{server.url}/datastore/label?image={image_id}&tag=final", "PUT", body, headers)
        assert status == 200, answer[:500]
        assert json.loads(answer) == {"image": image_id, "label": image_id}
    saved = Image.open(setup["studies"] / "labels" / "final" / "wide.png")
    assert saved.size == (WIDTH, HEIGHT)

    # The served model as an archive of `tools.export --weights merged` holds it: training unmerges the adapters.
    merged = load_trained(model)
    merged.merge_adapters()
    torch.save(merged.state_dict(), model)
    assert any(bool(value) for key, value in torch.load(model, weights_only=True).items() if key.endswith("lora_merged"))
    before = sha256(model)

    settings = {"max_epochs": 1, "num_workers": 0, "batch_size": 1, "accumulation_steps": 1, "val_split": 0.5}
    task = train(server, settings)
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", f"{task['status']}\n{details}\n{server.log_tail()}"
    assert "Restored all variables from" in details and str(model) in details, "fine-tuned the served model"
    assert "Train completed" in details

    assert sha256(model) != before, "training replaced models/model.pt"
    datalist = json.loads((setup["bundle"] / "eval" / "monailabel_datalist.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    assert sorted(Path(entry["image"]).name for entry in entries) == ["photo.jpg", "wide.png"]
    assert all(Path(entry["label"]).parent.name == "final" for entry in entries), "the datastore's final labels"
    state = torch.load(model, map_location="cpu", weights_only=True)
    assert any(key.endswith("lora_B") for key in state) and not any(
        bool(value) for key, value in state.items() if key.endswith("lora_merged")
    ), "saved with the adapters apart, as the bundle saves it"

    # The server serves the new weights (loaded into its network, since the file changed): its label is the one
    # the bundle's own inference gives with the fine-tuned model.pt.
    label = infer(server, "wide")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(setup["studies"] / "wide.png", images)
    bundle_inference(setup["bundle"], images, tmp_path / "bundle_inference")
    reference = np.asarray(Image.open(tmp_path / "bundle_inference" / "wide_mask.png"))
    np.testing.assert_array_equal(label.astype(np.int32) * 255, reference)
    assert not np.array_equal(label, label_before), "training changed the label (else stale weights could pass)"

    # "pretrained": false starts again from Meta's SAM 2 weights, not the served model's; this bundle has none, and
    # the training says which file to fetch. The served model stays.
    trained = sha256(model)
    task = train(server, {**settings, "pretrained": False})
    details = "\n".join(task.get("details", []))
    assert task["status"] == "ERROR", f"{task['status']}\n{details}"
    assert "sam2.1_hiera_tiny.pt" in details and "download_large_files" in details, details[-3000:]
    assert "Restored all variables from" not in details
    assert sha256(model) == trained

    # A labelled picture with an EXIF orientation: the bundle would read it turned, its label as stored.
    body, headers = multipart("label", setup["corrected"] / "wide.png")
    status, answer, _ = request(f"{server.url}/datastore/label?image=turned&tag=final", "PUT", body, headers)
    assert status == 200, answer[:500]
    task = train(server, settings)
    details = "\n".join(task.get("details", []))
    assert task["status"] == "ERROR" and "turned.jpg carries an EXIF orientation" in details, details[-3000:]
    assert sha256(model) == trained


def test_train_a_disc_cup_bundle_on_the_labels_its_infer_returns(setup, tmp_path):
    """The clinician's loop with a disc/cup bundle: /infer's label (1 disc rim, 2 cup) saved back as the final label
    trains the bundle, which reads one mask per channel: each label is split into a disc mask (values 1 and 2: the
    cup lies inside the disc) and a cup mask (value 2). A label with a value above the channel count (a 0/255
    mask) is refused, naming the file and its values. A server of its own, on a datastore of its own."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("wide.png", "photo.jpg"):
        shutil.copy(setup["studies"] / name, studies)
    # Seeded so that the random network's labels hold background, disc rim and cup (checked below).
    network = random_adapted_network(IMAGE_SIZE, seed=3, channel_names=["disc", "cup"])
    torch.save(network.state_dict(), tmp_path / "model.pt")
    result = export_bundle(tmp_path / "dist", tmp_path / "model.pt", weights="full")
    server = Server(tmp_path, result.archive, studies)
    try:
        info = server.wait_ready(START_TIMEOUT)
        assert info["models"][BUNDLE_NAME]["labels"] == {"disc": 1, "cup": 2}
        bundle = server.app / "model" / BUNDLE_NAME
        model = bundle / "models" / "model.pt"
        before = sha256(model)
        labels = {}
        for image_id in ("wide", "photo"):
            labels[image_id] = infer(server, image_id)
            Image.fromarray(labels[image_id]).save(tmp_path / f"{image_id}.png")
        assert set(np.unique(labels["wide"])) == {0, 1, 2}, "a label without a cup would make the split vacuous"

        def save_label(image_id: str, path: Path) -> None:
            body, headers = multipart("label", path)
            status, answer, _ = request(f"{server.url}/datastore/label?image={image_id}&tag=final", "PUT", body,
                                        headers)
            assert status == 200, answer[:500]

        # A vessel grader's 0/255 mask is not a label of this bundle.
        Image.fromarray((labels["wide"] > 0).astype(np.uint8) * 255).save(tmp_path / "mask_0_255.png")
        save_label("wide", tmp_path / "mask_0_255.png")
        settings = {"max_epochs": 1, "num_workers": 0, "batch_size": 1, "accumulation_steps": 1, "val_split": 0.5}
        task = train(server, settings)
        details = "\n".join(task.get("details", []))
        saved = studies / "labels" / "final" / "wide.png"
        assert task["status"] == "ERROR", f"{task['status']}\n{details}"
        assert f"Final label {saved} holds the values 0, 255, but a label of this bundle's 2 channels holds only " \
               "0 background, 1 disc, 2 cup" in details, details[-3000:]
        assert sha256(model) == before

        for image_id in ("wide", "photo"):
            save_label(image_id, tmp_path / f"{image_id}.png")
        task = train(server, settings)
        details = "\n".join(task.get("details", []))
        assert task["status"] == "DONE", f"{task['status']}\n{details}\n{server.log_tail()}"
        assert "Restored all variables from" in details and str(model) in details, "fine-tuned the served model"
        assert sha256(model) != before, "training replaced models/model.pt"

        datalist = json.loads((bundle / "eval" / "monailabel_datalist.json").read_text())
        entries = datalist["training"] + datalist["validation"]
        assert sorted(Path(entry["image"]).name for entry in entries) == ["photo.jpg", "wide.png"]
        for entry in entries:
            image_id = Path(entry["image"]).stem
            masks = [Path(path) for path in entry["label"]]
            assert masks == [bundle / "eval" / "monailabel_labels" / channel / f"{image_id}.png"
                             for channel in ("disc", "cup")], entry
            # As the bundle reads them: the disc holds rim and cup, the cup only the cup.
            np.testing.assert_array_equal(read_label_mask(masks[0]), labels[image_id] >= 1, err_msg=image_id)
            np.testing.assert_array_equal(read_label_mask(masks[1]), labels[image_id] == 2, err_msg=image_id)
    finally:
        server.stop()


def test_a_model_whose_channels_one_label_cannot_hold_is_refused_at_start_up(tmp_path):
    """A label holds the last channel present, and training reads channel c as every value from c + 1 up: right for
    the disc then the cup only. Served before 0.3.22, ['cup', 'disc'] gave labels without the cup (the disc written
    over it) and trained the cup on the whole disc; ['vessels', 'disc', 'cup'] hid the vessels on the disc and
    trained disc and cup as vessels. Both tasks now refuse such a model at start-up, naming its channels in order;
    the disc and cup under other names of theirs, and one channel of any name, are served."""
    network = random_adapted_network(IMAGE_SIZE, seed=3, channel_names=["disc", "cup"])
    torch.save(network.state_dict(), tmp_path / "model.pt")
    result = export_bundle(tmp_path / "dist", tmp_path / "model.pt", weights="full")
    with zipfile.ZipFile(result.archive) as archive:
        archive.extractall(tmp_path / "app")
    bundle = tmp_path / "app" / BUNDLE_NAME
    cases = [["cup", "disc"], ["vessels", "disc", "cup"], ["OD", "OC"], ["Vessels"]]
    answers = run_in_server_python(
        tmp_path,
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(REPO / 'monailabel_app')!r})\n"
        "import main\n"
        f"model = {str(bundle / 'models' / 'model.pt')!r}\n"
        "state = torch.load(model, map_location='cpu', weights_only=True)\n"
        "answers = []\n"
        f"for names in {cases!r}:\n"
        "    state['_extra_state']['channel_names'] = names\n"
        "    torch.save(state, model)\n"
        "    for task in (main.FundusInferTask, main.FundusTrainTask):\n"
        "        try:\n"
        f"            answers.append('valid' if task({str(bundle)!r}, {{}}).is_valid() else 'not valid')\n"
        "        except main.MONAILabelException as error:\n"
        "            answers.append(error.msg)\n"
        "print(json.dumps(answers))\n",
    )
    cup_disc, vessels_disc_cup, aliases, vessels = (answers[index : index + 2] for index in range(0, 8, 2))
    for refused, found in ((cup_disc, "'cup' (cup), 'disc' (disc)"),
                           (vessels_disc_cup, "'vessels' (vessels), 'disc' (disc), 'cup' (cup)")):
        for message in refused:
            assert message.startswith(f"Bundle {bundle}: the model's channels are, in this order, {found}, but "), message
            assert "the app serves a model of one channel, or of disc then cup (channel_names ['disc', 'cup']" in message
            assert "\n" not in message
    assert aliases == vessels == ["valid", "valid"]


def test_serve_script_installs_nothing_from_an_adapters_only_archive(tmp_path):
    """An adapters-only archive (or folder) is refused before it is installed: installed, the app refused it at
    start-up and serve.sh then refused the right archive as well, since an installed bundle is kept."""
    archive = tmp_path / "adapters.zip"
    with zipfile.ZipFile(archive, "w") as written:
        written.writestr(f"{BUNDLE_NAME}/configs/inference.json", "{}")
        written.writestr(f"{BUNDLE_NAME}/models/adapters.pt", "adapters")
    folder = tmp_path / "adapters_folder"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "inference.json").write_text("{}")
    (folder / "models").mkdir()
    (folder / "models" / "adapters.pt").write_text("adapters")
    app = tmp_path / "app"
    for bundle in (archive, folder):
        command = ["bash", str(SERVE), "--studies", str(tmp_path), "--app", str(app), "--bundle", str(bundle)]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"serve.sh: {bundle} holds the LoRA adapters only (models/adapters.pt, no models/model.pt): MONAI Label "
            "loads full weights; export with `python -m tools.export --weights full` (or merged) and pass that "
            "archive. Nothing was installed."
        ), result.stderr
        assert not app.exists(), "nothing installed, no extraction left behind, no app folder"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "--studies FOLDER is required"),
        (["--studies", "{tmp}/absent"], "does not exist"),
        (["--studies", "{tmp}", "--bundle", "{tmp}/not_a_zip.zip"], "cannot be extracted"),
        (["--studies", "{tmp}", "--port", "http"], "--port must be a number"),
        (["--studies", "{tmp}", "--port", "99999"], "--port must be a number from 1 to 65535, got 99999"),
        (["--studies", "{tmp}", "--", "--host", "0.0.0.0"], "--host after -- is not passed on"),
        (["--studies", "{tmp}", "--", "--conf", "skip_trainers", "true", "-i", "0.0.0.0"], "-i after -- is not passed on"),
        (["--studies", "{tmp}", "--", "--port=9000"], "--port=9000 after -- is not passed on"),
        (["--studies", "{tmp}", "--bundle", "{tmp}/absent.zip"], "bundle {tmp}/absent.zip does not exist"),
        (["--studies", "{tmp}", "--port", "{busy}"], "cannot listen on 127.0.0.1 port {busy} (in use by another"),
    ],
)
def test_serve_script_refuses_bad_arguments_in_one_line(tmp_path, arguments, message):
    """Refused before the app folder is touched (a missing archive created it and copied main.py into it; a port in
    use was found once the app had started and installed the bundle, which then refused the retry)."""
    (tmp_path / "not_a_zip.zip").write_text("no archive")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"tmp": tmp_path, "busy": busy.getsockname()[1]}
        command = ["bash", str(SERVE), *(argument.format(**values) for argument in arguments), "--app",
                   str(tmp_path / "app")]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message.format(**values) in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "app").exists()


def test_serve_script_keeps_an_installed_bundle_and_warns_about_other_hosts(tmp_path):
    installed = tmp_path / "app" / "model" / "sam2lora_fundus"
    (installed / "models").mkdir(parents=True)
    (installed / "models" / "model.pt").write_bytes(b"a fine-tuned model")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text("{}")
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"another model")
    command = ["bash", str(SERVE), "--studies", str(tmp_path), "--app", str(tmp_path / "app"), "--bundle", str(bundle),
               "--host", "0.0.0.0", "--port", str(free_port())]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    warning, refusal = result.stderr.strip().splitlines()
    assert warning.startswith("serve.sh: WARNING: listening on 0.0.0.0.") and "path-traversal" in warning
    assert refusal == f"serve.sh: {installed} already exists (it may hold a fine-tuned model); remove it, or omit --bundle"
    assert (installed / "models" / "model.pt").read_bytes() == b"a fine-tuned model"
    assert not (installed / "configs").exists(), "the installed bundle is left as it was"
