"""Datasets and the paper's training subsets.

A dataset is loaded once per process as uint8 images (N, C, H, W) with integer class labels, from the
files people download: CIFAR-10's python batches (folder or .tar.gz) and folders or .zip files of
PNG/JPEG images (FFHQ, Imagenette, EDM's dataset_tool.py output with its dataset.json labels, anything
else). A training subset of size |D| is a prefix of a class-interleaved ordering, so it is class-balanced
(per-class counts differ by at most one) and nested (the subset of size n is a prefix of the subset of
size m > n), as the paper's `open_cifar10_balance` (paper.md §6). Labels follow §4: none, true, random
with C classes (drawn once per image with a seed), unique (label = index). Intra-class diversity (§4)
mixes a second image set into one class.

    python -m diffmem.data --config experiments/cifar10.yaml --grid subset.png   # what a config trains on
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from diffmem.config import ConfigError, DataConfig


@dataclass
class ImageSet:
    """A whole dataset in memory: uint8 images (N, C, H, W) and their true class labels (N,)."""
    name: str
    images: np.ndarray
    labels: np.ndarray


@dataclass
class TrainingSet:
    """The subset one training sees: images in [-1, 1] and the conditioning labels (None: unconditional)."""
    images: torch.Tensor          # float32 (n, C, H, W) in [-1, 1]
    labels: torch.Tensor | None   # int64 (n,) in [0, label_dim)
    label_dim: int                # 0 for unconditional models
    indices: np.ndarray           # positions in the full dataset, for tracing a sample back; with
                                  # data.mix_rate > 0, N + j is image j of the mix set (N images in the dataset)


# Where each on-disk dataset comes from: the second half of every "missing data" error.
CIFAR10_FIX = ("download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and set data.path to the "
               ".tar.gz or its unpacked cifar-10-batches-py folder")
FFHQ_FIX = ("download FFHQ's thumbnails128x128 folder (https://github.com/NVlabs/ffhq-dataset: "
            "python download_ffhq.py --thumbs) and set data.path to it or to a .zip of it")
IMAGENETTE_FIX = ("download https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz, unpack it "
                  "(tar -xzf) and set data.path to its train folder")
FOLDER_FIX = "set data.path to a folder or .zip of PNG/JPEG images, one subfolder per class (or none)"
LABELS_FIX = ('write it as EDM\'s dataset_tool.py does: {"labels": [["00000/img00000000.png", 3], ...]}, one '
              '[path, class] pair per image, or {"labels": null} for an unlabelled dataset')
MIX_FIX = ("set data.mix_path to a folder or .zip of PNG/JPEG images (the paper mixes 2,000 ImageNet dog "
           "images into CIFAR-10's dogs)")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _existing(path: str | None, key: str, fix: str) -> Path:
    if not path:
        raise ConfigError(f"{key} is not set; {fix}")
    if not Path(path).exists():
        raise ConfigError(f"{key}={path!r} does not exist; {fix}")
    return Path(path)


def _digits(path: str | None = None, resolution: int | None = None) -> ImageSet:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, 10 classes, values 0..16. Read from the
    file scikit-learn ships (a CSV of 64 pixels and the label per row, what sklearn.datasets.load_digits reads;
    tests/test_datasets.py pins them equal) without importing scikit-learn, which cost each process ~1 s more."""
    import gzip
    from importlib.util import find_spec
    spec = find_spec("sklearn")   # the package's location, not an import
    file = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if file is None or not file.is_file():
        raise ConfigError("scikit-learn's digits (sklearn/datasets/data/digits.csv.gz) are not installed; "
                          "pip install scikit-learn")
    with gzip.open(file, "rt") as f:
        rows = np.loadtxt(f, delimiter=",")
    images = np.rint(rows[:, :-1].reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)   # to 8-bit, as files
    return ImageSet("digits", images, rows[:, -1].astype(np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain data only: a downloaded pickle could otherwise run any code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}   # how Python 3 writes bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar10(path: str | None, resolution: int | None = None) -> ImageSet:
    """CIFAR-10's official python batches, data_batch_1..5 in the standard order (the paper's
    `open_cifar10_balance`, paper.md §6), from the cifar-10-batches-py folder or straight from the .tar.gz."""
    root = _existing(path, "data.path", CIFAR10_FIX)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names if root.is_dir() and not (root / n).is_file()]
    if missing:
        raise ConfigError(f"data.path={path!r} has no {missing[0]}; {CIFAR10_FIX}")
    if root.is_file() and not tarfile.is_tarfile(root):
        raise ConfigError(f"data.path={path!r} is neither a folder nor a .tar.gz; {CIFAR10_FIX}")
    where = names[0] if root.is_dir() else "the .tar.gz"   # what is being read, for the error
    try:
        images, labels = [], []
        with contextlib.ExitStack() as stack:
            tar = None if root.is_dir() else stack.enter_context(tarfile.open(root))
            if tar is not None:
                tar.getmembers()   # the archive's index: a truncated .tar.gz fails here
            for n in names:
                where = n if tar is None else f"{n} in the .tar.gz"
                raw = (root / n).read_bytes() if tar is None else tar.extractfile(f"cifar-10-batches-py/{n}").read()
                # The files were pickled by Python 2: its str keys and array bytes come back as bytes.
                batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (OSError, tarfile.TarError, KeyError, pickle.UnpicklingError, EOFError, TypeError, ValueError,
            AttributeError) as e:
        raise ConfigError(f"data.path={path!r}: cannot read {where} ({type(e).__name__}: {' '.join(str(e).split())}): "
                          f"a damaged or truncated download, or not CIFAR-10's python version; {CIFAR10_FIX}") from None
    return ImageSet("cifar10", np.concatenate(images), np.concatenate(labels))


def _image_folder(path: str | None, resolution: int | None = None, *, name: str = "folder",
                  fix: str = FOLDER_FIX, key: str = "data.path", classes: bool = True) -> ImageSet:
    """PNG/JPEG images from a folder or a .zip, in sorted path order, as RGB.

    Labels come from a dataset.json as EDM's dataset_tool.py writes it (_dataset_json_labels), when there is
    one. Otherwise class = the subfolder an image lies in, counted from the deepest folder that holds all
    images (so a .zip of a wrapping folder reads like the folder); sorted names give classes 0..C-1; no
    subfolders, or classes=False, give one class 0. With a resolution, each image is center-cropped to a
    square and resized (Lanczos), as the paper's ImageNet dogs (§4); without one, all must share one square size."""
    root = _existing(path, key, fix)

    def is_image(name):
        base = PurePosixPath(name).name
        return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)   # skips macOS ._ files
    with contextlib.ExitStack() as stack:
        if root.is_dir():
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

            def read(n):
                return (root / n).read_bytes()
        elif zipfile.is_zipfile(root):
            archive = stack.enter_context(zipfile.ZipFile(root))
            files = sorted(n for n in archive.namelist() if not n.endswith("/"))

            def read(n):
                return _zip_member(archive, n, key, path)
        elif root.suffix.lower() == ".zip" or _starts_with(root, b"PK\x03\x04"):
            raise ConfigError(f"{key}={path!r} is a damaged .zip (its table of contents, at the end of the file, is "
                              f"missing: a truncated download or copy?); download or zip it again")
        else:
            raise ConfigError(f"{key}={path!r} is neither a folder nor a .zip; {fix}")
        names = [n for n in files if is_image(n)]
        if not names:
            raise ConfigError(f"{key}={path!r} holds no PNG/JPEG images; {fix}")
        labels = _dataset_json_labels(files, names, read, key, path)   # before decoding: a bad file fails fast
        arrays = [_decode(read(n), n, resolution, key, path) for n in names]
    sizes = sorted({a.shape[1:] for a in arrays})
    if len(sizes) > 1 or sizes[0][0] != sizes[0][1]:
        found = " and ".join(f"{w}x{h}" for h, w in sizes[:2])
        raise ConfigError(f"{key}={path!r} holds images of size {found}, not one square size; "
                          f"set data.resolution=32 (or another power of two) to center-crop and resize them")
    if labels is None:
        labels = _folder_labels(names, key, path) if classes else np.zeros(len(names), dtype=np.int64)
    return ImageSet(name, np.stack(arrays), labels)


def _dataset_json_labels(files: list[str], names: list[str], read, key: str, path: str) -> np.ndarray | None:
    """The labels of the images `names` from a dataset.json as EDM's dataset_tool.py writes it
    ({"labels": [[path, class], ...]}, paths relative to the file's folder), None without one.

    dataset_tool.py stores images in chunk folders 00000/, 00001/, ... of 1,000, which are no classes, and
    EDM's training reads the labels from this file only; "labels": null is an unlabelled dataset (one class
    0, as FFHQ and a flat folder). The file counts when its folder holds every image: the root, as in EDM,
    or the one folder a .zip wraps everything in (`zip -r out.zip out`). Every image needs exactly one label
    and every label an image."""
    found = [f for f in sorted(files, key=lambda f: f.count("/")) if PurePosixPath(f).name == "dataset.json"]
    prefixes = [f[:-len("dataset.json")] for f in found]
    prefix = next((p for p in prefixes if all(n.startswith(p) for n in names)), None)
    if prefix is None:
        return None
    where = f"{key}={path!r}: {prefix + 'dataset.json'!r}"
    try:
        content = json.loads(read(prefix + "dataset.json"))
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError
        raise ConfigError(f"{where} is not valid JSON ({' '.join(str(e).split())}); {LABELS_FIX}") from None
    if not isinstance(content, dict) or "labels" not in content:
        raise ConfigError(f'{where} has no "labels"; {LABELS_FIX}')
    pairs = content["labels"]
    if pairs is None:
        return np.zeros(len(names), dtype=np.int64)
    def is_pair(p):
        return isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
    bad = [pairs] if not isinstance(pairs, list) else [p for p in pairs if not is_pair(p)]
    if bad:
        raise ConfigError(f'{where}: "labels" holds {json.dumps(bad[0])[:60]}, not a list of [path, class] '
                          f"pairs; {LABELS_FIX}")
    label_of = {}
    for file, label in pairs:
        if type(label) is not int or label < 0:   # bool is an int to Python, but no class
            raise ConfigError(f"{where} gives {file!r} the label {json.dumps(label)[:60]}, not a class index "
                              f"(an integer >= 0); {LABELS_FIX}")
        if file in label_of:
            raise ConfigError(f"{where} lists {file!r} twice; keep one [path, class] pair per image")
        label_of[file] = label
    images = [n[len(prefix):] for n in names]   # as dataset.json names them: relative to its folder
    strays = sorted(set(label_of) - set(images))
    if strays:
        raise ConfigError(f"{where} labels {len(strays)} file(s) that are not PNG/JPEG images there, the first "
                          f"{strays[0]!r}; restore them or delete their entries")
    unlabelled = [n for n in images if n not in label_of]
    if unlabelled:
        raise ConfigError(f"{where} has no label for {len(unlabelled)} of the {len(images)} images, the first "
                          f"{unlabelled[0]!r}; add a [path, class] pair for each, or delete those images")
    return np.array([label_of[n] for n in images], dtype=np.int64)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _zip_member(archive: zipfile.ZipFile, name: str, key: str, path: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise ConfigError(f"{key}={path!r}: cannot read {name!r} from the .zip ({' '.join(str(e).split())}): the "
                          f"archive is damaged; download or zip it again") from None


def _decode(data: bytes, name: str, resolution: int | None, key: str, path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        why = "is not an image (PIL cannot identify it)"
    except (OSError, SyntaxError, ValueError) as e:   # truncated or broken files (PIL's PNG reader: SyntaxError)
        why = f"is a damaged image ({' '.join(str(e).split())})"
    else:
        return _fit(rgb, resolution) if resolution else np.asarray(rgb).transpose(2, 0, 1)
    raise ConfigError(f"{key}={path!r}: {name!r} {why}; delete that file or replace it with a PNG/JPEG image "
                      f"(every .png/.jpg/.jpeg file there is read as one)")


def _folder_labels(names: list[str], key: str, path: str) -> np.ndarray:
    folders = [PurePosixPath(n).parent.parts for n in names]
    depth = 0   # descend while every image lies in one and the same subfolder
    while all(len(f) > depth for f in folders) and len({f[depth] for f in folders}) == 1:
        depth += 1
    tops = [f[depth] if len(f) > depth else None for f in folders]
    if all(t is None for t in tops):
        return np.zeros(len(names), dtype=np.int64)
    if None in tops:
        raise ConfigError(f"{key}={path!r} holds images both beside and inside class subfolders; "
                          f"move them into subfolders, one per class")
    index = {c: i for i, c in enumerate(sorted(set(tops)))}
    return np.array([index[t] for t in tops], dtype=np.int64)


# Each loader takes (path, resolution) and returns an ImageSet; _load resizes what comes back at another
# resolution. Only image folders use the resolution while reading, as their images may differ in size.
DATASETS = {
    "digits": _digits,
    "cifar10": _cifar10,
    "folder": _image_folder,
    # FFHQ has no classes: its thumbnails128x128/00000, 01000, ... subfolders are chunks of 1,000 images.
    "ffhq": functools.partial(_image_folder, name="ffhq", fix=FFHQ_FIX, classes=False),
    "imagenette": functools.partial(_image_folder, name="imagenette", fix=IMAGENETTE_FIX),
}


@functools.lru_cache(maxsize=None)
def _load(dataset: str, path: str | None, resolution: int | None) -> ImageSet:
    """One read per process and (dataset, path, resolution). Kept as uint8: CIFAR-10's 50k images take
    150 MB so and would take 600 MB as float32; only a training subset is converted (training_set)."""
    full = DATASETS[dataset](path, resolution)
    if resolution is not None and resolution != full.images.shape[-1]:
        full = ImageSet(full.name, resize(full.images, resolution), full.labels)
    return full


@functools.lru_cache(maxsize=None)
def _mix_set(path: str, resolution: int) -> ImageSet:
    return _image_folder(path, resolution, name="mix", fix=MIX_FIX, key="data.mix_path")


@functools.lru_cache(maxsize=None)
def _fingerprint(dataset: str, path: str | None, resolution: int | None, mix_path: str | None) -> str:
    full = _load(dataset, path, resolution)
    arrays = [full.images, full.labels]
    if mix_path:
        arrays.append(_mix_set(mix_path, full.images.shape[-1]).images)
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape};".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()[:32]


def fingerprint(cfg: DataConfig) -> str:
    """SHA-256 of the arrays this process loaded for cfg: the whole dataset's images and labels (at
    cfg.resolution) and, with data.mix_path, the mixed-in images. A training subset is a function of these
    arrays and the config (classes, size, labels, seed, mix settings), so config + fingerprint fix it. Once per
    process and (dataset, path, resolution, mix_path), from the same cached arrays the training reads; the
    hash costs ~0.2 ms for the digits and ~0.15 s for CIFAR-10's 150 MB (SHA-NI), on top of the load."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset '{cfg.dataset}'; available: {', '.join(DATASETS)}")
    return _fingerprint(cfg.dataset, cfg.path, cfg.resolution, cfg.mix_path or None)


def load_dataset(cfg: DataConfig) -> ImageSet:
    """The full dataset, resized to cfg.resolution when asked, restricted to the first C classes."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset '{cfg.dataset}'; available: {', '.join(DATASETS)}")
    full = _load(cfg.dataset, cfg.path, cfg.resolution)
    images, labels = full.images, full.labels
    if cfg.num_classes is not None:
        classes = np.unique(labels)
        if cfg.num_classes > len(classes):
            raise ConfigError(f"data.num_classes={cfg.num_classes} but {full.name} has {len(classes)} classes; "
                              f"use at most {len(classes)}")
        keep = np.isin(labels, classes[:cfg.num_classes])   # first C classes, as the paper (§4)
        images, labels = images[keep], labels[keep]
    return ImageSet(full.name, images, labels)


def _fit(img, resolution: int) -> np.ndarray:
    """A PIL image center-cropped to a square and Lanczos-resized, as (C, H, W) uint8."""
    from PIL import Image
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    arr = np.asarray(img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.LANCZOS))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """Lanczos resampling of uint8 images, as the paper's dataset_tool (PIL)."""
    from PIL import Image
    return np.stack([_fit(Image.fromarray(img[0] if len(img) == 1 else img.transpose(1, 2, 0)), resolution)
                     for img in images])


def balanced_order(labels: np.ndarray, seed: int | None = None) -> np.ndarray:
    """Indices that interleave the classes: round k takes the k-th image of every class in class order.

    Within a class the order is file order (the paper's), or a seeded permutation. Any prefix is
    class-balanced; prefixes are nested by construction."""
    rng = np.random.default_rng(seed) if seed is not None else None
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if rng is not None:
            members = rng.permutation(members)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))   # sort by rank within class, then by class


def to_unit_range(images_uint8) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1, as EDM)."""
    return torch.as_tensor(np.asarray(images_uint8)).float() / 127.5 - 1.0


def training_set(cfg: DataConfig, dataset: ImageSet | None = None) -> TrainingSet:
    """The class-balanced nested subset of size cfg.size with the labels cfg.labels asks for."""
    dataset = dataset or load_dataset(cfg)
    n_total = len(dataset.labels)
    if cfg.mix_path:   # intra-class mode, alpha = 0 included (the paper's CIFAR-dogs-only point)
        order, images, true_labels, n_total = _mixed_subset(cfg, dataset)
    else:
        if cfg.size > n_total:
            raise ConfigError(f"data.size={cfg.size} is larger than the {n_total} images of {dataset.name}"
                              f"{' with data.num_classes=' + str(cfg.num_classes) if cfg.num_classes else ''}; "
                              f"use data.size<={n_total}")
        order = balanced_order(dataset.labels, cfg.seed)[:cfg.size]
        images, true_labels = dataset.images[order], dataset.labels[order]
    images = to_unit_range(images)
    if cfg.labels == "none":
        labels, label_dim = None, 0
    elif cfg.labels == "true":
        label_dim = int(dataset.labels.max()) + 1
        labels = torch.as_tensor(true_labels)
    elif cfg.labels == "random":
        # One draw per image of the full dataset, so an image keeps its label in every nested subset.
        draws = np.random.default_rng(cfg.seed if cfg.seed is not None else 1024).integers(
            0, cfg.label_classes, size=n_total)
        labels, label_dim = torch.as_tensor(draws[order]), cfg.label_classes
    else:  # unique: label = index within the subset, C = |D| (paper's dataset_unique.py)
        labels, label_dim = torch.arange(cfg.size), cfg.size
    return TrainingSet(images, labels, label_dim, order)


def _mixed_subset(cfg: DataConfig, dataset: ImageSet):
    """Intra-class diversity (paper §4, `intra_diversity.py`): |D| images of class mix_class only, the first
    floor(|D|(1-alpha)) of that class from the dataset and the rest from the mix set, all labelled mix_class.

    Position k of the order is a dataset image when floor(k(1-alpha)) steps up, else the next mix image, so
    every prefix keeps the rule and smaller |D| nest in larger ones at the same alpha. Within each source the
    order is file order (or cfg.seed's permutation). Returns (order, uint8 images, true labels, N + M)."""
    n_data = len(dataset.labels)
    mix = _mix_set(cfg.mix_path, dataset.images.shape[-1])   # at the dataset's resolution
    if mix.images.shape[1] != dataset.images.shape[1]:
        raise ConfigError(f"data.mix_path={cfg.mix_path!r} holds RGB images but {dataset.name} has "
                          f"{dataset.images.shape[1]} channel(s); mix into an RGB dataset such as cifar10")
    order = balanced_order(dataset.labels, cfg.seed)
    in_class = order[dataset.labels[order] == cfg.mix_class]
    if len(in_class) == 0:
        raise ConfigError(f"data.mix_class={cfg.mix_class} has no images in {dataset.name}; "
                          f"use a class in 0..{int(dataset.labels.max())}")
    mix_order = balanced_order(np.zeros(len(mix.labels), dtype=np.int64), cfg.seed)

    def from_dataset(size):   # floor(k(1-alpha)) for k = 0..size; the epsilon keeps 10 * (1 - 0.8) at 2
        return np.floor(np.arange(size + 1) * (1 - cfg.mix_rate) + 1e-9).astype(np.int64)
    available = from_dataset(len(in_class) + len(mix_order))
    fits = (available <= len(in_class)) & (np.arange(len(available)) - available <= len(mix_order))
    largest = int(np.flatnonzero(fits).max())   # both counts grow with |D|: the fitting sizes are a prefix
    if cfg.size > largest:
        raise ConfigError(f"data.size={cfg.size} is larger than the {largest} images of class {cfg.mix_class} "
                          f"at data.mix_rate={cfg.mix_rate} ({len(in_class)} in {dataset.name}, {len(mix_order)} "
                          f"in data.mix_path); use data.size<={largest}")
    is_data = np.diff(from_dataset(cfg.size)) == 1
    n_from_data = int(is_data.sum())
    order = np.empty(cfg.size, dtype=np.int64)
    order[is_data] = in_class[:n_from_data]
    order[~is_data] = n_data + mix_order[:cfg.size - n_from_data]
    images = np.empty((cfg.size, *dataset.images.shape[1:]), dtype=np.uint8)
    images[is_data] = dataset.images[order[is_data]]
    images[~is_data] = mix.images[order[~is_data] - n_data]
    return order, images, np.full(cfg.size, cfg.mix_class, dtype=np.int64), n_data + len(mix.labels)


def describe(cfg: DataConfig, dataset: ImageSet, ts: TrainingSet) -> str:
    """One line: what a config trains on."""
    n, c, h, w = ts.images.shape
    if cfg.mix_path:
        mixed = int((ts.indices >= len(dataset.labels)).sum())
        content = f"class {cfg.mix_class} only ({n - mixed} from {dataset.name}, {mixed} from data.mix_path)"
    else:
        content = f"{len(np.unique(dataset.labels[ts.indices]))} classes"
    return (f"{dataset.name}: {n} of {len(dataset.labels)} images, {c}x{h}x{w}, {content}, "
            f"labels {cfg.labels} (label_dim {ts.label_dim})")


def grid_array(rows: list[torch.Tensor], pad: int = 1) -> np.ndarray:
    """An (H, W, C) uint8 picture with one row per tensor of images in [-1, 1] (e.g. samples, NN1, NN2)."""
    n = min(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        pix = (row[:n].detach().cpu().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()
        for j, img in enumerate(pix):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    scale = max(1, 48 // max(h, w))   # 8x8 digits are unreadable at 1:1
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    return np.repeat(canvas, 3, 2) if c == 1 else canvas


def save_grid(path, rows: list[torch.Tensor]) -> None:
    """Write grid_array(rows) as a PNG."""
    save_png(path, grid_array(rows))


def save_png(path, picture: np.ndarray) -> None:
    """An (H, W, C) uint8 picture as a PNG: temporary name, then rename (never a half-written file)."""
    import os
    from PIL import Image
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(picture).save(tmp, format="PNG")
    os.replace(tmp, path)


def main(argv=None) -> int:
    from diffmem.cli import ArgumentParser, add_config_arguments, fail
    from diffmem.config import load_config
    parser = ArgumentParser(prog="python -m diffmem.data",
                                     description="Load the training subset a config describes and summarize it.")
    add_config_arguments(parser)
    parser.add_argument("--grid", metavar="PATH", help="also write a PNG of the subset (up to 8 rows of 16)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        dataset = load_dataset(cfg.data)
        ts = training_set(cfg.data, dataset)
    except ConfigError as e:
        return fail(str(e))
    print(describe(cfg.data, dataset, ts))
    if args.grid:
        per_row = min(16, len(ts.images))   # full rows only: grid_array cuts every row to the shortest
        rows = [ts.images[i:i + per_row] for i in range(0, min(len(ts.images), 8 * per_row) - per_row + 1, per_row)]
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(args.grid, rows)
    return 0


if __name__ == "__main__":   # through the imported module, so its exception classes are the ones caught
    from diffmem.data import main
    raise SystemExit(main())
