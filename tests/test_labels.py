"""Labels that travel with the model, and how calibration maps a data set's labels through them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from littlebig.client.datasets import load_image_set
from littlebig.labels import ClassLabels, LabelError, imagenet_labels

DIGITS = ClassLabels(tuple(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))


def photo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def test_imagenet_labels_name_ids_and_synonyms():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels.ids[0] == "n01440764"
    assert labels.index_of("n01443537", "test") == 1  # wnid
    assert labels.index_of("tench", "test") == 0  # first synonym of "tench, Tinca tinca"
    assert labels.index_of("Tinca_tinca", "test") == 0  # case and underscores ignored
    assert labels.index_of("7", "test") == 7  # an index
    with pytest.raises(LabelError, match="'crane' .* several"):  # ImageNet has two cranes
        labels.index_of("crane", "test")
    with pytest.raises(LabelError, match="'n99999999' \\(row 3\\) is not one of the model's 1000 classes"):
        labels.index_of("n99999999", "row 3")


def test_label_file_forms(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("cat\ndog\n")
    assert ClassLabels.from_file(plain) == ClassLabels(("cat", "dog"))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("c1\tcat\nc2\tdog\n")
    assert ClassLabels.from_file(pairs) == ClassLabels(("cat", "dog"), ("c1", "c2"))
    tsv = tmp_path / "classes.tsv"
    tsv.write_text("index\twnid\tname\n0\tn1\tcat\n1\tn2\tdog\n")
    assert ClassLabels.from_file(tsv) == ClassLabels(("cat", "dog"), ("n1", "n2"))
    assert ClassLabels.from_json(DIGITS.to_json()) == DIGITS
    with pytest.raises(LabelError, match="does not exist"):
        ClassLabels.from_file(tmp_path / "missing.txt")
    tsv.write_text("index\twnid\tname\n0\tn1\tcat\n1\tn2\n")
    with pytest.raises(LabelError, match="line 3: expected index<TAB>id<TAB>name"):
        ClassLabels.from_file(tsv)


def test_a_truncated_image_is_named(tmp_path):
    from littlebig.client.images import load_image

    path = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), "red").save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=f"cannot read image {path}: "):
        load_image(path)


def test_imagefolder_with_wnid_folders_maps_through_the_model_labels(tmp_path):
    # Ten ImageNet classes as an ImageFolder: positions 0..9 would be wrong; the wnids are right.
    wnids = {"n01443537": 1, "n01484850": 2, "n02085620": 151}
    for wnid in wnids:
        photo(tmp_path / wnid / "a.png")
    images = load_image_set(tmp_path, model_labels=imagenet_labels())
    assert list(images.labels) == sorted(wnids.values())
    assert "model's own class labels" in images.mapping
    # Without any class list the folder position is all there is, and the set says so.
    assert list(load_image_set(tmp_path).labels) == [0, 1, 2]
    assert "folder position" in load_image_set(tmp_path).mapping
    # An image beside the class folders belongs to no class: refused by name, not skipped.
    photo(tmp_path / "stray.png")
    with pytest.raises(ValueError, match="class folders .* 1 images directly inside it \\(stray.png"):
        load_image_set(tmp_path)


def test_wnid_prefixed_files_and_free_names(tmp_path):
    photo(tmp_path / "wnid" / "n01443537_goldfish.JPEG")
    photo(tmp_path / "wnid" / "n01440764_1.JPEG")
    images = load_image_set(tmp_path / "wnid", model_labels=imagenet_labels())
    assert images.layout == "wnid" and list(images.labels) == [0, 1]
    photo(tmp_path / "free" / "holiday.png")
    assert load_image_set(tmp_path / "free", model_labels=imagenet_labels()).labels is None  # label-free use
    photo(tmp_path / "wnid" / "n99999999_x.JPEG")
    with pytest.raises(LabelError, match="'n99999999' \\(file name prefix of n99999999_x.JPEG\\)"):
        load_image_set(tmp_path / "wnid", model_labels=imagenet_labels())


def test_csv_labels_by_name_or_index_and_the_unknown_label_error(tmp_path):
    photo(tmp_path / "a.png")
    photo(tmp_path / "b.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\na.png,Seven\nb.png,2\n")
    assert list(load_image_set(tmp_path, labels_csv=csv, model_labels=DIGITS).labels) == [7, 2]
    csv.write_text("a.png,eleven\n")
    with pytest.raises(LabelError, match="'eleven' \\(.*labels.csv line 1\\) is not one of the model's 10 classes"):
        load_image_set(tmp_path, labels_csv=csv, model_labels=DIGITS)
    csv.write_text("a.png,seven\n")
    with pytest.raises(LabelError, match="not an index, and there is no class list"):
        load_image_set(tmp_path, labels_csv=csv)


def test_explicit_class_list_wins_over_the_model_labels(tmp_path):
    photo(tmp_path / "data" / "dog" / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    images = load_image_set(tmp_path / "data", classes=classes, model_labels=DIGITS)
    assert list(images.labels) == [1] and "--classes" in images.mapping
