"""Prompts: oracle prompts drawn from reference masks, automatic prompts, prompts files, and the mapping onto the
picture the network sees, checked against SAM 2's own transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sam2.utils.transforms import SAM2Transforms
from scipy import ndimage

from scripts.prompts import (
    AUTO_MODES,
    ORACLE_MODES,
    PROMPT_EROSION_PX,
    PROMPTS_RECORD_FORMAT,
    Prompt,
    PromptError,
    _most_confident_first,
    auto_prompt,
    auto_prompts,
    oracle_prompt,
    oracle_prompts,
    read_prompts_file,
)

HEIGHT, WIDTH = 130, 200  # not square: x and y scale differently


def disc(center: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def test_oracle_prompts_are_seeded_by_image_and_seed():
    mask = disc((60, 90), 25)
    first = oracle_prompt(mask, "5_points", "a.png", seed=0)
    assert first == oracle_prompt(mask, "5_points", "a.png", seed=0), "the same image and seed: the same prompt"
    assert first != oracle_prompt(mask, "5_points", "b.png", seed=0)
    assert first != oracle_prompt(mask, "5_points", "a.png", seed=1)


def test_oracle_points_of_more_points_add_to_those_of_fewer():
    """Comparing modes then compares what a mode adds, not two draws: 1 point is the first of 2, 2 the first of 5,
    and 5 points with a box are the 5 points, whatever modes are asked for together and in what order."""
    mask = disc((60, 90), 25)
    together = oracle_prompts(mask, ["5_points_box", "1_point", "5_points", "2_points"], "eye.png")
    alone = {mode: oracle_prompt(mask, mode, "eye.png") for mode in ("1_point", "2_points", "5_points")}
    assert {mode: together[mode] for mode in alone} == alone
    assert together["2_points"].points[:1] == together["1_point"].points
    assert together["5_points"].points[:2] == together["2_points"].points
    assert together["5_points_box"].points == together["5_points"].points
    assert len(set(together["5_points"].points)) == 5
    # A core of fewer pixels than a mode needs gives its points again.
    speck = np.zeros((HEIGHT, WIDTH), bool)
    speck[10, 10:13] = True
    points = oracle_prompt(speck, "5_points", "eye.png").points
    assert set(points) == {(10.0, 10.0, 1), (11.0, 10.0, 1), (12.0, 10.0, 1)} and points[3:] == points[:2]


@pytest.mark.parametrize("mode, points, has_box", [("1_point", 1, False), ("2_points", 2, False), ("5_points", 5, False),
                                                   ("box", 0, True), ("5_points_box", 5, True)])
def test_oracle_points_lie_in_the_eroded_structure_and_the_box_bounds_it(mode, points, has_box):
    mask = disc((60, 90), 25)
    prompt = oracle_prompt(mask, mode, "case.png")
    assert len(prompt.points) == points
    core = ndimage.binary_erosion(mask, iterations=PROMPT_EROSION_PX)
    for x, y, label in prompt.points:
        assert label == 1 and core[int(y), int(x)], (x, y)
    rows, cols = np.nonzero(mask)
    expected_box = (cols.min(), rows.min(), cols.max(), rows.max())
    assert (prompt.box == tuple(float(v) for v in expected_box)) if has_box else prompt.box is None


def test_an_empty_reference_gives_no_prompt():
    assert oracle_prompt(np.zeros((HEIGHT, WIDTH), bool), "box", "empty.png").empty


def test_auto_box_bounds_the_largest_found_region_with_its_margin():
    probability = np.where(disc((60, 90), 25), 0.9, 0.1)
    probability[5:10, 5:10] = 0.95  # a smaller, more confident blob must not win
    prompt = auto_prompt(probability, "auto_box", box_margin=0.1)
    x0, y0, x1, y1 = 65.0, 35.0, 115.0, 85.0  # the disc's bounding box, 51 px wide and high
    margin = 0.1 * 51
    assert prompt.box == pytest.approx((x0 - margin, y0 - margin, x1 + margin, y1 + margin))
    assert not prompt.points


def test_auto_points_start_at_the_most_confident_place_and_stay_in_the_region():
    region = disc((60, 90), 25)
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    probability = np.where(region, 0.6 + 0.3 * np.exp(-((rows - 70) ** 2 + (cols - 100) ** 2) / 50.0), 0.05)
    prompt = auto_prompt(probability, "auto_points", points=3, negative_points=2)
    positives = [p for p in prompt.points if p[2] == 1]
    negatives = [p for p in prompt.points if p[2] == 0]
    assert positives[0][:2] == (100.0, 70.0), "the peak first"
    assert len(positives) == 3 and all(region[int(y), int(x)] for x, y, _ in positives)
    assert len(negatives) == 2 and not any(region[int(y), int(x)] for x, y, _ in negatives)


def test_automatic_negative_points_stay_inside_the_field_of_view():
    region = disc((60, 90), 20)
    retina = disc((65, 100), 62)  # the photograph's black border lies outside
    probability = np.where(region, 0.9, 0.05)
    prompt = auto_prompt(probability, "auto_points", fov=retina, points=1, negative_points=3)
    negatives = [(int(y), int(x)) for x, y, label in prompt.points if label == 0]
    assert len(negatives) == 3 and all(retina[row, col] and not region[row, col] for row, col in negatives)
    assert not retina[0, 0] and (0, 0) in [
        (int(y), int(x)) for x, y, label in auto_prompt(probability, "auto_points", negative_points=3).points
    ], "without the field of view the first negative is the picture's corner"


def test_nothing_found_keeps_the_prompt_free_result():
    assert auto_prompt(np.full((HEIGHT, WIDTH), 0.2), "auto_box").empty


def test_the_first_pass_finds_what_the_masks_call_foreground():
    probability = np.full((HEIGHT, WIDTH), 0.2, np.float32)
    probability[40:60, 50:90] = 0.5  # exactly at the threshold: foreground in the written masks
    assert auto_prompt(probability, "auto_box", box_margin=0.0).box == (50.0, 40.0, 89.0, 59.0)


def test_modes_drawn_together_equal_each_mode_drawn_alone():
    """The inferer draws all of an image's modes in one call, sharing the eroded core and the found region."""
    mask = disc((60, 90), 25)
    together = oracle_prompts(mask, ["none", *ORACLE_MODES], "case.png", seed=3)
    assert list(together) == ["none", *ORACLE_MODES]
    assert together == {mode: oracle_prompt(mask, mode, "case.png", seed=3) for mode in ["none", *ORACLE_MODES]}
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    probability = np.where(mask, 0.6 + 0.3 * np.exp(-((rows - 70) ** 2 + (cols - 100) ** 2) / 50.0), 0.05)
    settings = {"points": 4, "negative_points": 1, "box_margin": 0.2}
    assert auto_prompts(probability, AUTO_MODES, **settings) == {
        mode: auto_prompt(probability, mode, **settings) for mode in AUTO_MODES
    }


def test_prompts_of_a_structure_moved_within_a_larger_picture_move_with_it():
    """Prompts are drawn inside the structure's bounding box, then put back into the picture's pixels: the same
    structure and first pass, moved by (dx, dy) into a larger picture, give the same prompts moved by (dx, dy). The
    structure touches the small picture's corner, where erosion meets the picture's edge."""
    dy, dx = 17, 29
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    structure = disc((10, 12), 30) | ((rows > 40) & (rows < 50) & (cols < 80))  # a disc cut by the corner, a bar
    probability = np.where(structure, 0.6 + 0.3 * np.exp(-((rows - 20) ** 2 + (cols - 25) ** 2) / 80.0), 0.05)
    probability[100:110, 150:160] = 0.97  # a smaller, more confident region, which must not be prompted for
    moved_structure = np.zeros((HEIGHT + 60, WIDTH + 50), dtype=bool)
    moved_structure[dy : dy + HEIGHT, dx : dx + WIDTH] = structure
    moved_probability = np.full(moved_structure.shape, 0.05)
    moved_probability[dy : dy + HEIGHT, dx : dx + WIDTH] = probability

    def moved(prompt: Prompt) -> tuple:
        box = None if prompt.box is None else (prompt.box[0] + dx, prompt.box[1] + dy, prompt.box[2] + dx, prompt.box[3] + dy)
        return tuple((x + dx, y + dy, label) for x, y, label in prompt.points), box

    for mode in ORACLE_MODES:
        here, there = oracle_prompt(structure, mode, "a.png"), oracle_prompt(moved_structure, mode, "a.png")
        assert moved(here) == (there.points, there.box), mode
    core = ndimage.binary_erosion(moved_structure, iterations=PROMPT_EROSION_PX)
    assert all(core[int(y), int(x)] for x, y, _ in oracle_prompt(moved_structure, "5_points", "a.png").points)
    for mode, settings in (("auto_points", {"points": 4}), ("auto_box", {"box_margin": 0.0})):
        here, there = auto_prompt(probability, mode, **settings), auto_prompt(moved_probability, mode, **settings)
        assert moved(here) == (there.points, there.box), mode
    assert auto_prompt(probability, "auto_box", box_margin=0.0).box == (0.0, 0.0, 79.0, 49.0)


def test_auto_points_among_equally_confident_pixels_are_taken_in_raster_order():
    region = disc((60, 90), 25)
    prompt = auto_prompt(np.where(region, 1.0, 0.0), "auto_points", points=1)
    first_row, first_col = np.argwhere(region)[0]
    assert prompt.points == ((float(first_col), float(first_row), 1),)


def test_confidence_ranking_in_slices_equals_one_full_stable_sort():
    """auto_points ranks a large region in growing slices; the order must be that of sorting it all at once."""
    generator = np.random.default_rng(0)
    # Few distinct values, so that ties straddle every slice's border.
    probability = generator.integers(0, 40, size=(300, 400)).astype(np.float32) / 40.0
    component = generator.random((300, 400)) < 0.7
    inside = np.flatnonzero(component)
    expected = [divmod(int(i), 400) for i in inside[np.argsort(-probability.ravel()[inside], kind="stable")]]
    assert list(_most_confident_first(probability, component)) == expected


def test_points_and_box_map_onto_the_network_picture_as_sam2_maps_them():
    prompt = Prompt(points=((150.0, 20.0, 1), (12.5, 100.0, 0)), box=(40.0, 30.0, 160.0, 110.0))
    side = 256
    given = prompt.to_network((HEIGHT, WIDTH), (side, side))
    sam2 = SAM2Transforms(resolution=side, mask_threshold=0.0)
    box = sam2.transform_boxes(torch.tensor([prompt.box]), normalize=True, orig_hw=(HEIGHT, WIDTH)).reshape(-1, 2)
    points = sam2.transform_coords(torch.tensor([p[:2] for p in prompt.points]), normalize=True, orig_hw=(HEIGHT, WIDTH))
    torch.testing.assert_close(given["point_coords"][0], torch.cat([box, points]))
    assert given["point_labels"][0].tolist() == [2, 3, 1, 0], "the box as SAM's corner labels, then the points"


def test_prompts_file_errors_name_the_file_the_image_and_the_value(tmp_path):
    sizes = {"a.png": (HEIGHT, WIDTH)}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"a.png": {"points": [[10, 20, 1]], "box": [1, 2, 30, 40]}}))
    assert read_prompts_file(path, sizes)["a.png"] == Prompt(points=((10.0, 20.0, 1),), box=(1.0, 2.0, 30.0, 40.0))
    path.write_text(json.dumps({"a.png": {"box": [0, 0, WIDTH, HEIGHT]}}))  # to the edges, ends one past the last
    assert read_prompts_file(path, sizes)["a.png"].box == (0.0, 0.0, WIDTH, HEIGHT)
    cases = [
        ({"b.png": {"box": [1, 2, 3, 4]}}, "names 1 images that are not in the image folder, e.g. 'b.png'"),
        ({"a.png": {"points": [[250, 20, 1]]}}, "image a.png: point [250, 20, 1] lies outside the 200x130 image"),
        ({"a.png": {"points": [[10, 20, 5]]}}, "point label must be 1 (positive) or 0 (negative); got 5"),
        ({"a.png": {"box": [30, 2, 10, 40]}}, "box [30, 2, 10, 40] needs x0 <= x1 and y0 <= y1"),
        ({"a.png": {"box": [0, 0, WIDTH + 1, HEIGHT]}}, f"box [0, 0, {WIDTH + 1}, {HEIGHT}] reaches outside the"),
        # Python's json reads NaN, which every comparison lets through: the network then answered NaN everywhere.
        ({"a.png": {"box": [float("nan"), 2, 30, 40]}}, "box [nan, 2, 30, 40] has a coordinate that is not a finite"),
        ({"a.png": {"points": [[10, float("nan"), 1]]}}, "point [10, nan, 1] has a coordinate that is not a finite"),
        # JSON's integers have no limit: one beyond a float's range raised OverflowError, a traceback.
        ({"a.png": {"points": [[10**400, 20, 1]]}}, "has a coordinate that is not a finite number"),
        ({"a.png": {"box": [1, 2, 10**400, 40]}}, "has a coordinate that is not a finite number"),
        ({"a.png": {"circle": [1, 2]}}, "a prompt is an object with 'points' and/or 'box'"),
        # JSON's true is no coordinate (Python reads it as 1).
        ({"a.png": {"points": [[True, 20, 1]]}}, "a point is [x, y, label]; got [True, 20, 1]"),
        ({"a.png": {"box": [1, 2, 30, False]}}, "a box is [x0, y0, x1, y1]; got [1, 2, 30, False]"),
    ]
    for content, message in cases:
        path.write_text(json.dumps(content))
        with pytest.raises(PromptError) as caught:
            read_prompts_file(path, sizes)
        assert str(path) in str(caught.value) and message in str(caught.value), str(caught.value)
    path.write_text("{not json")
    with pytest.raises(PromptError, match="cannot be read as JSON"):
        read_prompts_file(path, sizes)


def test_prompts_of_an_image_the_run_leaves_out_are_not_used_and_the_others_are(tmp_path, caplog):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"a.png": {"box": [1, 2, 30, 40]}, "broken.png": {"box": [1, 2, 3, 4]}}))
    with caplog.at_level("WARNING", logger="scripts.prompts"):
        prompts = read_prompts_file(path, {"a.png": (HEIGHT, WIDTH)}, left_out=["broken.png"])
    assert list(prompts) == ["a.png"]
    assert "the prompts of 1 images left out of the run are not used, e.g. 'broken.png'" in caplog.text


def test_a_runs_record_of_its_prompts_is_read_back_as_its_given_prompts(tmp_path, caplog):
    """prompts_used.json as inference writes it: per image, the prompt of the mode used, in the photograph's pixels."""
    sizes = {"a.png": (HEIGHT, WIDTH), "b.png": (HEIGHT, WIDTH), "c.png": (HEIGHT, WIDTH)}
    given = Prompt(points=((10.0, 20.0, 1),), box=(1.0, 2.0, 30.0, 40.0))
    record = {
        "format": PROMPTS_RECORD_FORMAT,
        "images": {
            "a.png": {"given": given.to_json()},
            "b.png": {"auto_box": Prompt(box=(5.0, 5.0, 50.0, 60.0)).to_json()},
            "c.png": {"none": Prompt().to_json()},
        },
    }
    path = tmp_path / "prompts_used.json"
    path.write_text(json.dumps(record))
    with caplog.at_level("INFO", logger="scripts.prompts"):
        assert read_prompts_file(path, sizes) == {"a.png": given}
    assert "the given prompts of 1 images are used" in caplog.text
    assert "(automatic or oracle modes) for 1 images (e.g. 'b.png') are not" in caplog.text
    cases = [
        ({"format": "sam2lora-prompts/2", "images": {}}, "not a prompts file nor a run record of format"),
        ({"format": PROMPTS_RECORD_FORMAT}, "not a prompts file nor a run record of format"),
        ({"format": PROMPTS_RECORD_FORMAT, "images": {"a.png": [1, 2]}}, "image a.png: a run record maps each image"),
        ({"format": PROMPTS_RECORD_FORMAT, "images": {"d.png": {"given": {"box": [1, 2, 3, 4]}}}}, "e.g. 'd.png'"),
    ]
    for content, message in cases:
        path.write_text(json.dumps(content))
        with pytest.raises(PromptError) as caught:
            read_prompts_file(path, sizes)
        assert str(path) in str(caught.value) and message in str(caught.value), str(caught.value)
