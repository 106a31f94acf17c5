"""Offline scoring and submission files: formats, validation with line numbers, round trips."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import InputError
from data_prep.synthetic import generate
from pipeline.cli import main
from pipeline.oid_metric import evaluate
from pipeline.scoring import load_ground_truth, read_predictions, score_files
from pipeline.submission import check_submission, prediction_string, write_submission


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=0, num_validation=30, seed=5)
    files = dict(boxes_csv=str(root / "validation-annotations-bbox.csv"),
                 labels_csv=str(root / "validation-annotations-human-imagelabels.csv"),
                 hierarchy_json=str(root / "label-hierarchy.json"), classes_csv=str(root / "classes-description.csv"))
    return root, files


def _noisy_detections(inputs, seed=0):
    """Jittered copies of the ground truth plus random boxes, with distinct scores."""
    rng = np.random.default_rng(seed)
    gt = inputs.gt
    n = len(gt.boxes)
    boxes = np.clip(gt.boxes + rng.normal(0, 0.03, (n, 4)), 0, 1)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.01)
    extra = rng.random((40, 2)) * 0.7
    extra_boxes = np.concatenate([extra, extra + 0.2], axis=1)
    image = np.concatenate([gt.box_image, rng.integers(0, gt.num_images, 40)])
    cls = np.concatenate([gt.box_class, rng.integers(0, gt.num_classes, 40)])
    box = np.concatenate([boxes, extra_boxes])
    score = rng.permutation(len(image)) / len(image) + 0.001
    return image, cls, score, np.clip(box, 0, 1)


def test_tf_csv_and_submission_give_the_in_memory_map(dataset, tmp_path):
    root, files = dataset
    inputs = load_ground_truth(**files)
    image, cls, score, box = _noisy_detections(inputs)
    expected = evaluate(inputs.gt, image, cls, score, box).mean_ap()
    assert 0.2 < expected < 1.0
    ids, mids = inputs.images.ids, inputs.labels.mids
    tf_csv = tmp_path / "preds.csv"
    lines = ["ImageID,LabelName,Score,XMin,XMax,YMin,YMax"] + [
        f"{ids[i]},{mids[c]},{float(s)!r},{float(b[0])!r},{float(b[2])!r},{float(b[1])!r},{float(b[3])!r}" for i, c, s, b in zip(image, cls, score, box, strict=True)]
    tf_csv.write_text("\n".join(lines) + "\n")
    assert score_files(**files, predictions=str(tf_csv))["mAP"] == pytest.approx(expected, abs=1e-12)

    rows = []
    for k, image_id in enumerate(ids):
        sel = image == k
        rows.append((image_id, prediction_string([mids[c] for c in cls[sel]], score[sel], box[sel])))
    sub = tmp_path / "submission.csv"
    write_submission(sub, rows)
    assert check_submission(sub, set(mids), set(ids)) == {"images": len(ids), "detections": len(score)}
    # 5-decimal coordinates in the file: the same mAP up to that rounding
    assert score_files(**files, predictions=str(sub))["mAP"] == pytest.approx(expected, abs=2e-3)
    # and the CLI writes the report
    out = tmp_path / "report.json"
    assert main(["score", "--boxes", files["boxes_csv"], "--labels", files["labels_csv"], "--hierarchy",
                 files["hierarchy_json"], "--classes", files["classes_csv"], "--predictions", str(sub),
                 "--out", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert data["mAP"] == pytest.approx(expected, abs=2e-3) and set(data["per_class"]) <= set(mids)


def test_predictions_on_unknown_images_and_mids_are_counted(dataset, tmp_path):
    root, files = dataset
    inputs = load_ground_truth(**files)
    path = tmp_path / "p.csv"
    path.write_text("ImageID,LabelName,Score,XMin,XMax,YMin,YMax\nnot_an_image,/m/syn_circle,0.9,0,1,0,1\n"
                    f"{inputs.images.ids[0]},/m/unknown,0.9,0,1,0,1\n")
    preds = read_predictions(str(path), inputs)
    assert preds.unknown_mids == 1 and preds.image.tolist() == [-1]
    path.write_text("Foo,Bar\n1,2\n")
    with pytest.raises(InputError, match="unknown predictions format"):
        read_predictions(str(path), inputs)


@pytest.mark.parametrize("line, message", [
    ("img1,/m/a 0.5 0.1 0.1 0.2", "not a multiple of 6"),
    ("img1,/m/zz 0.5 0.1 0.1 0.2 0.2", "unknown LabelName '/m/zz'"),
    ("img1,/m/a 0.5 0.1 0.1 1.2 0.2", "outside [0,1]"),
    ("img1,/m/a 0.5 0.3 0.1 0.2 0.2", "min > max"),
    ("img1,/m/a x 0.1 0.1 0.2 0.2", "non-numeric"),
    ("img0,", "duplicate ImageId img0"),
])
def test_validator_names_the_line(tmp_path, line, message):
    path = tmp_path / "s.csv"
    path.write_text(f"ImageId,PredictionString\nimg0,/m/a 0.9 0 0 1 1\n{line}\n")
    with pytest.raises(InputError) as info:
        check_submission(path, {"/m/a"})
    assert f"{path}:3:" in str(info.value) and message in str(info.value)


def test_validator_header_and_missing_images(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("ImageID,PredictionString\n")
    with pytest.raises(InputError, match=":1: header"):
        check_submission(path)
    write_submission(path, [("a", ""), ("b", "/m/a 0.5 0 0 1 1")])
    assert check_submission(path, {"/m/a"}, {"a", "b"}) == {"images": 2, "detections": 1}
    with pytest.raises(InputError, match="1 expected images are missing .*, e.g. c"):
        check_submission(path, {"/m/a"}, {"a", "b", "c"})
    assert main(["submission", "--check", str(path)]) == 0


def test_check_against_the_expected_images_names_missing_and_extra_ones(tmp_path, capsys):
    from tests.conftest import jpeg_bytes

    path = tmp_path / "s.csv"
    write_submission(path, [("img1", ""), ("img2", "/m/a 0.5 0 0 1 1"), ("stray9", "")])
    images = tmp_path / "test"
    images.mkdir()
    for image_id in ("img1", "img2", "img3"):
        (images / f"{image_id}.jpg").write_bytes(jpeg_bytes())
    listing = tmp_path / "test-images.csv"
    listing.write_text("ImageID,Subset\nimg1,test\nimg2,test\nimg3,test\n")
    plain = tmp_path / "ids.txt"
    plain.write_text("img1\nimg2\nstray9\n")
    for expected in (images, listing):
        assert main(["submission", "--check", str(path), "--images", str(expected)]) == 2
        err = capsys.readouterr().err
        assert "1 expected images are missing" in err and "img3" in err
        assert "1 images are not in the expected set" in err and "stray9" in err
    assert main(["submission", "--check", str(path), "--images", str(plain)]) == 0
    assert "every one of the 3 expected images listed once" in capsys.readouterr().out


def test_prediction_string_clips_sorts_and_caps():
    text = prediction_string(["/m/a", "/m/b", "/m/c"], np.array([0.2, 0.9, 0.5]),
                             np.array([[-0.1, 0.2, 0.5, 1.3], [0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4]]), 2)
    assert text == "/m/b 0.9 0.1 0.1 0.2 0.2 /m/c 0.5 0.3 0.3 0.4 0.4"
    assert prediction_string(["/m/a"], np.array([0.25]), np.array([[-0.1, 0.2, 0.5, 1.3]])) == "/m/a 0.25 0 0.2 0.5 1"


def test_quoted_headers_are_read(dataset, tmp_path):
    root, files = dataset
    inputs = load_ground_truth(**files)
    path = tmp_path / "q.csv"
    path.write_text('"ImageID","LabelName","Score","XMin","XMax","YMin","YMax"\n'
                    f'"{inputs.images.ids[0]}","/m/syn_circle",0.5,0.1,0.2,0.1,0.2\n')
    preds = read_predictions(str(path), inputs)
    assert preds.image.tolist() == [0] and preds.score.tolist() == [0.5]


def test_non_finite_predictions_are_rejected_with_their_lines(dataset, tmp_path, capsys):
    """NaN on half of a perfect prediction set used to move the mAP silently; now those rows are left
    out, named by line, and the rest scores as it should."""
    root, files = dataset
    inputs = load_ground_truth(**files)
    gt = inputs.gt
    ids, mids = inputs.images.ids, inputs.labels.mids
    rows = ["ImageID,LabelName,Score,XMin,XMax,YMin,YMax"]
    for k in range(len(gt.boxes)):
        b = gt.boxes[k]
        rows.append(f"{ids[gt.box_image[k]]},{mids[gt.box_class[k]]},0.9,{b[0]},{b[2]},{b[1]},{b[3]}")
    perfect = tmp_path / "perfect.csv"
    perfect.write_text("\n".join(rows) + "\n")
    clean = score_files(**files, predictions=str(perfect))
    poisoned_rows = list(rows)
    for k in (1, 3):
        poisoned_rows[k] = poisoned_rows[k].replace(",0.9,", ",nan,")
    poisoned_rows[5] = poisoned_rows[5].rsplit(",", 1)[0] + ",inf"
    poisoned = tmp_path / "poisoned.csv"
    poisoned.write_text("\n".join(poisoned_rows) + "\n")
    data = score_files(**files, predictions=str(poisoned))
    assert data["predictions_rejected_non_finite"] == {"rows": 3, "lines": [2, 4, 6]}
    assert data["num_predictions"] == clean["num_predictions"] - 3
    assert main(["score", *[f"--{k.removesuffix('_csv').removesuffix('_json')}={v}" for k, v in files.items()],
                 "--predictions", str(poisoned), "--out", str(tmp_path / "r.json")]) == 0
    assert "3 prediction rows with NaN / inf values were left out (lines 2, 4, 6)" in capsys.readouterr().err


def test_predictions_on_no_ground_truth_image_are_an_error(dataset, tmp_path):
    root, files = dataset
    path = tmp_path / "other.csv"
    path.write_text("ImageID,LabelName,Score,XMin,XMax,YMin,YMax\nnot-an-image,/m/x,0.5,0,1,0,1\n")
    inputs = load_ground_truth(**files)
    path.write_text(f"ImageID,LabelName,Score,XMin,XMax,YMin,YMax\nnot-an-image,{inputs.labels.mids[0]},0.5,0,1,0,1\n")
    with pytest.raises(InputError, match="none of its 1 predictions is on an image of the ground truth"):
        score_files(**files, predictions=str(path))


def test_dropped_ground_truth_rows_are_reported(dataset, tmp_path, capsys):
    root, files = dataset
    boxes = open(files["boxes_csv"]).read().splitlines()
    header = boxes[0].split(",")
    row = boxes[1].split(",")
    row[header.index("XMin")], row[header.index("XMax")] = "0.9", "0.1"  # xmin > xmax
    bad = tmp_path / "boxes.csv"
    bad.write_text("\n".join([boxes[0], ",".join(row), *boxes[2:], boxes[1].replace(boxes[1].split(",")[2], "/m/nope")])
                   + "\n")
    preds = tmp_path / "p.csv"
    inputs = load_ground_truth(**files)
    b = inputs.gt.boxes[0]
    preds.write_text(f"ImageID,LabelName,Score,XMin,XMax,YMin,YMax\n{inputs.images.ids[inputs.gt.box_image[0]]},"
                     f"{inputs.labels.mids[inputs.gt.box_class[0]]},0.5,{b[0]},{b[2]},{b[1]},{b[3]}\n")
    data = score_files(**{**files, "boxes_csv": str(bad)}, predictions=str(preds))
    assert sum(data["ground_truth_rejects"]["counts"].values()) == 2
    assert {r["line"] for r in data["ground_truth_rejects"]["records"]} == {2, len(boxes) + 1}


def test_one_rule_for_a_bom_and_quoted_line_breaks_in_the_validator_and_the_scorer(dataset, tmp_path):
    """A UTF-8 BOM (what Excel writes) is accepted by both; a line break inside a quoted field is
    rejected by both, naming the line it starts on (a PredictionString is one line)."""
    root, files = dataset
    inputs = load_ground_truth(**files)
    ids, mids = inputs.images.ids, inputs.labels.mids
    rows = [(image_id, f"{mids[0]} 0.9 0.1 0.1 0.5 0.5") for image_id in ids]
    plain = tmp_path / "plain.csv"
    write_submission(plain, rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert check_submission(bom, set(mids), set(ids)) == check_submission(plain, set(mids), set(ids))
    assert score_files(**files, predictions=str(bom))["mAP"] == score_files(**files, predictions=str(plain))["mAP"]
    lines = plain.read_text().splitlines()
    image_id = lines[3].split(",")[0]
    lines[3] = f'{image_id},"{mids[0]} 0.9 0.1 0.1\n0.5 0.5"'
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"broken.csv:4: a line break inside a quoted field"):
        check_submission(broken, set(mids))
    with pytest.raises(InputError, match=r"broken.csv:4: a line break inside a quoted field"):
        score_files(**files, predictions=str(broken))
