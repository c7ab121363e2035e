"""Tests for jaxbp.data: dataset loading, splits, preprocessing, batching.

Everything here is fast (< 1 s) except the MNIST-1D tests, which generate the
dataset once per module (about 1 s of generation plus ~1 s importing mnist1d,
which pulls in scipy and matplotlib) into a temporary cache directory.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from jaxbp import data as D
from jaxbp.data import (
    DATASET_DEFAULTS,
    DATASETS,
    Dataset,
    MissingDependencyError,
    batches,
    load_dataset,
    standardize,
)

ACTIVATIONS = {"sigmoid", "tanh", "relu", "leaky_relu", "gelu", "softplus"}
LOSSES = {"softmax_cross_entropy", "half_sse", "mse", "sigmoid_binary_cross_entropy"}
OPTIMIZERS = {"sgd", "momentum", "adam"}

# name -> (total examples, features, classes)
SKLEARN = {"digits": (1797, 64, 10), "iris": (150, 4, 3), "breast_cancer": (569, 30, 2)}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Never touch the real ~/.cache from tests."""
    monkeypatch.setenv("JAXBP_CACHE", str(tmp_path / "cache"))


def _sklearn_raw(name):
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = getattr(datasets, f"load_{name}")()
    return bunch.data, bunch.target


# --------------------------------------------------------------------------
# Names, errors, defaults
# --------------------------------------------------------------------------


def test_dataset_names():
    assert DATASETS == ("breast_cancer", "digits", "iris", "mnist1d", "seed", "xor")
    assert set(DATASET_DEFAULTS) == set(DATASETS)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as err:
        load_dataset("foo")
    assert str(err.value) == (
        "unknown dataset 'foo'; expected one of: "
        "breast_cancer, digits, iris, mnist1d, seed, text, xor"
    )


@pytest.mark.parametrize("name", ["xor", "seed", "mnist1d"])
def test_test_fraction_rejected_for_fixed_splits(name):
    with pytest.raises(ValueError, match="fixed train/test split"):
        load_dataset(name, test_fraction=0.5)


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction(frac):
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_dataset("iris", test_fraction=frac)


@pytest.mark.parametrize("name", DATASETS)
def test_defaults_are_valid(name):
    d = DATASET_DEFAULTS[name]
    required = {"hidden", "activation", "loss", "optimizer", "lr", "epochs", "batch_size"}
    assert required <= set(d) <= required | {"schedule", "weight_decay", "output_activation"}
    from jaxbp.training import SCHEDULES

    assert d.get("schedule", "constant") in SCHEDULES
    assert d.get("weight_decay", 0.0) >= 0
    assert isinstance(d["hidden"], tuple) and d["hidden"]
    assert all(isinstance(h, int) and h > 0 for h in d["hidden"])
    assert d["activation"] in ACTIVATIONS
    assert d["loss"] in LOSSES
    assert d["optimizer"] in OPTIMIZERS
    assert 0 < d["lr"] < 1 or (name == "seed" and d["lr"] == 0.5)
    assert isinstance(d["epochs"], int) and d["epochs"] > 0
    assert isinstance(d["batch_size"], int) and d["batch_size"] > 0


@pytest.mark.parametrize("name", ["xor", "seed", "iris", "digits", "breast_cancer"])
def test_defaults_fit_the_data(name):
    ds = load_dataset(name)
    assert ds.defaults == DATASET_DEFAULTS[name]
    # A batch order needs 1 <= batch_size <= n_train.
    assert ds.defaults["batch_size"] <= len(ds.x_train)
    # Classification defaults use a loss that takes integer labels.
    if ds.task == "classification":
        assert ds.defaults["loss"] == "softmax_cross_entropy"


def test_defaults_copy_is_independent():
    ds = load_dataset("xor")
    ds.defaults["lr"] = 123.0
    assert DATASET_DEFAULTS["xor"]["lr"] != 123.0
    assert load_dataset("xor").defaults["lr"] == DATASET_DEFAULTS["xor"]["lr"]


# --------------------------------------------------------------------------
# Tiny tutorial datasets
# --------------------------------------------------------------------------


def test_xor():
    ds = load_dataset("xor")
    assert isinstance(ds, Dataset) and ds.name == "xor"
    assert ds.task == "classification" and ds.num_classes == 2 and ds.num_outputs == 2
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (4, 2)
    assert ds.y_train.dtype == np.int32 and ds.y_train.shape == (4,)
    # Labels really are XOR of the inputs.
    np.testing.assert_array_equal(ds.y_train, np.logical_xor(*ds.x_train.T.astype(bool)))
    np.testing.assert_array_equal(ds.x_train, ds.x_test)
    np.testing.assert_array_equal(ds.y_train, ds.y_test)
    assert ds.num_features == 2


def test_seed_example():
    ds = load_dataset("seed")
    assert ds.task == "regression" and ds.num_classes is None
    assert ds.num_outputs == 2 and ds.num_features == 2
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.float32
    np.testing.assert_array_equal(ds.x_train, np.array([[0.1, 0.05]], np.float32))
    np.testing.assert_array_equal(ds.y_train, np.array([[0.02, 0.98]], np.float32))
    np.testing.assert_array_equal(ds.x_test, ds.x_train)
    np.testing.assert_array_equal(ds.y_test, ds.y_train)


# --------------------------------------------------------------------------
# scikit-learn datasets
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SKLEARN))
def test_sklearn_shapes_dtypes_and_stratified_split(name):
    n, features, classes = SKLEARN[name]
    _, y_raw = _sklearn_raw(name)
    ds = load_dataset(name)
    assert ds.name == name and ds.task == "classification"
    assert ds.num_classes == classes == ds.num_outputs
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert ds.x_train.shape[1] == ds.x_test.shape[1] == features
    assert ds.y_train.ndim == ds.y_test.ndim == 1
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert len(ds.x_train) + len(ds.x_test) == n
    # Stratified: each class sends round(25%) of its examples to test.
    raw_counts = np.bincount(y_raw, minlength=classes)
    test_counts = np.bincount(ds.y_test, minlength=classes)
    train_counts = np.bincount(ds.y_train, minlength=classes)
    np.testing.assert_array_equal(test_counts, np.round(0.25 * raw_counts).astype(int))
    np.testing.assert_array_equal(train_counts + test_counts, raw_counts)
    assert ds.y_train.min() == 0 and ds.y_train.max() == classes - 1
    assert np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()


@pytest.mark.parametrize("name", sorted(SKLEARN))
def test_split_is_a_partition_of_the_data(name):
    x_raw, y_raw = _sklearn_raw(name)
    ds = load_dataset(name, standardize=False)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    # Same multiset of (row, label) pairs: nothing lost or duplicated.
    both = np.column_stack([x, y]).astype(np.float64)
    raw = np.column_stack([x_raw.astype(np.float32), y_raw]).astype(np.float64)
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(raw, axis=0))
    assert len(both) == len(raw)


def test_test_fraction():
    ds = load_dataset("digits", test_fraction=0.5)
    assert abs(len(ds.x_test) - 1797 / 2) <= 10


@pytest.mark.parametrize("name", sorted(SKLEARN))
def test_split_deterministic_given_seed(name):
    a, b = load_dataset(name, seed=3), load_dataset(name, seed=3)
    for u, v in zip(a[1:5], b[1:5]):
        np.testing.assert_array_equal(u, v)
    c = load_dataset(name, seed=4)
    assert not np.array_equal(a.y_train, c.y_train)


@pytest.mark.parametrize("name", sorted(SKLEARN))
def test_standardisation_uses_train_stats_only(name):
    raw = load_dataset(name, seed=1, standardize=False)
    ds = load_dataset(name, seed=1)
    mean = raw.x_train.astype(np.float64).mean(0)
    std = raw.x_train.astype(np.float64).std(0)
    varying = std > 1e-8
    # Train split: per-feature mean 0, std 1 (constant features map to 0).
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0)[varying], 1, rtol=1e-4)
    np.testing.assert_array_equal(ds.x_train[:, ~varying], 0)
    # Test split: transformed with the *train* statistics, not its own.
    safe_std = np.where(varying, std, 1.0)
    np.testing.assert_allclose(ds.x_test, (raw.x_test - mean) / safe_std, rtol=1e-5, atol=1e-5)
    assert np.abs(ds.x_test.mean(0)).max() > 1e-3  # would be ~0 if test stats leaked


def test_standardize_helper():
    rng = np.random.default_rng(0)
    x_tr = rng.normal(5.0, 3.0, size=(100, 3))
    x_tr[:, 2] = 7.0  # constant feature: must not divide by zero
    x_te = rng.normal(5.0, 3.0, size=(10, 3))
    a, b = standardize(x_tr, x_te)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(a.std(0)[:2], 1, rtol=1e-5)
    assert np.isfinite(b).all()
    np.testing.assert_allclose(b[:, 2], x_te[:, 2] - 7.0, rtol=1e-5)


def test_missing_sklearn_gives_install_hint(monkeypatch):
    # A None entry in sys.modules makes `import sklearn.datasets` raise ImportError.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxbp\[data\]'") as err:
        load_dataset("iris")
    assert isinstance(err.value, MissingDependencyError)
    assert "scikit-learn" in str(err.value)


def test_module_import_is_light():
    # data.py must not import jax / sklearn / mnist1d at module level.
    import importlib.util
    import subprocess

    spec = importlib.util.find_spec("jaxbp.data")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('d', {spec.origin!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "bad = [k for k in ('jax', 'sklearn', 'mnist1d', 'scipy') if k in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------
# MNIST-1D (generated offline, cached)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """Generate MNIST-1D once for this module into its own cache directory;
    returns (cache dir, seconds the first, generating, load took)."""
    pytest.importorskip("mnist1d")
    cache = tmp_path_factory.mktemp("mnist1d_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXBP_CACHE", str(cache))
    try:
        t0 = time.perf_counter()
        load_dataset("mnist1d")
        elapsed = time.perf_counter() - t0
    finally:
        mp.undo()
    return cache, elapsed


def test_mnist1d_generation_and_cache(mnist1d_cache, monkeypatch):
    cache, first = mnist1d_cache
    monkeypatch.setenv("JAXBP_CACHE", str(cache))
    files = list(cache.glob("mnist1d-*.npz"))
    assert len(files) == 1, files
    assert not list(cache.glob("*.tmp"))  # atomic write left no temp file behind
    t0 = time.perf_counter()
    ds = load_dataset("mnist1d")
    second = time.perf_counter() - t0
    print(f"mnist1d: first load (generate + cache) {first:.2f}s, cached load {second:.3f}s")
    assert second < 0.5 and second < first

    assert ds.task == "classification" and ds.num_classes == 10
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    # All 10 classes, roughly balanced, in both splits.
    assert ds.y_train.min() == 0 and ds.y_train.max() == 9
    assert np.bincount(ds.y_train, minlength=10).min() > 350
    assert np.bincount(ds.y_test, minlength=10).min() > 80
    # Standardised with one mean and std over every position of the train split (a signal:
    # every position keeps the same units), and the test split with the train's numbers.
    raw = load_dataset("mnist1d", standardize=False)
    np.testing.assert_allclose(ds.x_train.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(), 1, rtol=1e-4)
    mean, std = raw.x_train.astype(np.float64).mean(), raw.x_train.astype(np.float64).std()
    np.testing.assert_allclose(ds.x_test, (raw.x_test - mean) / std, rtol=1e-5, atol=1e-5)
    assert np.abs(ds.x_train.mean(0)).max() > 1e-3  # not per position


def test_mnist1d_deterministic_and_matches_cache(mnist1d_cache, tmp_path, monkeypatch):
    cache, _ = mnist1d_cache
    monkeypatch.setenv("JAXBP_CACHE", str(cache))
    cached = D._mnist1d_raw()
    # Fresh generation (bypassing the cache) reproduces the cached arrays exactly,
    # and does not disturb the caller's global NumPy RNG.
    np.random.seed(1234)
    expected_next = np.random.rand()
    np.random.seed(1234)
    fresh = D._generate_mnist1d()
    assert np.random.rand() == expected_next
    for k in cached:
        np.testing.assert_array_equal(cached[k], fresh[k])
    assert fresh["x_train"].shape == (4000, 40) and fresh["x_test"].shape == (1000, 40)


def test_mnist1d_corrupt_cache_is_regenerated(mnist1d_cache, tmp_path, monkeypatch):
    cache, _ = mnist1d_cache
    monkeypatch.setenv("JAXBP_CACHE", str(cache))
    good = D._mnist1d_raw()
    # Regeneration itself is tested above; here reuse the arrays to stay fast.
    monkeypatch.setattr(D, "_generate_mnist1d", lambda: {k: v.copy() for k, v in good.items()})
    # A fresh cache dir holding a broken file under the expected name.
    monkeypatch.setenv("JAXBP_CACHE", str(tmp_path))
    path = D._mnist1d_cache_path(_mnist1d_version())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an npz file")
    again = D._mnist1d_raw()
    for k in good:
        np.testing.assert_array_equal(good[k], again[k])
    with np.load(path) as f:  # and the broken file was replaced
        np.testing.assert_array_equal(f["y_test"], good["y_test"])


def test_missing_mnist1d_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXBP_CACHE", str(tmp_path / "empty"))  # force generation
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'jaxbp\[data\]'"):
        load_dataset("mnist1d")


def _mnist1d_version():
    from importlib.metadata import version

    return version("mnist1d")


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def test_batches_cover_everything_once():
    x = np.arange(23, dtype=np.float32)[:, None]
    y = np.arange(23, dtype=np.int32)
    got = list(batches(x, y, 5, seed=0))
    assert [len(b[0]) for b in got] == [5, 5, 5, 5, 3]
    ys = np.concatenate([b[1] for b in got])
    np.testing.assert_array_equal(np.sort(ys), y)
    assert not np.array_equal(ys, y)  # shuffled
    for xb, yb in got:  # x and y stay paired
        np.testing.assert_array_equal(xb[:, 0], yb)


def test_batches_in_order_and_drop_last():
    x = np.arange(23, dtype=np.float32)[:, None]
    y = np.arange(23, dtype=np.int32)
    ys = np.concatenate([b[1] for b in batches(x, y, 5)])
    np.testing.assert_array_equal(ys, y)  # seed=None keeps order
    assert [len(b[1]) for b in batches(x, y, 5, seed=0, drop_last=True)] == [5] * 4
    with pytest.raises(ValueError):
        list(batches(x, y[:3], 5))
    with pytest.raises(ValueError):
        list(batches(x, y, 0))
