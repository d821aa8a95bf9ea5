"""Datasets written to tmp_path in the real on-disk formats (CIFAR-10 python batches, image folders, .zip,
.tar.gz, EDM's dataset_tool.py output) and read back: contents, labels, order, resizing, subsets, intra-class
mixing, errors and the CLI."""
import io
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from diffmem.config import ConfigError, DataConfig, load_config
from diffmem.data import fingerprint, load_dataset, main, training_set

PER_BATCH = 20   # 2 images of each class per batch, 100 training images in all


def write_cifar(root, per_batch=PER_BATCH):
    """cifar-10-batches-py as the official download: Python-2-style dicts with bytes keys, protocol 2."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch_labels = rng.permutation(np.repeat(np.arange(10), per_batch // 10)).tolist()
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": batch_labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        # numpy 1.x's module name, as in the real files (numpy 2 writes numpy._core)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core."))
        if name != "test_batch":
            images.append(data)
            labels += batch_labels
    meta = {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
            b"label_names": [n.encode()
                             for n in ("airplane automobile bird cat deer dog frog horse ship truck").split()]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return folder, archive, np.concatenate(images).reshape(-1, 3, 32, 32), np.array(labels)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar"))


def write_folder(root, size=16):
    """cat/ with two PNGs (one grayscale), dog/ with a PNG and a JPEG; returns the PNG pixels by path."""
    rng = np.random.default_rng(1)
    pixels = {}
    for rel, mode in [("dog/b.png", "RGB"), ("dog/a.jpg", "RGB"), ("cat/2.png", "L"), ("cat/1.png", "RGB")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if rel.endswith(".jpg"):   # smooth, so that lossy JPEG stays close
            arr = np.broadcast_to(np.linspace(0, 255, size, dtype=np.uint8)[:, None, None], shape).copy()
        Image.fromarray(arr, mode).save(root / rel)
        pixels[rel] = np.stack([arr] * 3, -1) if mode == "L" else arr
    return pixels


def test_cifar_batches_read_from_folder_and_tar_gz_alike(cifar):
    folder, archive, images, labels = cifar
    for path in (folder, archive):
        data = load_dataset(DataConfig(dataset="cifar10", path=str(path)))
        assert data.images.dtype == np.uint8 and data.images.shape == (100, 3, 32, 32)   # test_batch left out
        assert np.array_equal(data.images, images) and np.array_equal(data.labels, labels)   # batches 1..5 in order


def test_cifar_subsets_take_the_first_images_of_each_class_in_file_order(cifar):
    folder, _, images, labels = cifar
    for size in (30, 50):
        ts = training_set(DataConfig(dataset="cifar10", path=str(folder), size=size, labels="true"))
        expected = np.concatenate([np.flatnonzero(labels == c)[:size // 10] for c in range(10)])
        assert sorted(ts.indices.tolist()) == sorted(expected.tolist())         # open_cifar10_balance
        assert np.bincount(ts.labels.numpy(), minlength=10).tolist() == [size // 10] * 10
    small = training_set(DataConfig(dataset="cifar10", path=str(folder), size=30))
    big = training_set(DataConfig(dataset="cifar10", path=str(folder), size=50))
    assert np.array_equal(big.indices[:30], small.indices)                      # nested
    assert np.array_equal(((small.images.numpy() + 1) * 127.5).round(), images[small.indices])


def test_cifar_resized(cifar):
    data = load_dataset(DataConfig(dataset="cifar10", path=str(cifar[1]), resolution=16))
    assert data.images.shape == (100, 3, 16, 16) and data.images.dtype == np.uint8


def test_image_folder_and_its_zip(tmp_path):
    pixels = write_folder(tmp_path / "pets")
    data = load_dataset(DataConfig(dataset="folder", path=str(tmp_path / "pets")))
    assert data.images.shape == (4, 3, 16, 16) and data.labels.tolist() == [0, 0, 1, 1]   # cat=0, dog=1
    assert np.array_equal(data.images[0], pixels["cat/1.png"].transpose(2, 0, 1))        # sorted path order
    assert np.array_equal(data.images[1], pixels["cat/2.png"].transpose(2, 0, 1))        # grayscale -> RGB
    assert np.abs(data.images[2].astype(int) - pixels["dog/a.jpg"].transpose(2, 0, 1)).mean() < 8    # JPEG, lossy
    assert np.array_equal(data.images[3], pixels["dog/b.png"].transpose(2, 0, 1))
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as z:   # zipped with its wrapping folder, as `zip -r pets.zip pets`
        for rel in sorted(pixels):
            z.write(tmp_path / "pets" / rel, f"pets/{rel}")
        z.writestr("__MACOSX/pets/cat/._1.png", b"not an image")
    zipped = load_dataset(DataConfig(dataset="imagenette", path=str(archive)))
    assert np.array_equal(zipped.images, data.images) and np.array_equal(zipped.labels, data.labels)
    faces = load_dataset(DataConfig(dataset="ffhq", path=str(tmp_path / "pets")))   # FFHQ: subfolders are no classes
    assert faces.labels.tolist() == [0, 0, 0, 0]


def test_flat_folder_is_one_class_and_mixed_sizes_need_a_resolution(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    Image.new("RGB", (24, 40), "blue").save(tmp_path / "b.jpeg")
    with pytest.raises(ConfigError, match=r"holds images of size 16x16 and 24x40, .*set data.resolution=32") as err:
        load_dataset(DataConfig(dataset="folder", path=str(tmp_path)))
    assert "\n" not in str(err.value)
    data = load_dataset(DataConfig(dataset="folder", path=str(tmp_path), resolution=8))
    assert data.images.shape == (2, 3, 8, 8) and data.labels.tolist() == [0, 0]
    assert (data.images[1, 2] > 200).all() and (data.images[1, 0] < 50).all()   # still blue after crop + Lanczos


@pytest.mark.parametrize("dataset, path, message", [
    ("cifar10", "data/nope", "data.path='data/nope' does not exist; download "
                             "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and set data.path to the "
                             ".tar.gz or its unpacked cifar-10-batches-py folder"),
    ("cifar10", None, "data.path is not set; download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    ("cifar10", "EMPTY", "has no data_batch_1; download"),
    ("cifar10", "NOT_A_TAR", "is neither a folder nor a .tar.gz; download"),
    ("folder", "EMPTY", "holds no PNG/JPEG images; set data.path to a folder or .zip of PNG/JPEG images"),
    ("ffhq", None, "data.path is not set; download FFHQ's thumbnails128x128 folder"),
    ("imagenette", "data/nope", "does not exist; download https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"),
])
def test_missing_data_is_one_line_that_names_the_fix(tmp_path, dataset, path, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a tar")
    path = {"EMPTY": str(tmp_path / "empty"), "NOT_A_TAR": str(tmp_path / "notes.txt")}.get(path, path)
    with pytest.raises(ConfigError) as err:
        load_dataset(DataConfig(dataset=dataset, path=path))
    assert message in str(err.value) and "\n" not in str(err.value)


class RunsCode:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


def test_cifar_pickles_that_would_run_code_are_refused(tmp_path, cifar):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes((cifar[0] / f"data_batch_{i}").read_bytes())
    (folder / "data_batch_3").write_bytes(pickle.dumps(RunsCode(), protocol=2))
    with pytest.raises(ConfigError, match="refusing to load __builtin__.print"):
        load_dataset(DataConfig(dataset="cifar10", path=str(folder)))


def test_a_truncated_cifar_download_is_one_line_that_names_the_fix(tmp_path, cifar):
    folder, archive, _, _ = cifar
    damaged = tmp_path / "cifar-10-batches-py"
    shutil.copytree(folder, damaged)
    batch = (damaged / "data_batch_3").read_bytes()
    (damaged / "data_batch_3").write_bytes(batch[:len(batch) // 2])          # an interrupted download, unpacked
    half = tmp_path / "cifar-10-python.tar.gz"
    half.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])    # ... or left packed
    for path, what in [(damaged, "cannot read data_batch_3 (UnpicklingError: pickle data was truncated)"),
                       (half, "cannot read the .tar.gz (EOFError: Compressed file ended before the end-of-stream")]:
        with pytest.raises(ConfigError) as err:
            load_dataset(DataConfig(dataset="cifar10", path=str(path)))
        message = str(err.value)
        assert message.startswith(f"data.path={str(path)!r}: {what}") and "\n" not in message
        assert message.endswith("a damaged or truncated download, or not CIFAR-10's python version; download "
                                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and set data.path to the "
                                ".tar.gz or its unpacked cifar-10-batches-py folder")


def test_a_damaged_zip_is_one_line_that_names_the_fix(tmp_path):
    pixels = write_folder(tmp_path / "pets")
    whole = tmp_path / "pets.zip"
    with zipfile.ZipFile(whole, "w") as z:   # stored, not deflated: the PNG bytes lie in the file as they are
        for rel in sorted(pixels):
            z.write(tmp_path / "pets" / rel, f"pets/{rel}")
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[:len(data) // 2])                 # an interrupted download: no central directory
    flipped = bytearray(data)
    flipped[data.index(b"IDAT") + 8] ^= 0xFF                     # one bit of pets/cat/1.png's pixels changed
    (tmp_path / "flipped.zip").write_bytes(bytes(flipped))
    not_an_image = tmp_path / "not_an_image.zip"
    with zipfile.ZipFile(not_an_image, "w") as z:
        z.write(tmp_path / "pets" / "cat/1.png", "pets/cat/1.png")
        z.writestr("pets/cat/2.png", b"<html>404 Not Found</html>")   # a web page saved under an image's name
    cases = [
        ("imagenette", truncated, " is a damaged .zip (its table of contents, at the end of the file, is missing: a "
                                   "truncated download or copy?); download or zip it again"),
        ("folder", tmp_path / "flipped.zip", ": cannot read 'pets/cat/1.png' from the .zip (Bad CRC-32 for file "
                                             "'pets/cat/1.png'): the archive is damaged; download or zip it again"),
        ("folder", not_an_image, ": 'pets/cat/2.png' is not an image (PIL cannot identify it); delete that file or "
                                 "replace it with a PNG/JPEG image (every .png/.jpg/.jpeg file there is read as one)"),
    ]
    for dataset, path, message in cases:
        with pytest.raises(ConfigError) as err:
            load_dataset(DataConfig(dataset=dataset, path=str(path)))
        assert str(err.value) == f"data.path={str(path)!r}{message}"
    assert load_dataset(DataConfig(dataset="folder", path=str(whole))).images.shape == (4, 3, 16, 16)   # intact
    # the same file in a folder, and a truncated PNG, name the file to replace
    (tmp_path / "pets" / "cat" / "2.png").write_bytes(b"<html>404 Not Found</html>")
    png = (tmp_path / "pets" / "dog" / "b.png").read_bytes()
    (tmp_path / "pets" / "dog" / "b.png").write_bytes(png[:len(png) // 2])
    with pytest.raises(ConfigError, match=r"'cat/2.png' is not an image \(PIL cannot identify it\); delete that file"):
        load_dataset(DataConfig(dataset="folder", path=str(tmp_path / "pets")))
    (tmp_path / "pets" / "cat" / "2.png").unlink()
    with pytest.raises(ConfigError) as err:
        load_dataset(DataConfig(dataset="folder", path=str(tmp_path / "pets")))
    assert "'dog/b.png' is a damaged image (image file is truncated" in str(err.value)
    assert "delete that file or replace it with a PNG/JPEG image" in str(err.value) and "\n" not in str(err.value)


def edm_files(images, labels):
    """{archive path: bytes} exactly as EDM's dataset_tool.py writes a dataset: uncompressed PNGs named
    {idx:08d}[:5]/img{idx:08d}.png (chunk folders of 1,000) and dataset.json with [path, label] pairs, or
    "labels": null when the source has none. The pairs here are shuffled: they are looked up by path."""
    files = {}
    for idx, arr in enumerate(images):
        idx_str = f"{idx:08d}"
        png = io.BytesIO()
        Image.fromarray(arr).save(png, format="png", compress_level=0, optimize=False)
        files[f"{idx_str[:5]}/img{idx_str}.png"] = png.getvalue()
    pairs = None if labels is None else [[name, int(label)] for name, label in zip(files, labels)]
    if pairs is not None:
        pairs = [pairs[i] for i in np.random.default_rng(3).permutation(len(pairs))]
    files["dataset.json"] = json.dumps({"labels": pairs})
    return files


def write_edm(dest, files):
    """As dataset_tool.py --dest=DIR or --dest=X.zip (a stored zip, written member by member)."""
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return dest


EDM_N = 1010   # two chunk folders, 00000/ and 00001/: the two "classes" diffmem used to see


@pytest.fixture(scope="module")
def edm_data():
    rng = np.random.default_rng(4)
    return rng.integers(0, 256, size=(EDM_N, 4, 4, 3), dtype=np.uint8), rng.integers(0, 10, size=EDM_N)


def test_edm_dataset_json_labels_folder_and_zip(tmp_path, edm_data, capsys):
    images, labels = edm_data
    files = edm_files(images, labels)
    wrapped = tmp_path / "wrapped.zip"   # `zip -r wrapped.zip cifar10-4x4`: everything under one folder
    with zipfile.ZipFile(wrapped, "w") as z:
        for name, data in files.items():
            z.writestr(f"cifar10-4x4/{name}", data)
    for path in (write_edm(tmp_path / "cifar10-4x4", files), write_edm(tmp_path / "cifar10-4x4.zip", files), wrapped):
        data = load_dataset(DataConfig(dataset="folder", path=str(path)))
        assert np.array_equal(data.images, images.transpose(0, 3, 1, 2))
        assert data.labels.tolist() == labels.tolist()                     # per image, from dataset.json
        assert len(np.unique(data.labels)) == 10
        ts = training_set(DataConfig(dataset="folder", path=str(path), size=100, labels="true"))
        assert ts.label_dim == 10 and np.bincount(ts.labels.numpy()).tolist() == [10] * 10
        assert np.array_equal(ts.labels.numpy(), labels[ts.indices])
        # what the issue saw as "2 classes, labels true"
        assert main(["--set", "data.dataset=folder", "--set", f"data.path={path}", "--set", "data.size=20",
                     "--set", "data.labels=true"]) == 0
        assert capsys.readouterr().out == "folder: 20 of 1010 images, 3x4x4, 10 classes, labels true (label_dim 10)\n"
    # FFHQ's reader, where subfolders are never classes, takes dataset.json's labels too
    faces = load_dataset(DataConfig(dataset="ffhq", path=str(tmp_path / "cifar10-4x4.zip")))
    assert faces.labels.tolist() == labels.tolist()
    # the fingerprint covers the labels as loaded: the same images labelled otherwise hash otherwise
    relabelled = write_edm(tmp_path / "relabelled.zip", edm_files(images, (labels + 1) % 10))
    assert (fingerprint(DataConfig(dataset="folder", path=str(relabelled)))
            != fingerprint(DataConfig(dataset="folder", path=str(tmp_path / "cifar10-4x4.zip"))))


def test_edm_null_labels_are_unlabelled_and_without_dataset_json_subfolders_stay_classes(tmp_path, edm_data):
    images = edm_data[0]
    files = edm_files(images, None)
    assert json.loads(files["dataset.json"]) == {"labels": None}
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(flat / f"{i}.png")
    flat_true = training_set(DataConfig(dataset="folder", path=str(flat), size=3, labels="true"))
    for path in (write_edm(tmp_path / "ffhq-4x4", files), write_edm(tmp_path / "ffhq-4x4.zip", files)):
        data = load_dataset(DataConfig(dataset="folder", path=str(path)))
        assert np.array_equal(data.images, images.transpose(0, 3, 1, 2))
        assert data.labels.tolist() == [0] * EDM_N                          # one class, not the chunk folders
        # data.labels=true: as on any dataset without labels (a flat folder, FFHQ), one class
        ts = training_set(DataConfig(dataset="folder", path=str(path), size=3, labels="true"))
        assert ts.label_dim == flat_true.label_dim == 1 and ts.labels.tolist() == flat_true.labels.tolist() == [0] * 3
    del files["dataset.json"]   # without it the subfolders are classes, as before (a new path: loads are cached)
    for path in (write_edm(tmp_path / "chunks", files), write_edm(tmp_path / "chunks.zip", files)):
        assert load_dataset(DataConfig(dataset="folder", path=str(path))).labels.tolist() == [0] * 1000 + [1] * 10


SMALL = ["00000/img00000000.png", "00000/img00000001.png", "00000/img00000002.png"]


@pytest.mark.parametrize("content, message", [
    ({"labels": [[SMALL[0], 0], [SMALL[1], 1], [SMALL[2], 1], ["00000/img00000003.png", 0]]},
     "labels 1 file(s) that are not PNG/JPEG images there, the first '00000/img00000003.png'; restore them or "
     "delete their entries"),
    ({"labels": [[SMALL[0], 0], [SMALL[2], 1]]},
     "has no label for 1 of the 3 images, the first '00000/img00000001.png'; add a [path, class] pair for each, "
     "or delete those images"),
    ({"labels": []}, "has no label for 3 of the 3 images, the first '00000/img00000000.png'"),
    ({"labels": [[SMALL[0], 0], [SMALL[1], 1], [SMALL[1], 1], [SMALL[2], 1]]},
     "lists '00000/img00000001.png' twice; keep one [path, class] pair per image"),
    ({"labels": [[SMALL[0], -1], [SMALL[1], 1], [SMALL[2], 1]]},
     "gives '00000/img00000000.png' the label -1, not a class index (an integer >= 0); write it as EDM's "
     'dataset_tool.py does: {"labels": [["00000/img00000000.png", 3], ...]}, one [path, class] pair per image, '
     'or {"labels": null} for an unlabelled dataset'),
    ({"labels": [[SMALL[0], 0], [SMALL[1], 1.5], [SMALL[2], 1]]}, "gives '00000/img00000001.png' the label 1.5, not"),
    ({"labels": [[SMALL[0], 0], [SMALL[1], "cat"], [SMALL[2], 1]]}, "the label \"cat\", not a class index"),
    ({"labels": [[SMALL[0], True], [SMALL[1], 1], [SMALL[2], 1]]}, "the label true, not a class index"),
    ({"labels": [[SMALL[0], [0.5, 0.5]], [SMALL[1], 1], [SMALL[2], 1]]}, "the label [0.5, 0.5], not a class index"),
    ({"labels": {SMALL[0]: 0}}, '"labels" holds {"00000/img00000000.png": 0}, not a list of [path, class] pairs; '
                                "write it as EDM's"),
    ({"labels": [[SMALL[0]], [SMALL[1], 1], [SMALL[2], 1]]}, '"labels" holds ["00000/img00000000.png"], not a list'),
    ({"label": None}, 'has no "labels"; write it as EDM\'s dataset_tool.py does'),
    ([["labels", None]], 'has no "labels"; write it as'),
    ('{"labels": [["00000/img00000000.png", 0],', "is not valid JSON (Expecting value: line 1 column 42 (char 41)); "
                                                  "write it as EDM's dataset_tool.py does"),
    (b"\xff\xfe{}", "is not valid JSON ("),
], ids=["label-for-missing-file", "image-without-label", "empty-labels", "duplicate", "negative", "float", "string",
        "bool", "vector", "dict-not-list", "not-a-pair", "no-labels-key", "not-an-object", "truncated-json",
        "not-utf8"])
@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_an_inconsistent_dataset_json_is_one_line_that_names_the_fix(tmp_path, edm_data, kind, content, message):
    files = edm_files(edm_data[0][:3], edm_data[1][:3])
    files["dataset.json"] = content if isinstance(content, (str, bytes)) else json.dumps(content)
    path = write_edm(tmp_path / ("edm.zip" if kind == "zip" else "edm"), files)
    with pytest.raises(ConfigError) as err:
        load_dataset(DataConfig(dataset="folder", path=str(path)))
    assert str(err.value).startswith(f"data.path={str(path)!r}: 'dataset.json'")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_intra_class_mixing(tmp_path, cifar):
    folder, _, images, labels = cifar
    rng = np.random.default_rng(2)
    for i in range(6):   # the mix set: 16x16 images, resized to CIFAR's 32x32
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(tmp_path / f"dog{i}.png")
    base = dict(dataset="cifar10", path=str(folder), mix_path=str(tmp_path), labels="true")
    ts = training_set(DataConfig(size=10, mix_rate=0.5, **base))
    from_cifar = ts.indices[ts.indices < 100]
    assert from_cifar.tolist() == np.flatnonzero(labels == 5)[:5].tolist()   # the first floor(|D|(1-a)) dogs
    assert sorted(ts.indices[ts.indices >= 100] - 100) == [0, 1, 2, 3, 4]
    assert ts.labels.tolist() == [5] * 10 and ts.images.shape == (10, 3, 32, 32)
    small = training_set(DataConfig(size=6, mix_rate=0.5, **base))
    assert np.array_equal(ts.indices[:6], small.indices)                      # nested at the same alpha
    assert (training_set(DataConfig(size=5, mix_rate=0.8, **base)).indices < 100).sum() == 1   # 5 * 0.2, not 0
    assert (training_set(DataConfig(size=6, mix_rate=1.0, **base)).indices >= 100).all()
    with pytest.raises(ConfigError, match=r"data.size=20 is larger than the 12 images of class 5 at "
                                          r"data.mix_rate=0.5 \(10 in cifar10, 6 in data.mix_path\); "
                                          r"use data.size<=12"):
        training_set(DataConfig(size=20, mix_rate=0.5, **base))
    alone = training_set(DataConfig(size=8, mix_rate=0.0, **base))   # alpha = 0: the class alone (Fig. 2c)
    assert alone.indices.tolist() == np.flatnonzero(labels == 5)[:8].tolist() and alone.labels.tolist() == [5] * 8


@pytest.mark.parametrize("override, message", [
    ("data.mix_rate=1.5", "data.mix_rate=1.5 must be in [0, 1]"),
    ("data.mix_class=-1", "data.mix_class=-1 must be a class index >= 0"),
    ("data.mix_rate=0.5", "data.mix_rate=0.5 needs data.mix_path"),
])
def test_mixing_settings_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_cli_summary_and_grid(tmp_path, capsys, cifar):
    grid = tmp_path / "out" / "grid.png"
    assert main(["--config", "experiments/digits.yaml", "--set", "data.size=40", "--grid", str(grid)]) == 0
    assert capsys.readouterr().out == "digits: 40 of 1797 images, 1x8x8, 10 classes, labels none (label_dim 0)\n"
    assert Image.open(grid).size[0] > Image.open(grid).size[1] > 0                # 2 rows of 16
    assert main(["--set", "data.dataset=cifar10", "--set", f"data.path={cifar[0]}", "--set", "data.size=30",
                 "--set", "data.labels=random"]) == 0
    assert capsys.readouterr().out == "cifar10: 30 of 100 images, 3x32x32, 10 classes, labels random (label_dim 10)\n"
    assert main(["--set", "data.dataset=cifar10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.path is not set; download") and err.count("\n") == 1
    run = subprocess.run([sys.executable, "-m", "diffmem.data", "--set", "data.size=20"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("digits: 20 of 1797 images")


def test_the_digits_are_scikit_learns_load_digits_on_the_8_bit_scale():
    """diffmem reads the file scikit-learn ships instead of importing scikit-learn: the same 1,797 images and
    labels as sklearn.datasets.load_digits (0..16 scaled by 255/16, rounded), in the same order."""
    from sklearn.datasets import load_digits
    from diffmem.data import load_dataset
    ours, theirs = load_dataset(DataConfig()), load_digits()
    expected = np.rint(theirs.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    assert ours.images.dtype == np.uint8 and np.array_equal(ours.images, expected)
    assert ours.labels.dtype == np.int64 and np.array_equal(ours.labels, theirs.target)
