"""Datasets of diffit_port.data: the digits split, image folders, .npz arrays and sample grids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffit_port.data import (DataError, _digits_arrays, digits_heldout_mask, load_dataset, load_digits_split,
                              load_image_folder, load_npz, save_grid, to_uint8)


def _png(path, size=(12, 12), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, held = load_digits_split("train", 32), load_digits_split("heldout", 32)
    assert (len(train), len(held)) == (1442, 355)
    assert train.images.shape == (1442, 1, 32, 32) and train.images.dtype == np.float32
    assert train.labels.dtype == np.int64 and train.class_names == tuple("0123456789")
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    # Every class is held out at ~20 %, and the two splits partition the 1797 images.
    counts_train, counts_held = np.bincount(train.labels), np.bincount(held.labels)
    assert np.all(np.abs(counts_held / (counts_train + counts_held) - 0.2) < 0.01)
    all_ = load_digits_split("all", 8)
    mask = digits_heldout_mask(all_.labels)
    assert mask.sum() == 355
    np.testing.assert_array_equal(load_digits_split("heldout", 8).images, all_.images[mask])
    # Resizing keeps the picture: a 32x32 image pooled back to 8x8 correlates with the original.
    pooled = held.images.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(held), -1)
    corr = np.corrcoef(pooled.ravel(), all_.images[mask].reshape(len(held), -1).ravel())[0, 1]
    assert corr > 0.95
    with pytest.raises(ValueError, match="split"):
        load_digits_split("test", 32)


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    images, labels = _digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_digits_in_rgb_and_via_load_dataset():
    rgb = load_digits_split("heldout", 16, channels=3)
    assert rgb.images.shape == (355, 3, 16, 16)
    np.testing.assert_array_equal(rgb.images[:, 0], rgb.images[:, 2])
    assert load_dataset("digits", 16, 1).source == "digits:train"


def test_image_folder(tmp_path):
    _png(tmp_path / "zebra" / "a.png", value=0)
    _png(tmp_path / "zebra" / "sub" / "b.png", size=(20, 10), value=255)     # nested, not square
    _png(tmp_path / "apple" / "c.png", mode="RGB", size=(40, 40))
    (tmp_path / "apple" / "notes.txt").write_text("ignored")
    (tmp_path / "apple" / ".hidden.png").write_bytes(b"ignored")
    ds = load_image_folder(tmp_path, size=8, channels=1)
    assert ds.class_names == ("apple", "zebra")                                # sorted folder names
    assert ds.images.shape == (3, 1, 8, 8) and ds.labels.tolist() == [0, 1, 1]
    assert ds.images[1].max() == -1.0 and ds.images[2].min() == 1.0            # black and white files
    rgb = load_dataset(str(tmp_path), 8, 3)
    assert rgb.images.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(rgb.images[0, :, 0, 0], np.array([128, 0, 127]) / 127.5 - 1, atol=1e-6)


def test_image_folder_errors_name_the_files(tmp_path):
    _png(tmp_path / "one" / "ok.png")
    (tmp_path / "one" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "two" / "cut.jpg").parent.mkdir()
    (tmp_path / "two" / "cut.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match="2 unreadable") as e:
        load_image_folder(tmp_path, 8, 1)
    assert "broken.png" in str(e.value) and "cut.jpg" in str(e.value) and "ok.png" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without images") as e:
        load_image_folder(tmp_path, 8, 1)
    assert str(tmp_path / "empty") in str(e.value)
    flat = tmp_path / "flat"
    flat.mkdir()
    _png(flat / "x.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(flat, 8, 1)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8, 1)


def test_npz(tmp_path):
    images = np.zeros((4, 6, 6), np.uint8)
    images[1] = 255
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([0, 1, 2, 1]))
    ds = load_npz(tmp_path / "a.npz", 6, 1)
    assert ds.images.shape == (4, 1, 6, 6) and ds.labels.dtype == np.int64 and len(ds.class_names) == 3
    assert ds.images[0].max() == -1.0 and ds.images[1].min() == 1.0
    assert load_dataset(str(tmp_path / "a.npz"), 12, 3).images.shape == (4, 3, 12, 12)
    # Float arrays are used as given (latents may leave [-1, 1]); RGB -> grey uses luma weights.
    lat = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32) * 3
    np.savez(tmp_path / "f.npz", images=lat, labels=np.array([0, 0]))
    grey = load_npz(tmp_path / "f.npz", 8, 1).images
    np.testing.assert_allclose(grey[:, 0], lat @ np.array([0.299, 0.587, 0.114]), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="float images are 8x8"):     # latents are never resized
        load_npz(tmp_path / "f.npz", 16, 1)
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(DataError, match="labels"):
        load_npz(tmp_path / "bad.npz", 6, 1)
    np.savez(tmp_path / "four.npz", images=np.zeros((2, 4, 4, 4), np.float32), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="4 channels"):
        load_npz(tmp_path / "four.npz", 4, 1)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz"):
        load_dataset(str(tmp_path / "junk.npz"), 6, 1)
    with pytest.raises(DataError, match="neither"):
        load_dataset(str(tmp_path / "nothing"), 6, 1)


def test_save_grid(tmp_path):
    x = np.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    path = save_grid(x, tmp_path / "g" / "grid.png", nrow=2, pad=1)
    with Image.open(path) as im:
        assert im.size == (2 * 5 + 1, 3 * 5 + 1) and im.mode == "RGB"
    assert to_uint8(np.array([[[[-1.0, 0.0, 1.0, 7.0]]]])).ravel().tolist() == [0, 128, 255, 255]


def test_npz_messages_say_what_to_do(tmp_path):
    """Channels-first arrays get the transpose that fixes them; files that are not .npz archives, or that hold
    object arrays, never get a hint to allow pickles."""
    from click.testing import CliRunner

    from diffit_port.train import main

    cases = {}
    np.savez(tmp_path / "nchw.npz", images=np.zeros((8, 1, 16, 16), np.uint8), labels=np.zeros(8, np.int64))
    cases["nchw.npz"] = "looks channels-first (N, C, H, W); store them channels-last (N, H, W, C): np.transpose"
    np.savez(tmp_path / "nchw3.npz", images=np.zeros((2, 3, 32, 32), np.float32), labels=np.zeros(2, np.int64))
    cases["nchw3.npz"] = "looks channels-first"
    (tmp_path / "garbage.npz").write_bytes(b"\x00garbage" * 100)
    cases["garbage.npz"] = "is not an .npz archive (write one with np.savez"
    np.save(tmp_path / "array.npy", np.zeros((2, 8, 8), np.uint8))
    (tmp_path / "array.npz").write_bytes((tmp_path / "array.npy").read_bytes())
    cases["array.npz"] = "is not an .npz archive"
    np.savez(tmp_path / "objects.npz", images=np.array([None, 1], dtype=object), labels=np.zeros(2, np.int64))
    cases["objects.npz"] = "images is not a plain numeric array (object arrays are refused"
    for name, msg in cases.items():
        with pytest.raises(DataError) as e:
            load_npz(tmp_path / name, 16, 1)
        assert msg in str(e.value) and "pickle" not in str(e.value), (name, str(e.value))
    res = CliRunner().invoke(main, ["--preset", "tiny", "--data", str(tmp_path / "nchw.npz"), "--steps", "1",
                                    "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 2 and cases["nchw.npz"] in res.output and not (tmp_path / "run").exists(), res.output
    assert "NHWC" in CliRunner().invoke(main, ["--help"]).output
