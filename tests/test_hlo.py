"""Collective accounting from compiled HLO: the mesh axes each collective spans."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lite_tp_jax.core.hlo import axes_label, bytes_by_axis, collectives, collectives_per_step, device_groups, mesh_axes
from lite_tp_jax.core.mesh import make_mesh


def test_device_groups_of_each_printed_form():
    assert device_groups("replica_groups={{0,1},{2,3}}, to_apply=%add") == ((0, 1), (2, 3))
    assert device_groups("source_target_pairs={{0,1},{1,0}}") == ((0, 1), (1, 0))
    assert device_groups("replica_groups={}, to_apply=%add") == ()
    # iota: arange(8) reshaped [2,4] (transposed), then read in rows of the group size
    assert device_groups("replica_groups=[2,4]<=[8], x") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert device_groups("replica_groups=[4,2]<=[2,4]T(1,0), x") == ((0, 4), (1, 5), (2, 6), (3, 7))
    # mesh form: devices that differ only along the named axes
    text = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, x"
    assert device_groups(text) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert device_groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, x") == (
        (0, 4), (1, 5), (2, 6), (3, 7))
    assert device_groups("replica_groups=mesh['a'=2,'b'=2,'c'=2] {'a','c'}, x") == ((0, 1, 4, 5), (2, 3, 6, 7))


def test_mesh_axes_of_groups():
    mesh = make_mesh(data=2, expert=2, tensor=2, devices=jax.devices()[:8])  # ids: d*4 + e*2 + t
    assert mesh_axes(((0, 1), (2, 3), (4, 5), (6, 7)), mesh) == ("tensor",)
    assert mesh_axes(((0, 4), (1, 5), (2, 6), (3, 7)), mesh) == ("data",)
    assert mesh_axes(((0, 1, 4, 5), (2, 3, 6, 7)), mesh) == ("data", "tensor")
    assert mesh_axes((), mesh) == ("data", "expert", "tensor")
    assert axes_label(("data", "tensor")) == "data+tensor" and axes_label(()) == "none"


@pytest.fixture(scope="module")
def data_tensor_hlo():
    """One shard_map over data 2 x tensor 4 with a collective over each axis and both."""
    mesh = make_mesh(data=2, tensor=4, devices=jax.devices()[:8])

    def body(x):
        over_tensor = jax.lax.psum(x, "tensor")                            # f32[3, 5]
        over_data = jax.lax.all_gather(x, "data", axis=0, tiled=True)      # f32[6, 5]
        over_both = jax.lax.psum(x[:1], ("data", "tensor"))                # f32[1, 5]
        shifted = jax.lax.ppermute(x, "tensor", [(i, (i + 1) % 4) for i in range(4)])  # f32[3, 5]

        def loop(c, _):  # a while loop of 3 trips: counted 3 times per step
            return jax.lax.psum(c, "data") * 0.5, None

        looped, _ = jax.lax.scan(loop, x[:2], None, length=3)              # f32[2, 5]
        return over_tensor.sum() + over_data.sum() + over_both.sum() + shifted.sum() + looped.sum()

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data", "tensor"), out_specs=P(), check_vma=False))
    x = np.arange(6 * 20, dtype=np.float32).reshape(6, 20)
    return mesh, f.lower(x).compile().as_text()


def test_collectives_name_the_axes_they_span(data_tensor_hlo):
    mesh, text = data_tensor_hlo
    found = {(c.kind, c.shape, c.axes) for c in collectives(text, mesh)}
    assert ("all-reduce", (3, 5), ("tensor",)) in found
    assert ("all-gather", (6, 5), ("data",)) in found
    assert ("all-reduce", (1, 5), ("data", "tensor")) in found
    assert ("collective-permute", (3, 5), ("tensor",)) in found
    assert ("all-reduce", (2, 5), ("data",)) in found
    assert all(c.axes is None for c in collectives(text))  # no mesh, no axes


def test_bytes_by_axis_applies_trip_counts(data_tensor_hlo):
    mesh, text = data_tensor_hlo
    per_step = [(c.kind, c.shape, n) for c, n in collectives_per_step(text, mesh) if c.shape == (2, 5)]
    assert per_step == [("all-reduce", (2, 5), 3)]
    by_axis = bytes_by_axis(text, mesh)
    assert by_axis["data+tensor"] == 1 * 5 * 4
    assert by_axis["data"] == (6 * 5 + 3 * 2 * 5) * 4
    assert by_axis["tensor"] == 2 * 3 * 5 * 4  # psum + ppermute
