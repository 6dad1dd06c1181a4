import jax
import pytest

from lite_tp_jax import AXES, make_mesh, provide_cpu_devices


def test_axis_names_and_order():
    mesh = make_mesh(data=2, tensor=4)
    assert mesh.axis_names == ("data", "pipeline", "expert", "fsdp", "context", "tensor") == AXES
    assert dict(mesh.shape) == {"data": 2, "pipeline": 1, "expert": 1, "fsdp": 1, "context": 1, "tensor": 4}


def test_tensor_groups_are_neighbouring_devices():
    mesh = make_mesh(data=2, tensor=4)
    ids = [[d.id for d in row] for row in mesh.devices.reshape(2, 4)]
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    "sizes, expected",
    [
        (dict(data=-1, tensor=4), {"data": 2, "tensor": 4}),
        (dict(tensor=-1), {"tensor": 8}),
        (dict(data=2, expert=-1, tensor=2), {"expert": 2}),
    ],
)
def test_one_axis_inferred(sizes, expected):
    mesh = make_mesh(**sizes)
    for name, size in expected.items():
        assert mesh.shape[name] == size


def test_a_mesh_smaller_than_the_devices_takes_the_first_ones():
    """As the CLI does: ``make_mesh(tensor=4)`` on 8 devices is the README's first line."""
    assert list(make_mesh(tensor=4).devices.flat) == jax.devices()[:4]
    assert list(make_mesh(data=3, tensor=2).devices.flat) == jax.devices()[:6]


def test_explicit_devices():
    mesh = make_mesh(tensor=3, devices=jax.devices()[:3])
    assert mesh.devices.size == 3


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(data=3, tensor=4), r"needs 12 devices but 8 are available"),
        (dict(tensor=0), r"'tensor' has size 0"),
        (dict(pipeline=-2), r"'pipeline' has size -2"),
        (dict(data=-1, tensor=-1), r"Only one mesh axis may be -1"),
        (dict(data=-1, tensor=3), r"Cannot infer mesh axis 'data'.*8 devices"),
    ],
)
def test_bad_mesh_is_a_clear_error(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes)


def test_unknown_axis_name_is_rejected():
    with pytest.raises(TypeError, match="tensr"):
        make_mesh(tensr=8)


def test_provide_cpu_devices_after_initialisation():
    assert len(jax.devices()) == 8
    provide_cpu_devices(4)  # fewer than available: fine
    with pytest.raises(RuntimeError, match=r"16 devices were requested but jax is already initialised with 8"):
        provide_cpu_devices(16)
