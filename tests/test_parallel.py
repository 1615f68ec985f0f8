"""lctx.parallel: the mesh constructor and the logical-axis rules."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lctx.compat import AxisType
from lctx.parallel import (LOGICAL_RULES, MESH_AXES, constrain_logical, dim_shards,
                           logical_to_spec, make_mesh, param_shardings)

# --- make_mesh ------------------------------------------------------------------------


def test_make_mesh_axes_sizes_and_auto_types():
    mesh = make_mesh(data=2, sequence=4)
    assert mesh.axis_names == MESH_AXES == ("data", "fsdp", "sequence", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 4


@pytest.mark.parametrize("sizes, expected", [
    (dict(sequence=-1), (1, 1, 8, 1)),
    (dict(data=2, fsdp=-1), (2, 4, 1, 1)),
    (dict(data=1, fsdp=2, sequence=2, tensor=-1), (1, 2, 2, 2)),
])
def test_make_mesh_fills_one_axis(sizes, expected):
    assert tuple(make_mesh(**sizes).shape.values()) == expected


def test_make_mesh_explicit_types_per_axis():
    types = (AxisType.Explicit, AxisType.Auto, AxisType.Explicit, AxisType.Auto)
    mesh = make_mesh(data=2, sequence=4, axis_types=types)
    assert tuple(mesh.axis_types) == types
    assert tuple(make_mesh(sequence=8, axis_types=AxisType.Explicit).axis_types) == (
        AxisType.Explicit,) * 4


def test_make_mesh_on_given_devices():
    mesh = make_mesh(sequence=-1, devices=jax.devices()[:4])
    assert mesh.shape["sequence"] == 4 and mesh.devices.size == 4


@pytest.mark.parametrize("sizes, message", [
    (dict(data=2, sequence=8), r"data=2, fsdp=1, sequence=8, tensor=1: the product 16 must "
                               r"equal the device count 8"),
    (dict(data=3, sequence=-1), r"product 3 must divide the device count 8"),
    (dict(data=-1, sequence=-1), r"at most one axis may be -1"),
    (dict(tensor=0), r"bad: tensor"),
])
def test_make_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes)


def test_make_mesh_rejects_wrong_number_of_axis_types():
    with pytest.raises(ValueError, match="one per axis"):
        make_mesh(sequence=8, axis_types=(AxisType.Auto,) * 3)


# --- logical rules ---------------------------------------------------------------------


def test_rules_table_names_every_logical_axis():
    names = {name for name, _ in LOGICAL_RULES}
    assert names >= {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp",
                     "vocab", "layers"}


def test_activation_embed_is_not_sharded_twice():
    mesh = make_mesh(data=2, fsdp=2, sequence=2)
    # batch takes data+fsdp, length takes sequence: embed's axes are all used.
    assert logical_to_spec(("batch", "length", "embed"), LOGICAL_RULES, mesh) == P(
        ("data", "fsdp"), "sequence", None)


def test_parameters_are_sharded_fsdp_and_tensor():
    mesh = make_mesh(fsdp=2, sequence=2, tensor=2)
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), LOGICAL_RULES, mesh)
    assert spec == P(None, ("fsdp", "sequence"), "tensor", None)
    assert logical_to_spec(("vocab", "embed"), LOGICAL_RULES, mesh) == P("tensor",
                                                                         ("fsdp", "sequence"))


def test_axes_missing_from_the_mesh_are_dropped():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    assert logical_to_spec(("batch", "length", "embed"), LOGICAL_RULES, mesh) == P("data", None,
                                                                                   None)
    assert logical_to_spec(("unknown", None), LOGICAL_RULES, mesh) == P(None, None)


def test_shape_keeps_only_axes_that_divide():
    mesh = make_mesh(fsdp=2, tensor=4)
    # 2 heads cannot split 4 ways: stay whole rather than fail to place.
    assert logical_to_spec(("embed", "heads"), LOGICAL_RULES, mesh, shape=(64, 2)) == P(
        ("fsdp", "sequence"), None)
    # An odd vocab cannot split over tensor=4 either; embed (fsdp=2) still does.
    assert logical_to_spec(("vocab", "embed"), LOGICAL_RULES, mesh, shape=(259, 64)) == P(
        None, ("fsdp", "sequence"))


def test_dim_shards_and_constrain_without_mesh():
    mesh = make_mesh(data=2, sequence=4)
    assert dim_shards(("batch", "length", "embed"), (2, 64, 8), 1, mesh) == 4
    assert dim_shards(("batch", "length", "embed"), (2, 64, 8), 0, mesh) == 2
    assert dim_shards(("batch", "length", "embed"), (2, 63, 8), 1, mesh) == 1
    assert dim_shards(("batch",), (2,), 0, None) == 1
    x = jnp.ones((2, 8))
    assert constrain_logical(x, ("batch", "length"), None) is x


def test_constrain_logical_places_under_jit():
    mesh = make_mesh(data=2, sequence=4)
    out = jax.jit(lambda x: constrain_logical(x * 2, ("batch", "length", "embed"), mesh))(
        jnp.ones((2, 16, 4)))
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "sequence", None)), 3)


def test_param_shardings_from_flax_metadata():
    mesh = make_mesh(fsdp=2, sequence=2, tensor=2)

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp"))
            return x @ self.param("kernel", init, (x.shape[-1], 8))

    boxed = jax.eval_shape(Dense().init, jax.random.key(0), jnp.ones((1, 4)))
    tree = {"params": boxed["params"], "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = param_shardings(tree, mesh)
    assert shardings["params"]["kernel"].spec == P(("fsdp", "sequence"), "tensor")
    assert shardings["step"].spec == P()
    # The result has the structure of the unboxed tree.
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.meta.unbox(tree))
    placed = jax.device_put(np.ones((4, 8), np.float32), shardings["params"]["kernel"])
    assert placed.addressable_shards[0].data.shape == (1, 4)
