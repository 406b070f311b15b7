"""The latent tools: nfcore.latent against direct computations, and the reconstruct /
interpolate / manipulate commands on a briefly trained digits model and on a tiny synthetic
image folder labelled in CelebA's attribute format, bad input included."""
import errno
import os
import re

import numpy as np
import pytest
from PIL import Image

from data import load_dataset
from data.attributes import read_attributes
from data.folder import read_image
from nfcore import latent
from nfcore.flow import Flow
from train import interpolate, manipulate, reconstruct, run
from train.model_images import dequantize
from train.session import load_flow

TINY = ["--levels", "2", "--steps", "1", "--hidden", "8", "--sample-every", "1000",
        "--eval-every", "1000"]
CELEBA_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
SMILING = CELEBA_NAMES.index("Smiling")
ROUND_OFF = 2e-6   # float32 encode + decode of values in [-0.5, 0.5): 32 ulps of 0.5


# ---- the library --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_flow():
    """An untrained float32 flow on 1×8×8 images, ActNorm initialized on a first batch."""
    flow = Flow((1, 8, 8), levels=2, steps=1, hidden=8, seed=3)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (16, 1, 8, 8)).astype(np.float32)
    flow.forward(x)
    return flow, x


def test_latent_vectors_hold_every_level_and_rebuild_the_images(small_flow):
    flow, x = small_flow
    latents = flow.encode(x)
    assert [z.shape[1:] for z in latents] == latent.latent_shapes(flow)
    z = latent.encode(flow, x)
    assert z.shape == (16, 64)
    for part, whole in zip(latent.split_latents(flow, z), latents):
        np.testing.assert_array_equal(part, whole)
    assert np.abs(latent.reconstruct(flow, x) - x).max() <= ROUND_OFF


def test_alpha_zero_gives_the_input_back_and_alpha_moves_the_latent_by_alpha_d(small_flow):
    flow, x = small_flow
    direction = np.random.default_rng(1).standard_normal(64)
    edited = latent.manipulate(flow, x[:4], direction, alphas=[0.0, 0.3, -0.3])
    assert edited.shape == (4, 3, 1, 8, 8) and edited.dtype == np.float32
    assert np.abs(edited[:, 0] - x[:4]).max() <= ROUND_OFF
    z = latent.encode(flow, x[:4]).astype(np.float64)
    for column, alpha in ((1, 0.3), (2, -0.3)):
        moved = latent.encode(flow, edited[:, column]).astype(np.float64)
        np.testing.assert_allclose(moved, z + alpha * direction, atol=1e-5)


def test_interpolation_ends_are_the_inputs(small_flow):
    flow, x = small_flow
    z = latent.encode(flow, x[:2])
    for method in latent.METHODS:
        path = latent.interpolate(z[0], z[1], steps=5, method=method)
        assert path.shape == (5, 64) and path.dtype == np.float32
        np.testing.assert_array_equal(path[0], z[0])
        np.testing.assert_array_equal(path[-1], z[1])
        images = latent.decode(flow, path)
        assert np.abs(images[0] - x[0]).max() <= ROUND_OFF
        assert np.abs(images[-1] - x[1]).max() <= ROUND_OFF


def test_spherical_interpolation_follows_the_great_circle():
    a, b = np.zeros(6), np.zeros(6)
    a[0], b[3] = 2.0, 2.0                          # orthogonal, equal norms: theta = pi / 2
    path = latent.interpolate(a, b, steps=7, method="spherical")
    t = np.linspace(0, 1, 7)[:, None]
    np.testing.assert_allclose(path, np.cos(t * np.pi / 2) * a + np.sin(t * np.pi / 2) * b,
                               atol=1e-15)
    c = np.random.default_rng(2).standard_normal(6)
    c *= np.linalg.norm(a) / np.linalg.norm(c)
    norms = np.linalg.norm(latent.interpolate(a, c, steps=9, method="spherical"), axis=1)
    np.testing.assert_allclose(norms, 2.0, rtol=1e-12)
    linear = latent.interpolate(a, c, steps=3)
    np.testing.assert_allclose(linear[1], (a + c) / 2, rtol=1e-15)
    with pytest.raises(ValueError, match="unknown interpolation"):
        latent.interpolate(a, b, method="cubic")


def test_attribute_direction_is_the_difference_of_the_group_means(small_flow):
    flow, x = small_flow
    has = np.arange(16) % 3 == 0
    z = latent.encode(flow, x).astype(np.float64)
    expected = z[has].mean(axis=0) - z[~has].mean(axis=0)
    batches = ((x[start:start + 5], has[start:start + 5]) for start in range(0, 16, 5))
    direction = latent.attribute_direction(flow, batches)
    assert (direction.n_with, direction.n_without) == (6, 10)
    np.testing.assert_allclose(direction.vector, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="with and without"):
        latent.attribute_direction(flow, [(x, np.ones(16, bool))])


# ---- the attribute file -------------------------------------------------------------------

def write_attribute_file(path, files, rows, count=None):
    """A file in the published format of CelebA's list_attr_celeba.txt."""
    lines = [str(len(files) if count is None else count), " ".join(CELEBA_NAMES)]
    lines += [f"{name} " + " ".join(f"{value:2d}" for value in row)
              for name, row in zip(files, rows)]
    path.write_text("\n".join(lines) + "\n")


def test_attribute_file_in_celeba_format(tmp_path):
    rows = np.where(np.random.default_rng(0).random((3, 40)) < 0.5, 1, -1)
    path = tmp_path / "list_attr_celeba.txt"
    write_attribute_file(path, ["000001.jpg", "000002.jpg", "000003.jpg"], rows)
    attributes = read_attributes(path)
    assert attributes.names == CELEBA_NAMES and attributes.files[2] == "000003.jpg"
    np.testing.assert_array_equal(attributes.values, rows)
    np.testing.assert_array_equal(attributes.column("Smiling"), rows[:, SMILING] == 1)


def test_attribute_file_errors_say_what_is_wrong(tmp_path):
    """A file without its names line is said to lack it (its first row's values were read as
    names: "an attribute name appears twice"); a file that is not UTF-8 is named."""
    rows = np.where(np.random.default_rng(0).random((3, 40)) < 0.5, 1, -1)
    path = tmp_path / "list_attr_celeba.txt"
    write_attribute_file(path, ["000001.jpg", "000002.jpg", "000003.jpg"], rows)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="line 2: expected the attribute names, got a file and "
                                         "its values .*the names line is missing"):
        read_attributes(path)
    path.write_bytes(b"3\n" + "Smiling Bärte\n".encode("latin-1") + b"a.jpg 1 -1\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not a UTF-8 text file "
                                         f"\\(byte 11 is b'\\\\xe4'\\)"):
        read_attributes(path)


# ---- the commands on a trained digits model ----------------------------------------------

@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    final = run.main(TINY + ["--batch-size", "32", "--max-steps", "10", "--out", str(out)])
    return str(out / "checkpoint.h5"), final


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_reconstruct_error_and_bits_per_dim(digits_model, tmp_path):
    ckpt, final = digits_model
    n_test = len(load_dataset("digits")[1])
    out = tmp_path / "reconstruct.png"
    result = reconstruct.main(["--ckpt", ckpt, "--n", str(n_test), "--out", str(out)])
    assert result["images"] == n_test
    assert result["max_abs_error"] <= 1e-4
    assert result["bits_per_dim"] == pytest.approx(final["test_bpd"], rel=1e-6)  # = evaluate's
    with Image.open(out) as picture:       # 16 columns, 19 pairs of rows of 8×8 drawn 8x larger
        assert picture.size == (8 * (16 * 9 + 1), 8 * (38 * 9 + 1))


def test_interpolate_by_index_and_from_files(digits_model, tmp_path):
    ckpt, _ = digits_model
    test_images = load_dataset("digits")[1]
    files = []
    for index in (3, 7):
        files.append(str(tmp_path / f"digit{index}.png"))
        Image.fromarray(test_images[index, 0]).save(files[-1])
    by_index = interpolate.main(["--ckpt", ckpt, "--indices", "3", "7", "--steps", "6",
                                 "--out", str(tmp_path / "a.png")])
    from_files = interpolate.main(["--ckpt", ckpt, "--images", *files, "--steps", "6",
                                   "--out", str(tmp_path / "b.png")])
    assert max(by_index["end_errors"] + from_files["end_errors"]) <= 1e-4
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    spherical = interpolate.main(["--ckpt", ckpt, "--indices", "3", "7", "--method", "spherical",
                                  "--out", str(tmp_path / "c.png")])
    assert max(spherical["end_errors"]) <= 1e-4
    with Image.open(tmp_path / "c.png") as picture:
        assert picture.size == (8 * (8 * 9 + 1), 8 * 10)


def test_interpolate_refuses_a_wrong_size_and_an_index_past_the_end(digits_model, tmp_path, capsys):
    ckpt, _ = digits_model
    small, big = str(tmp_path / "small.png"), str(tmp_path / "big.png")
    Image.new("L", (8, 8)).save(small)
    Image.new("L", (16, 16)).save(big)
    with pytest.raises(SystemExit) as stop:
        interpolate.main(["--ckpt", ckpt, "--images", small, big, "--out", str(tmp_path / "x.png")])
    assert stop.value.code == 1
    err = one_error_line(capsys)
    assert big in err and "16×16" in err and "8×8" in err
    with pytest.raises(SystemExit) as stop:
        interpolate.main(["--ckpt", ckpt, "--indices", "0", "297",
                          "--out", str(tmp_path / "x.png")])
    assert stop.value.code == 1 and "297" in one_error_line(capsys)


def test_outputs_beyond_the_data_or_a_sane_size_are_refused(digits_model, tmp_path, capsys):
    """reconstruct --n past the set's size says how many there are (it was cut to 297
    silently); interpolate --steps is at most 1000 images, and at most a 64-megapixel strip
    for a large model (100000 steps of digits wrote a 576-megapixel PNG)."""
    ckpt, _ = digits_model
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as stop:
        reconstruct.main(["--ckpt", ckpt, "--n", "10000", "--out", str(out)])
    assert stop.value.code == 1
    assert one_error_line(capsys) == ("error: --n 10000: the test set of digits has 297 images; "
                                      "give --n 297 or fewer")
    with pytest.raises(SystemExit) as stop:
        interpolate.main(["--ckpt", ckpt, "--indices", "0", "1", "--steps", "100000",
                          "--out", str(out)])
    assert stop.value.code == 1
    assert one_error_line(capsys).startswith("error: argument --steps: must lie in [2, 1000], "
                                             "got 100000")
    assert not out.exists()
    interpolate.check_strip_size(1000, {"image_shape": [1, 8, 8]})       # 64,001 x 80 pixels
    interpolate.check_strip_size(3, {"image_shape": [3, 4096, 4096]})
    with pytest.raises(ValueError, match="^--steps 4: the strip would be 16,389x4,098 pixels, "
                                         "more than 64,000,000 .*at most --steps 3 for this "
                                         "model's 4096x4096 images"):
        interpolate.check_strip_size(4, {"image_shape": [3, 4096, 4096]})


def test_checkpoint_tools_name_the_default_data_folder(capsys):
    """--data-dir's help said "as in training", but a checkpoint does not record the folder:
    the default is the cache folder, and the help says so."""
    from train import evaluate
    for tool in (evaluate, reconstruct, interpolate):
        with pytest.raises(SystemExit):
            tool.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        help_text = text.split("--data-dir DATA_DIR ")[1].split(" --")[0]
        assert "as in training" not in help_text
        assert "default ~/.cache/nfcore/<name>" in help_text
        assert "does not record the folder" in help_text


# ---- manipulate on a synthetic CelebA-format folder ----------------------------------------

@pytest.fixture(scope="module")
def face_folder(tmp_path_factory):
    """24 RGB images of 12×10 pixels, the "Smiling" ones with a bright lower half, their
    attributes in list_attr_celeba.txt, and a folder model of 3×8×8 images trained on them."""
    root = tmp_path_factory.mktemp("faces")
    folder = root / "img_align_celeba"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files, rows = [], np.where(rng.random((24, 40)) < 0.5, 1, -1)
    for index in range(24):
        pixels = rng.integers(0, 128, (10, 12, 3), dtype=np.uint8)
        if rows[index, SMILING] == 1:
            pixels[5:] += 120
        files.append(f"{index + 1:06d}.jpg")
        Image.fromarray(pixels).save(folder / files[-1], format="PNG")
    write_attribute_file(root / "list_attr_celeba.txt", files, rows)
    run.main(TINY + ["--dataset", "folder", "--data-dir", str(folder), "--image-size", "8",
                     "--batch-size", "8", "--max-steps", "3", "--out", str(root / "run")])
    return root, files, rows


def manipulate_args(root, *extra):
    return ["--ckpt", str(root / "run" / "checkpoint.h5"), "--data-dir", str(root),
            "--attributes", str(root / "list_attr_celeba.txt"), "--attribute", "Smiling",
            "--alphas", "-1,-0.5,0,0.5,1", "--n", "3", "--direction-images", "16",
            "--out", str(root / "manipulate.png"), *extra]


def test_manipulate_writes_the_grid_and_caches_the_direction(face_folder):
    root, files, rows = face_folder
    first = manipulate.main(manipulate_args(root))
    assert first["direction"] == "computed" and os.path.exists(first["cache"])
    assert os.path.dirname(first["cache"]) == str(root / "run")
    smiling = rows[:16, SMILING] == 1
    assert (first["with"], first["without"]) == (smiling.sum(), (~smiling).sum())
    assert first["alpha0_max_error"] <= 1e-4
    with Image.open(root / "manipulate.png") as picture:     # 3 rows of 5 alphas, 8×8 drawn 8x
        assert picture.size == (8 * (5 * 9 + 1), 8 * (3 * 9 + 1))
    computed_picture = (root / "manipulate.png").read_bytes()
    # the direction means what the labels mean: "Smiling" images have a lower half brighter by
    # 120/255 = 0.47, and going from alpha -1 to 1 brightens the lower half by about twice that
    flow, meta, _ = load_flow(str(root / "run" / "checkpoint.h5"))
    with np.load(first["cache"]) as cached:
        direction = cached["vector"]
    images = np.stack([read_image(str(root / "img_align_celeba" / name), 8) for name in files[-8:]])
    edited = latent.manipulate(flow, dequantize(images, meta["config"]), direction, [-1.0, 1.0])
    change = edited[:, 1] - edited[:, 0]
    assert change[:, :, 4:].mean() > 0.7 and abs(change[:, :, :4].mean()) < 0.1
    again = manipulate.main(manipulate_args(root))
    assert again["direction"] == "cached" and again["cache"] == first["cache"]
    assert (root / "manipulate.png").read_bytes() == computed_picture
    chosen = [str(root / "img_align_celeba" / name) for name in files[:2]]
    given = manipulate.main(manipulate_args(root, "--images", *chosen))
    assert given["direction"] == "cached" and given["images"] == 2
    assert given["alpha0_max_error"] <= 1e-4
    other_n = manipulate.main(manipulate_args(root, "--direction-images", "12"))
    assert other_n["direction"] == "computed" and other_n["cache"] != first["cache"]
    # one more training step changes the checkpoint: the cached direction no longer holds
    run.main(TINY + ["--dataset", "folder", "--data-dir", str(root / "img_align_celeba"),
                     "--image-size", "8", "--batch-size", "8", "--max-steps", "4",
                     "--out", str(root / "run"), "--resume"])
    retrained = manipulate.main(manipulate_args(root))
    assert retrained["direction"] == "computed" and retrained["cache"] == first["cache"]


def test_manipulate_bad_input_gives_one_clear_line(face_folder, digits_model, tmp_path, capsys):
    root, files, rows = face_folder

    def refused(argv):
        with pytest.raises(SystemExit) as stop:
            manipulate.main(argv)
        assert stop.value.code == 1
        return one_error_line(capsys)

    err = refused(manipulate_args(root, "--attribute", "Smiles"))
    assert "Smiles" in err and all(name in err for name in CELEBA_NAMES)

    malformed = tmp_path / "values.txt"
    bad_rows = rows.copy()
    bad_rows[5, 2] = 0
    write_attribute_file(malformed, files, bad_rows)
    err = refused(manipulate_args(root, "--attributes", str(malformed)))
    assert str(malformed) in err and "line 8" in err

    miscounted = tmp_path / "count.txt"
    write_attribute_file(miscounted, files, rows, count=25)
    assert "says 25 images" in refused(manipulate_args(root, "--attributes", str(miscounted)))

    shorter = tmp_path / "shorter.txt"
    write_attribute_file(shorter, files[:-2], rows[:-2])
    err = refused(manipulate_args(root, "--attributes", str(shorter)))
    assert "2 image(s)" in err and "missing from" in err and files[-2] in err

    err = refused(manipulate_args(root, "--ckpt", digits_model[0]))
    assert digits_model[0] in err and "digits" in err

    assert "1,x" in refused(manipulate_args(root, "--alphas", "1,x"))


def test_a_damaged_direction_cache_is_recomputed_with_a_note(face_folder, capsys):
    root, _, _ = face_folder
    argv = manipulate_args(root, "--direction-images", "10")
    first = manipulate.main(argv)
    with open(first["cache"], "rb") as file:
        whole = file.read()
    with open(first["cache"], "wb") as file:               # truncated, as a crash would leave it
        file.write(whole[:len(whole) // 2])
    capsys.readouterr()
    again = manipulate.main(argv)
    assert again["direction"] == "computed" and again["cache"] == first["cache"]
    assert f"note: the cached direction {first['cache']} is damaged" in capsys.readouterr().err
    assert manipulate.main(argv)["direction"] == "cached"       # and written whole again


def test_a_read_only_checkpoint_folder_caches_the_direction_elsewhere(face_folder, capsys,
                                                                       monkeypatch, tmp_path):
    root, _, _ = face_folder
    run_folder = os.path.abspath(str(root / "run"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.abspath(path) ==
                        run_folder else real_access(path, mode))
    monkeypatch.setattr(manipulate, "FALLBACK_CACHE", str(tmp_path / "cache"))
    argv = manipulate_args(root, "--direction-images", "11")
    result = manipulate.main(argv)
    assert os.path.dirname(result["cache"]) == str(tmp_path / "cache")
    assert os.path.exists(result["cache"]) and os.path.exists(root / "manipulate.png")
    assert f"is read-only: the direction is cached in {result['cache']}" in capsys.readouterr().err
    assert manipulate.main(argv)["direction"] == "cached"


def test_a_cache_that_cannot_be_written_is_skipped_with_a_note(face_folder, capsys, monkeypatch):
    root, _, _ = face_folder

    def refused(path, key, direction):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(manipulate, "save_cached_direction", refused)
    result = manipulate.main(manipulate_args(root, "--direction-images", "13"))
    assert result["direction"] == "computed" and result["cache"] is None
    err = capsys.readouterr().err
    assert "note: the direction is not cached (" in err and "the file system is read-only" in err
