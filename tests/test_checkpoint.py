"""Checkpoints: round trip bit for bit, atomic writes, every kind of damage named on load."""

import json
import os
import stat
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_header,
    save_checkpoint,
    write_json,
)


def _net(width=5):
    return jaxbp.serial(
        jaxbp.Dense(width, dtype=jnp.float32), jaxbp.Tanh, jaxbp.Dense(3, dtype=jnp.float32)
    )


def _state(width=5, seed=0):
    net = _net(width)
    _, params = net.init(jax.random.key(seed), (-1, 4))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    # one real update, so the moments are not all zero
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = opt.update(grads, opt_state, params)
    return net, {"params": params, "opt_state": opt_state}


@pytest.fixture
def saved(tmp_path):
    net, state = _state()
    path = save_checkpoint(
        tmp_path / "ck.npz",
        state,
        {"network": jaxbp.describe(net), "epoch": 7, "note": [1.5, None]},
    )
    return path, net, state


def _same_bits(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.slow
def test_round_trip_is_bit_identical_with_structure(saved):
    path, net, state = saved
    ck = load_checkpoint(path, state, network=jaxbp.describe(net))
    _same_bits(ck.state, state)
    assert jax.tree_util.tree_structure(ck.state["opt_state"]) == jax.tree_util.tree_structure(
        state["opt_state"]
    )
    assert ck.header["epoch"] == 7 and ck.header["note"] == [1.5, None]
    assert ck.header["format"] == "jaxbp-checkpoint" and len(ck.header["sha256"]) == 64
    # the adam step count (an int32 leaf) survives with its dtype
    assert int(ck.state["opt_state"][0].count) == 1


def test_load_without_templates_gives_named_arrays(saved):
    path, _, state = saved
    ck = load_checkpoint(path)
    assert set(ck.state) == {"params", "opt_state"}
    np.testing.assert_array_equal(ck.state["params"]["[0]['W']"], state["params"][0]["W"])
    # plain numpy can read it too: the format is just an .npz with a JSON header
    with np.load(path) as f:
        header = json.loads(str(f["header"][()]))
        assert header["leaves"][0] == {
            "group": "params",
            "path": "[0]['W']",
            "shape": [4, 5],
            "dtype": "<f4",
        }
        np.testing.assert_array_equal(f["leaf_00000"], state["params"][0]["W"])


def test_atomic_write_leaves_no_temporary_and_keeps_old_file_on_failure(saved):
    path, net, state = saved
    before = path.read_bytes()
    with pytest.raises(TypeError, match="not an array"):
        save_checkpoint(path, {"params": {"w": object()}}, {})
    assert path.read_bytes() == before  # the failed write did not touch the checkpoint
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.npz"]


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_written_files_get_the_usual_mode(tmp_path):
    # mkstemp's 0600 would leave metrics.json and checkpoint.npz unreadable to the group,
    # unlike the PNGs beside them: atomic_write gives 0666 less the umask.
    mask = os.umask(0o022)
    try:
        json_path = write_json(tmp_path / "metrics.json", {"a": 1})
        npz_path = atomic_write(tmp_path / "c.npz", lambda f: f.write(b"x"))
        plain = tmp_path / "plain.png"
        plain.write_bytes(b"x")
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (json_path, npz_path, plain)}
    assert modes == {"metrics.json": 0o644, "c.npz": 0o644, "plain.png": 0o644}


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, 0.9, -1])
def test_truncated_file_is_named(saved, keep):
    path, _, state = saved
    data = path.read_bytes()
    cut = (
        keep
        if isinstance(keep, int) and keep >= 0
        else (len(data) - 1 if keep == -1 else int(keep * len(data)))
    )
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"truncated or corrupted|corrupted|incomplete"):
        load_checkpoint(path, state)


def test_flipped_byte_in_an_array_fails_the_checksum(saved):
    path, _, state = saved
    # Rewrite one leaf with a changed value but keep the header: zip CRCs are then fine, only
    # the sha256 can tell.
    with np.load(path) as f:
        members = {k: f[k] for k in f.files}
    members["leaf_00001"] = members["leaf_00001"].copy()
    members["leaf_00001"].view(np.uint8)[0] ^= 1
    np.savez(path, **members)
    with pytest.raises(CheckpointError, match="sha256 checksum does not match"):
        load_checkpoint(path, state)


def test_flipped_byte_anywhere_is_caught(saved):
    path, _, state = saved
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(data), size=8, replace=False):
        damaged = bytearray(data)
        damaged[pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        try:
            ck = load_checkpoint(path, state)
        except CheckpointError:
            continue
        # a flip in zip bookkeeping that numpy ignores must still load the exact data
        _same_bits(ck.state, state)


def test_edited_header_fails_the_checksum(saved):
    path, _, state = saved
    with np.load(path) as f:
        members = {k: f[k] for k in f.files}
    header = json.loads(str(members["header"][()]))
    header["epoch"] = 8
    members["header"] = np.array(json.dumps(header))
    np.savez(path, **members)
    with pytest.raises(CheckpointError, match="checksum"):
        read_header(path)


@pytest.mark.slow
def test_different_network_is_named(saved):
    path, _, _ = saved
    net, state = _state(width=6)
    with pytest.raises(
        CheckpointError,
        match=r"different network: network.layers\[0\].out_dim is 5 in the "
        r"checkpoint, expected 6",
    ):
        load_checkpoint(path, state, network=jaxbp.describe(net))
    # without the description the leaf shapes still catch it
    with pytest.raises(CheckpointError, match=r"params leaf \[0\]\['W'\] has shape \(4, 5\)"):
        load_checkpoint(path, state)


def test_different_optimizer_is_named(saved):
    path, _, state = saved
    other = {"params": state["params"], "opt_state": jaxbp.sgd(0.1).init(state["params"])}
    with pytest.raises(
        CheckpointError, match="opt_state has 9 arrays in the checkpoint, expected 1"
    ):
        load_checkpoint(path, other)


def test_wrong_dtype_is_named(saved):
    path, _, state = saved
    as64 = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64) if np.asarray(a).dtype == np.float32 else a, state
    )
    with pytest.raises(CheckpointError, match="dtype float32, expected float64"):
        load_checkpoint(path, as64)


def test_missing_file_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="no header: not a jaxbp checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "text.npz")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(CheckpointError, match="no header"):
        load_checkpoint(tmp_path / "empty.npz")


def test_checkpoint_error_is_a_value_error_for_the_cli():
    assert issubclass(CheckpointError, ValueError)
    assert os.path.basename(jaxbp.checkpoint.__file__) == "checkpoint.py"
