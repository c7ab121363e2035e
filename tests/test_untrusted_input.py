"""A file someone sends you is data: reading a description or a checkpoint runs no code.

Each test puts a module on ``sys.path`` that leaves a mark (a file, and an entry in
``sys.modules``) when it is imported, then hands jaxbp data that names it: a description, a
checkpoint header, ``--model``. The module must stay unimported unless the user named it
(``modules=`` on ``build``, ``--import`` on the command line). Module and layer names are
unique per test, so nothing another test imported can make one pass.
"""

from __future__ import annotations

import json
import sys
import textwrap
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp.checkpoint import CheckpointError, load_checkpoint
from jaxbp.model import ReferenceNotAllowedError, build, describe

# A custom_vjp layer y = x @ w, and a parameter-free layer y = x ** 3 registered as `layer_name`,
# in a module that writes `mark` the moment it is imported.
MODULE = '''
import pathlib

import jax
import jax.numpy as jnp

import jaxbp

pathlib.Path({mark!r}).write_text("imported")


@jax.custom_vjp
def linear(x, w):
    return x @ w


def _fwd(x, w):
    return x @ w, (x, w)


def _bwd(residuals, dy):
    x, w = residuals
    return dy @ w.T, x.T @ dy


linear.defvjp(_fwd, _bwd)


def init(key, input_shape):
    return {{"w": jax.random.normal(key, (input_shape[-1], 3), jnp.float64)}}


def Cube():
    def init(key, input_shape):
        return tuple(input_shape), ()

    def forward(params, x):
        return x**3, x

    def backward(params, x, dy):
        """dE/dx = 3 x^2 dy."""
        return (), 3 * x**2 * dy

    return jaxbp.Layer(init, forward, backward, {layer_name!r}, ())


jaxbp.register_layer({layer_name!r}, Cube)
'''


class UserModule:
    """A user's module on ``sys.path`` (see ``MODULE``) and what importing it leaves behind."""

    def __init__(self, folder, monkeypatch):
        suffix = uuid.uuid4().hex[:8]
        self.name = f"user_ops_{suffix}"
        self.layer = f"Cube_{suffix}"
        self.mark = folder / f"{self.name}.imported"
        (folder / f"{self.name}.py").write_text(
            textwrap.dedent(MODULE.format(mark=str(self.mark), layer_name=self.layer))
        )
        monkeypatch.syspath_prepend(str(folder))

    @property
    def imported(self) -> bool:
        return self.mark.exists() or self.name in sys.modules

    def custom_vjp(self) -> dict:
        return {
            "name": "CustomVJP",
            "fn": f"{self.name}:linear",
            "init": f"{self.name}:init",
            "input_arg": 0,
            "constants": [],
        }

    def network(self) -> dict:
        return {"name": "serial", "layers": [{"name": "Dense", "out_dim": 4}, self.custom_vjp()]}


@pytest.fixture
def user(tmp_path, monkeypatch):
    module = UserModule(tmp_path, monkeypatch)
    yield module
    sys.modules.pop(module.name, None)


def test_a_description_naming_code_imports_nothing(user):
    with pytest.raises(ReferenceNotAllowedError) as info:
        build(json.loads(json.dumps(user.network())))
    message = str(info.value)
    assert message.startswith(f"model.layers[1].fn: '{user.name}:linear' names code in module")
    assert f"--import {user.name}" in message and f"modules=[{user.name!r}]" in message
    assert not user.imported


def test_a_reference_resolves_only_in_the_modules_given(user):
    other = UserModule(user.mark.parent, pytest.MonkeyPatch())
    # os is imported already: being loaded is not being allowed.
    description = {**user.custom_vjp(), "init": "os:system"}
    with pytest.raises(ValueError, match=r"model.init: 'os:system' names code in module 'os'"):
        build(description, modules=[user.name])
    with pytest.raises(ValueError, match=rf"'{user.name}:linear' names code in module"):
        build(user.custom_vjp(), modules=[other.name])
    sys.modules.pop(other.name, None)


def test_modules_allow_references_and_register_layers(user):
    with pytest.raises(ValueError, match=rf"unknown layer '{user.layer}'.*--import the module"):
        build({"name": user.layer})
    assert not user.imported
    net = build(user.network(), modules=[user.name])  # named by the caller: imported now
    assert user.imported
    assert describe(net) == {
        "name": "serial",
        "layers": [describe(jaxbp.Dense(4)), user.custom_vjp()],
    }
    shape, params = net.init(jax.random.key(0), (-1, 5))
    x = jax.random.normal(jax.random.key(1), (2, 5), jnp.float64)
    hidden = x @ params[0]["W"] + params[0]["b"]
    np.testing.assert_allclose(net.forward(params, x)[0], hidden @ params[1]["w"], rtol=1e-12)
    assert shape == (-1, 3)
    cube = build({"name": user.layer})
    np.testing.assert_allclose(cube.forward((), jnp.asarray([2.0]))[0], [8.0])


@pytest.mark.parametrize(
    "modules, message",
    [
        (["no_such_module_at_all"], "module 'no_such_module_at_all' was not found"),
        ([""], "expected a module name"),
        ([3], "expected a module name"),
    ],
)
def test_modules_that_cannot_be_imported(modules, message):
    with pytest.raises(ValueError, match=message):
        build({"name": "Tanh"}, modules=modules)


def test_a_module_that_fails_on_import_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "fails_on_import_xyz.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing it raised RuntimeError: boom at import"):
        build({"name": "Tanh"}, modules=["fails_on_import_xyz"])


def test_a_checkpoint_naming_code_imports_nothing(user, tmp_path):
    # The header is what --resume and generate read back.
    path = jaxbp.checkpoint.save_checkpoint(
        tmp_path / "ckpt.npz", {"params": {"w": np.ones(2)}}, {"network": user.network()}
    )
    header = load_checkpoint(path).header
    with pytest.raises(ReferenceNotAllowedError):
        build(header["network"])
    assert not user.imported


class _Payload:
    """Unpickling this object writes a file: what a hostile pickle would do."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __reduce__(self):
        return (_touch, (self.mark,))


def _touch(path):
    with open(path, "w") as f:
        f.write("unpickled")


def test_a_checkpoint_holding_a_pickle_never_unpickles_it(tmp_path):
    mark = tmp_path / "unpickled"
    path = tmp_path / "evil.npz"
    good = jaxbp.checkpoint.save_checkpoint(tmp_path / "good.npz", {"params": {"w": np.ones(2)}})
    with np.load(good, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["leaf_00000"] = np.array([_Payload(mark)], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="allow_pickle=False"):
        load_checkpoint(path)
    assert not mark.exists()
    with np.load(path, allow_pickle=True) as f:  # the payload is real: unpickling runs it
        f["leaf_00000"]
    assert mark.exists()


def test_cli_import_makes_a_users_layer_usable(user, run_cli, tmp_path):
    model = tmp_path / "model.json"
    model.write_text(
        json.dumps(
            {
                "name": "serial",
                "layers": [{"name": "Dense", "out_dim": 3}, {"name": user.layer}],
            }
        )
    )
    refused = run_cli("check", "--model", model, "--layers", "2,3", "--input-shape", "2")
    assert refused.code == 2 and f"unknown layer '{user.layer}'" in refused.err
    assert "--import the module that registers it" in refused.err
    done = run_cli(
        "check", "--import", user.name, "--model", model, "--layers", "2,3", "--input-shape", "2"
    )
    assert done.code == 0, done.err
    assert "[0]['W']" in done.out and "MISMATCH" not in done.out
