"""Datasets for the training modules: one loader, numpy only, no TensorFlow import.

Four datasets, the same for every module:

* ``cifar10`` and ``mnist``: through ``keras.datasets`` (downloaded into
  ``$KERAS_HOME/datasets``), or read by this module's own readers from ``--data-dir``
  holding the official files (``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``;
  ``mnist.npz``).  Data that cannot be fetched is a :class:`TrainingError` naming
  ``--data-dir`` — never a silent switch to other data.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no
  network needed), upsampled to 16x16x1, split 80/20 stratified with a fixed split seed.
* ``synthetic``: class-dependent patterns plus noise, generated from ``--seed``; every
  output names it ``synthetic``.

Images stay in their stored integer form (uint8) with ``pixel_max`` telling the
pipeline how to scale them to [0, 1]; this keeps CIFAR-10 at 150 MB instead of 600 MB
and moves the float conversion into the parallel tf.data map.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from training.errors import TrainingError
from training.safe_pickle import NumpyOnlyUnpickler

DATASETS = ("cifar10", "mnist", "digits", "synthetic")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
CIFAR10_DIRECTORY = "cifar-10-batches-py"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
MNIST_FILE = "mnist.npz"
MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")

# What a damaged or foreign file makes the readers raise (zlib and zipfile errors are
# not OSErrors; a damaged pickle can claim absurd lengths: OverflowError, MemoryError).
DAMAGED_FILE_ERRORS = (
    OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError, MemoryError,
    RecursionError, pickle.UnpicklingError, tarfile.TarError, zipfile.BadZipFile, zlib.error,
)

# The split of sklearn's digits into train and test is part of the dataset's
# definition, not of a run: it stays the same whatever --seed says.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_UPSAMPLE = 2

SYNTHETIC_TRAIN_IMAGES = 5_000
SYNTHETIC_TEST_IMAGES = 1_000
SYNTHETIC_CLASSES = 10


@dataclass(frozen=True, eq=False)
class ImageData:
    """A dataset's train and test images, as stored (uint8, NHWC) with integer labels."""

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    pixel_max: float

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.x_train.shape[1:])


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test arrays that one training run uses.

    ``x_*`` may be images (scaled by ``1 / pixel_max`` in the pipeline) or, for the
    bottleneck workflow, feature maps (``pixel_max`` 1.0).
    """

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    pixel_max: float

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.x_train.shape[1:])

    def counts(self) -> dict[str, int]:
        return {"train": len(self.x_train), "validation": len(self.x_val), "test": len(self.x_test)}


# --------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    synthetic_shape: tuple[int, int, int] = (32, 32, 3),
) -> ImageData:
    """Load ``name``; ``limit`` keeps the first N train and first N test images."""
    if name == "cifar10":
        data = _load_cifar10(data_dir)
    elif name == "mnist":
        data = _load_mnist(data_dir)
    elif name == "digits":
        data = _load_digits()
    elif name == "synthetic":
        data = make_synthetic(synthetic_shape, seed=seed)
    else:
        raise TrainingError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if limit is not None:
        data = replace(
            data,
            x_train=data.x_train[:limit],
            y_train=data.y_train[:limit],
            x_test=data.x_test[:limit],
            y_test=data.y_test[:limit],
        )
    return data


def hold_out_validation(data: ImageData, *, fraction: float, position: str) -> Splits:
    """Hold out ``fraction`` of the training images for validation.

    ``position="first"`` takes them from the start (the course CNN: the first 5,000 of
    CIFAR-10's 50,000); ``"last"`` from the end, as Keras's ``validation_split`` does
    (the course MLP).
    """
    count = max(1, int(round(len(data.x_train) * fraction)))
    if count >= len(data.x_train):
        raise TrainingError(
            f"only {len(data.x_train)} training images: too few to hold out {fraction:.0%} for validation; "
            "raise --limit"
        )
    if position == "first":
        x_val, y_val = data.x_train[:count], data.y_train[:count]
        x_train, y_train = data.x_train[count:], data.y_train[count:]
    elif position == "last":
        x_val, y_val = data.x_train[-count:], data.y_train[-count:]
        x_train, y_train = data.x_train[:-count], data.y_train[:-count]
    else:
        raise ValueError(f"position must be 'first' or 'last', not {position!r}")
    return Splits(
        name=data.name,
        source=data.source,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=data.x_test,
        y_test=data.y_test,
        num_classes=data.num_classes,
        pixel_max=data.pixel_max,
    )


def check_data_dir(name: str, data_dir: Path | None) -> None:
    """Fail early (before TensorFlow is imported) when ``--data-dir`` lacks the files."""
    if data_dir is None:
        return
    if name == "cifar10":
        locate_cifar10(data_dir)
    elif name == "mnist":
        locate_mnist(data_dir)
    else:
        raise TrainingError(f"--data-dir is only read for cifar10 and mnist, not for {name!r}: drop --data-dir")


# --------------------------------------------------------------------------- CIFAR-10


def locate_cifar10(data_dir: Path) -> Path:
    """The CIFAR-10 source inside ``data_dir``: the batches directory or the tarball."""
    data_dir = Path(data_dir)
    candidates = [data_dir, data_dir / CIFAR10_DIRECTORY]
    for candidate in candidates:
        if candidate.is_dir() and all(
            (candidate / batch).is_file() for batch in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
        ):
            return candidate
    for candidate in (data_dir, data_dir / CIFAR10_TARBALL):
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz")):
            return candidate
    raise TrainingError(
        f"--data-dir {data_dir} holds no CIFAR-10 files: put {CIFAR10_DIRECTORY}/ (data_batch_1..5, test_batch) "
        f"or {CIFAR10_TARBALL} there (download from {CIFAR10_URL})"
    )



def reason(exc: BaseException) -> str:
    """An exception's message cut to its first line (and sentence), for a one-line error."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    first = text.splitlines()[0].rstrip(":")
    first = first.split(". ", 1)[0]
    return first[:160]


_CIFAR10_AGAIN = f"download {CIFAR10_TARBALL} again from {CIFAR10_URL}"


def _parse_cifar10_batch(raw: bytes, label: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except DAMAGED_FILE_ERRORS as exc:
        raise TrainingError(
            f"{label} is not a CIFAR-10 batch in the official pickle format ({reason(exc)}): {_CIFAR10_AGAIN}"
        ) from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise TrainingError(
            f"{label}: expected data of shape (N, 3072) and N labels, found {data.shape} and {labels.shape}: "
            f"{_CIFAR10_AGAIN}"
        )
    # Each row holds the red, then green, then blue 32x32 plane.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10(source: Path) -> ImageData:
    """Read CIFAR-10 from the official batches directory or ``cifar-10-python.tar.gz``."""
    source = Path(source)
    names = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    if source.is_dir():
        raw = {}
        for name in names:
            try:
                raw[name] = (source / name).read_bytes()
            except OSError as exc:
                raise TrainingError(f"cannot read {source / name} ({reason(exc)}): check the file, or {_CIFAR10_AGAIN}") from exc
    else:
        raw = _read_tarball_members(source, names)

    def label(name: str) -> str:  # the file, or the member inside the tarball
        return str(source / name) if source.is_dir() else f"{source}:{name}"

    train = [_parse_cifar10_batch(raw[name], label(name)) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _parse_cifar10_batch(raw[CIFAR10_TEST_BATCH], label(CIFAR10_TEST_BATCH))
    return ImageData(
        name="cifar10",
        source=str(source),
        x_train=np.concatenate([images for images, _ in train]),
        y_train=np.concatenate([labels for _, labels in train]),
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        pixel_max=255.0,
    )


def _read_tarball_members(tarball: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The named batch files from the tarball, read in memory (nothing is extracted)."""
    found: dict[str, bytes] = {}
    try:
        archive = tarfile.open(tarball, "r:*")
    except tarfile.ReadError as exc:
        # tarfile lists every compression it tried, one per line: the gist is that none fitted.
        raise TrainingError(
            f"{tarball} is not a readable {CIFAR10_TARBALL} (not a tar archive, compressed or not): it is damaged "
            f"or something else; download it again from {CIFAR10_URL}"
        ) from exc
    except OSError as exc:
        raise TrainingError(f"cannot read {tarball} ({reason(exc)}): check the file, or {_CIFAR10_AGAIN}") from exc
    try:
        with archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names and base not in found:
                    handle = archive.extractfile(member)
                    if handle is not None:
                        found[base] = handle.read()
    except DAMAGED_FILE_ERRORS as exc:
        raise TrainingError(
            f"{tarball} is not a readable {CIFAR10_TARBALL} ({reason(exc)}): it is damaged or cut short; "
            f"download it again from {CIFAR10_URL}"
        ) from exc
    missing = [name for name in names if name not in found]
    if missing:
        raise TrainingError(
            f"{tarball} lacks {', '.join(missing)}: it is not the official {CIFAR10_TARBALL}; "
            f"download it again from {CIFAR10_URL}"
        )
    return found


def _load_cifar10(data_dir: Path | None) -> ImageData:
    if data_dir is not None:
        return read_cifar10(locate_cifar10(data_dir))
    (x_train, y_train), (x_test, y_test) = _keras_download(
        "cifar10", f"{CIFAR10_DIRECTORY}/ or {CIFAR10_TARBALL} ({CIFAR10_URL})"
    )
    return ImageData(
        name="cifar10",
        source="keras.datasets.cifar10",
        x_train=x_train,
        y_train=y_train.reshape(-1).astype(np.int64),
        x_test=x_test,
        y_test=y_test.reshape(-1).astype(np.int64),
        num_classes=10,
        pixel_max=255.0,
    )


# --------------------------------------------------------------------------- MNIST


def locate_mnist(data_dir: Path) -> Path:
    data_dir = Path(data_dir)
    for candidate in (data_dir / MNIST_FILE, data_dir):
        if candidate.is_file() and candidate.suffix == ".npz":
            return candidate
    raise TrainingError(f"--data-dir {data_dir} holds no {MNIST_FILE}: put {MNIST_FILE} there (download from {MNIST_URL})")


def read_mnist(path: Path) -> ImageData:
    """Read the official ``mnist.npz`` (x_train, y_train, x_test, y_test)."""
    again = f"download it again from {MNIST_URL}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise TrainingError(f"{path} is one array, not the official {MNIST_FILE} archive: {again}")
            missing = [key for key in MNIST_KEYS if key not in archive.files]
            if missing:
                raise TrainingError(f"{path} is not the official {MNIST_FILE}: it lacks {', '.join(missing)}; {again}")
            arrays = {key: archive[key] for key in MNIST_KEYS}
    except DAMAGED_FILE_ERRORS as exc:
        raise TrainingError(f"{path} is not a readable {MNIST_FILE} ({reason(exc)}): it is damaged; {again}") from exc
    return _mnist_image_data(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], str(path))


def _mnist_image_data(x_train, y_train, x_test, y_test, source: str) -> ImageData:
    if x_train.ndim != 3 or x_test.ndim != 3:
        raise TrainingError(f"{source}: MNIST images must be N x 28 x 28, found {x_train.shape} and {x_test.shape}")
    try:
        images = (np.asarray(x_train, dtype=np.uint8)[..., None], np.asarray(x_test, dtype=np.uint8)[..., None])
        labels = (np.asarray(y_train, dtype=np.int64).reshape(-1), np.asarray(y_test, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"{source}: MNIST images and labels must be numbers ({reason(exc)})") from exc
    if len(labels[0]) != len(images[0]) or len(labels[1]) != len(images[1]):
        raise TrainingError(f"{source}: {len(images[0])}/{len(images[1])} images but {len(labels[0])}/{len(labels[1])} labels")
    return ImageData(
        name="mnist",
        source=source,
        x_train=images[0],
        y_train=labels[0],
        x_test=images[1],
        y_test=labels[1],
        num_classes=10,
        pixel_max=255.0,
    )


def _load_mnist(data_dir: Path | None) -> ImageData:
    if data_dir is not None:
        return read_mnist(locate_mnist(data_dir))
    (x_train, y_train), (x_test, y_test) = _keras_download("mnist", f"{MNIST_FILE} ({MNIST_URL})")
    return _mnist_image_data(x_train, y_train, x_test, y_test, "keras.datasets.mnist")


# --------------------------------------------------------------------------- digits, synthetic


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are the integers 0..16.  The 8x8 images are upsampled 2x (nearest)
    # to 16x16: the course CNN's three 2x2 poolings then end on a 2x2 map instead of
    # 1x1 (measured: 8x8 tops out near 96.8% test accuracy, 16x16 reaches ~98.6%).
    images = np.repeat(np.repeat(digits.images.astype(np.uint8), DIGITS_UPSAMPLE, axis=1), DIGITS_UPSAMPLE, axis=2)
    images = images[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target.astype(np.int64),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    return ImageData(
        name="digits",
        source="sklearn.datasets.load_digits",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        pixel_max=16.0,
    )


def make_synthetic(
    shape: tuple[int, int, int],
    *,
    seed: int,
    train_images: int = SYNTHETIC_TRAIN_IMAGES,
    test_images: int = SYNTHETIC_TEST_IMAGES,
    num_classes: int = SYNTHETIC_CLASSES,
) -> ImageData:
    """Learnable synthetic images: one smooth random pattern per class plus noise.

    Used for tests and benchmarks where no real data may be fetched; it is always
    called ``synthetic`` in outputs so nobody mistakes its accuracy for CIFAR-10's.
    """
    rng = np.random.default_rng(seed)
    height, width, channels = shape
    coarse = rng.uniform(0.0, 1.0, size=(num_classes, -(-height // 4), -(-width // 4), channels))
    prototypes = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :height, :width, :]

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=count)
        noise = rng.uniform(0.0, 1.0, size=(count, height, width, channels))
        images = 0.6 * prototypes[labels] + 0.4 * noise
        return (images * 255).astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = draw(train_images)
    x_test, y_test = draw(test_images)
    return ImageData(
        name="synthetic",
        source=f"generated (seed {seed}, {num_classes} class patterns + noise)",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        pixel_max=255.0,
    )


# --------------------------------------------------------------------------- keras.datasets


def _keras_download(name: str, what_to_provide: str):
    """``keras.datasets.<name>.load_data()``, with a failed fetch turned into one line."""
    import keras

    loader = getattr(keras.datasets, name)
    try:
        return loader.load_data()
    except Exception as exc:  # keras wraps every fetch failure in a plain Exception
        raise TrainingError(
            f"could not fetch {name} through keras.datasets ({reason(exc)}); without network, "
            f"pass --data-dir DIR where DIR holds {what_to_provide}"
        ) from exc
