"""Random-access sources (jfail.data.sources) and the Grain loader over them."""

import os

import numpy as np
import pytest
from PIL import Image

from jfail import data
from jfail.data.datasets import _percent_subset
from jfail.data.sources import ArrayRecordSource, open_source, read_all, write_arrayrecord

RNG = np.random.default_rng(7)


def _write_folder(root, classes, per_class, size=(8, 8), mode="RGB", ending="png"):
    """Random images under root/<class>/; returns {class: [uint8 arrays in file order]}."""
    written = {}
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        written[name] = []
        for i in range(per_class):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.{ending}")
            written[name].append(pixels)
    return written


# ---------------------------------------------------------------- image folders


def test_image_folder_reads_pixels_labels_and_sorted_class_names(tmp_path):
    written = _write_folder(tmp_path, ["zebra", "ant", "moth"], per_class=3)
    source = open_source(f"imagefolder:{tmp_path}", "all")
    assert source.class_names == ("ant", "moth", "zebra")
    assert len(source) == 9 and source.image_shape == (8, 8, 3)
    np.testing.assert_array_equal(source.labels(), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    example = source[4]
    assert example["image"].dtype == np.float32 and example["label"] == 1
    np.testing.assert_array_equal(example["image"], written["moth"][1] / np.float32(255))
    whole = read_all(source)
    np.testing.assert_array_equal(whole.images[-1], written["zebra"][2] / np.float32(255))


def test_image_folder_resize_keeps_the_centre_and_channels_follow_luma(tmp_path):
    tall = np.zeros((32, 8, 3), np.uint8)  # 8 wide, 32 tall: red top, blue bottom, grey middle
    tall[:4] = (255, 0, 0)
    tall[4:28] = (100, 150, 200)
    tall[28:] = (0, 0, 255)
    os.makedirs(tmp_path / "only")
    Image.fromarray(tall).save(tmp_path / "only" / "a.png")
    rgb = open_source(f"imagefolder:{tmp_path}@4", "all")
    assert rgb.image_shape == (4, 4, 3)
    # The shorter side becomes 4 (32 -> 16 tall), the centre 4x4 is kept: only grey remains,
    # where squashing the whole image to 4x4 would mix red and blue into the outer rows.
    np.testing.assert_allclose(rgb[0]["image"], np.broadcast_to([100, 150, 200], (4, 4, 3)) / 255,
                               atol=1 / 255)
    grey = open_source(f"imagefolder:{tmp_path}", "all", image_size=4, channels=1)
    luma = (100 * 299 + 150 * 587 + 200 * 114) / 1000
    assert grey.image_shape == (4, 4, 1)
    np.testing.assert_allclose(grey[0]["image"], luma / 255, atol=1 / 255)


def test_image_folder_decodes_jpeg_and_takes_the_split_folder(tmp_path):
    _write_folder(tmp_path / "train", ["a", "b"], per_class=2, size=(28, 28))
    flat = np.full((28, 28, 3), 90, np.uint8)
    for name in ("a", "b"):
        os.makedirs(tmp_path / "test" / name)
        Image.fromarray(flat).save(tmp_path / "test" / name / "x.JPG", quality=95)
    test = open_source(f"imagefolder:{tmp_path}", "test")
    assert len(test) == 2 and test.image_shape == (28, 28, 3)
    np.testing.assert_allclose(test[1]["image"], 90 / 255, atol=2 / 255)
    assert len(open_source(f"imagefolder:{tmp_path}", "train")) == 4
    with pytest.raises(ValueError, match=r"split folders \(train, test\) but no 'val'"):
        open_source(f"imagefolder:{tmp_path}", "val")


def test_percent_suffix_keeps_the_subset_load_would_keep(tmp_path):
    _write_folder(tmp_path, ["a", "b", "c"], per_class=10, size=(8, 8), mode="L")
    whole = open_source(f"imagefolder:{tmp_path}", "all")
    part = open_source(f"imagefolder:{tmp_path}[:30%]", "all")
    assert whole.image_shape == (8, 8, 1)
    assert len(part) == 9
    np.testing.assert_array_equal(np.bincount(part.labels()), [3, 3, 3])
    reference = _percent_subset(read_all(whole), 30.0, "reference")
    subset = read_all(part)
    np.testing.assert_array_equal(subset.images, reference.images)
    np.testing.assert_array_equal(subset.labels, reference.labels)
    assert part.name == f"imagefolder:{tmp_path}[:30%]"


def test_images_of_different_sizes_need_an_image_size(tmp_path):
    os.makedirs(tmp_path / "a")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "0.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "a" / "1.png")
    source = open_source(f"imagefolder:{tmp_path}", "all")
    with pytest.raises(ValueError, match=r"1\.png is 9x8 but the first image .* is 8x8; .*size="):
        source[1]
    assert open_source(f"imagefolder:{tmp_path}@8", "all")[1]["image"].shape == (8, 8, 1)


def test_load_and_the_source_share_one_split_channel_and_crop_rule(tmp_path):
    _write_folder(tmp_path, ["a", "b"], per_class=5, size=(6, 10), mode="L")
    Image.fromarray(RNG.integers(0, 256, (10, 6, 3), dtype=np.uint8)).save(tmp_path / "b" / "9.png")
    name = f"imagefolder:{tmp_path}@4"
    parts = {split: open_source(name, split) for split in ("train", "test", "all")}
    # one colour file among grey ones (the first is grey): every image is RGB
    assert {source.image_shape for source in parts.values()} == {(4, 4, 3)}
    # no split folders: test is the fixed stratified 20 %, train the rest
    assert sorted(parts["train"].paths + parts["test"].paths) == sorted(parts["all"].paths)
    np.testing.assert_array_equal(np.bincount(parts["test"].labels()), [1, 1])
    for split, source in parts.items():
        loaded, streamed = data.load(name, split), read_all(source)
        np.testing.assert_array_equal(loaded.images, streamed.images)
        np.testing.assert_array_equal(loaded.labels, streamed.labels)
    # 6 wide, 10 tall -> 4 wide, 7 tall, the centre 4 rows kept
    with Image.open(parts["all"].paths[0]) as image:
        first = np.asarray(image.convert("RGB").resize((4, 7), Image.BILINEAR))
    np.testing.assert_array_equal(data.load(name, "all").images[0], first[1:5] / np.float32(255))
    assert data.dataset_image_shape(name) == (4, 4, 3)


# ---------------------------------------------------------------- ArrayRecord


def test_arrayrecord_round_trip_over_a_glob_with_and_without_sidecars(tmp_path):
    images = RNG.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    write_arrayrecord(tmp_path / "part-0.arrayrecord", images[:6], labels[:6],
                      class_names=["x", "y", "z"])
    write_arrayrecord(tmp_path / "part-1.arrayrecord", images[6:], labels[6:],
                      class_names=["x", "y", "z"])
    source = open_source(f"arrayrecord:{tmp_path}/part-*.arrayrecord")
    assert len(source) == 10 and source.class_names == ("x", "y", "z")
    whole = read_all(source)
    np.testing.assert_array_equal(whole.images, images / np.float32(255))  # PNG is lossless
    np.testing.assert_array_equal(whole.labels, labels)
    assert open_source(f"arrayrecord:{tmp_path}/part-*.arrayrecord@4").image_shape == (4, 4, 1)
    half = open_source(f"arrayrecord:{tmp_path}/part-*.arrayrecord[:50%]")
    np.testing.assert_array_equal(read_all(half).labels,
                                  _percent_subset(whole, 50.0, "reference").labels)

    for part in ("part-0", "part-1"):  # without sidecars the labels come from the headers
        os.remove(tmp_path / f"{part}.arrayrecord.json")
    bare = ArrayRecordSource(sorted(str(p) for p in tmp_path.glob("part-*")))
    np.testing.assert_array_equal(bare.labels(), labels)
    assert bare.class_names == ("0", "1", "2")


def test_arrayrecord_jpeg_and_rgb(tmp_path):
    images = np.full((3, 16, 16, 3), 0.5, np.float32)
    write_arrayrecord(tmp_path / "rgb.ar", images, [1, 0, 1], image_format="jpeg")
    source = open_source(f"arrayrecord:{tmp_path}/rgb.ar", channels=3)
    assert source.image_shape == (16, 16, 3)
    np.testing.assert_allclose(source[2]["image"], 128 / 255, atol=2 / 255)


def test_arrayrecord_refuses_foreign_records_and_bad_writer_input(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "foreign.ar"), "group_size:1")
    writer.write(b"not an image record")
    writer.close()
    with pytest.raises(ValueError, match=r"record 0 of .* is not a jfail-image-label-v1 record"):
        open_source(f"arrayrecord:{tmp_path}/foreign.ar")
    with pytest.raises(ValueError, match="more images than the 2 labels"):
        write_arrayrecord(tmp_path / "x.ar", np.zeros((3, 4, 4, 1), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        write_arrayrecord(tmp_path / "x.ar", np.zeros((2, 4, 4, 1), np.uint8), [0, 1, 0])
    with pytest.raises(ValueError, match="image_format must be 'png' or 'jpeg'"):
        write_arrayrecord(tmp_path / "x.ar", np.zeros((1, 4, 4, 1), np.uint8), [0],
                          image_format="gif")


# ---------------------------------------------------------------- TFDS and built-in sets


def test_tfds_source_matches_load_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        loaded = data.load("tfds:mnist", "train")
        source = open_source("tfds:mnist", "train")
        small = open_source("tfds:mnist@8[:50%]", "train")
        whole = read_all(source)
        part = read_all(small)
    np.testing.assert_array_equal(whole.images, loaded.images)
    np.testing.assert_array_equal(whole.labels, loaded.labels)
    assert source.class_names == loaded.class_names
    assert small.image_shape == (8, 8, 1) and len(small) == 6
    np.testing.assert_array_equal(part.labels, _percent_subset(loaded, 50.0, "ref").labels)


def test_builtin_names_are_sources_equal_to_load():
    loaded = data.load("digits@28[:10%]", "test")
    for source in (open_source("digits[:10%]", "test", image_size=28),
                   open_source("digits[:10%]@28", "test")):
        whole = read_all(source)
        np.testing.assert_array_equal(whole.images, loaded.images)
        np.testing.assert_array_equal(whole.labels, loaded.labels)
    rgb = open_source("digits[:10%]", "test", channels=3)
    grey = data.load("digits[:10%]", "test").images[5]
    np.testing.assert_array_equal(rgb[5]["image"], np.repeat(grey, 3, axis=-1))


# ---------------------------------------------------------------- errors


def test_bad_names_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="is not a folder"):
        open_source(f"imagefolder:{tmp_path}/missing")
    with pytest.raises(ValueError, match="has no class folders"):
        open_source(f"imagefolder:{tmp_path}")
    os.makedirs(tmp_path / "cats")
    (tmp_path / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folders of .* \(cats\) hold no images"):
        open_source(f"imagefolder:{tmp_path}")
    with pytest.raises(ValueError, match=r"Unknown data set 's3:bucket/x'\. Known: imagefolder:"):
        open_source("s3:bucket/x")
    with pytest.raises(ValueError, match="'imagefolder:' must be followed by a folder"):
        open_source("imagefolder:")
    with pytest.raises(data.DatasetNotFoundError, match="no files match"):
        open_source(f"arrayrecord:{tmp_path}/*.ar")
    with pytest.raises(ValueError, match=r"asks for 8x8 images but image_size=16"):
        open_source("digits@8", image_size=16)
    with pytest.raises(ValueError, match=r"percentage must be in \(0, 100\]"):
        open_source(f"imagefolder:{tmp_path}[:0%]")
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        open_source("digits", channels=2)
    for name in ("imagefolder:/data/pets@64[:10%]", "tfds:mnist", "arrayrecord:/a/*.ar",
                 "fashion_mnist@28[:10%]", "fashion_mnist[:10%]@28"):
        data.check_source_name(name)  # nothing is read: none of these exist here
    with pytest.raises(ValueError, match="Unknown data set 'nope'"):
        data.check_source_name("nope")


# ---------------------------------------------------------------- Grain loader


def test_loader_shards_are_disjoint_deterministic_and_resumable():
    import grain

    source = data.ArraySource(np.arange(24, dtype=np.float32).reshape(24, 1, 1, 1) / 24,
                              np.arange(24) % 4, list("abcd"), "toy")

    def labels_seen(shard, key=5):
        shards = grain.sharding.ShardOptions(shard, 2, drop_remainder=True)
        stream = data.loader(source, 3, key=key, shard_options=shards)
        return [np.round(batch["image"].ravel() * 24).astype(int) for batch in stream]

    first, second = labels_seen(0), labels_seen(1)
    seen = np.concatenate(first + second)
    assert sorted(seen) == list(range(24))  # the two shards split the epoch between them
    assert [list(b) for b in labels_seen(0)] == [list(b) for b in first]
    assert [list(b) for b in labels_seen(0, key=6)] != [list(b) for b in first]
    assert list(np.concatenate(first)) != sorted(np.concatenate(first))  # shuffled

    stream = data.loader(source, 3, key=5,
                         shard_options=grain.sharding.ShardOptions(0, 2, drop_remainder=True))
    iterator = iter(stream)
    next(iterator)
    state = iterator.get_state()
    rest = [list(np.round(b["image"].ravel() * 24).astype(int)) for b in iterator]
    resumed = iter(stream)
    resumed.set_state(state)
    assert [list(np.round(b["image"].ravel() * 24).astype(int)) for b in resumed] == rest
    assert rest == [list(b) for b in first[1:]]
