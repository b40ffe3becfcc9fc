"""The fold math on its own (fxfuse.ir.folds): each identity checked against PyTorch's conv ops in float64."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxfuse.ir import folds as K
from fxfuse.ir import ChannelAffine, ConvSpec

f64 = dict(dtype=torch.float64)
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run(spec: ConvSpec, x):
    return CONV[spec.ndim](x, spec.weight, spec.bias, spec.stride, spec.padding, spec.dilation, spec.groups)


@st.composite
def specs(draw, ndim=None, stride=None):
    ndim = ndim or draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k = tuple(draw(st.sampled_from([1, 3])) for _ in range(ndim))
    d = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    p = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    s = stride or tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    return ConvSpec(torch.randn(cout, cin // g, *k, **f64), torch.randn(cout, **f64), s, p, d, g)


@given(specs(), st.data())
def test_regroup_is_the_same_conv(spec, data):
    divisors = [d for d in range(1, spec.groups + 1) if spec.groups % d == 0]
    target = data.draw(st.sampled_from(divisors))
    x = torch.randn(2, spec.in_channels, *([7] * spec.ndim), **f64)
    torch.testing.assert_close(run(K.regroup(spec, target), x), run(spec, x), rtol=1e-12, atol=1e-12)


def test_identity_kernel_for_groups():
    """After regrouping to g groups the Dirac kernel is W[o, o mod (C/g), centre] = 1."""
    c, g = 6, 3
    w = K.regroup(K.identity_as_conv(c, 2), g).weight
    expected = torch.zeros(c, c // g, 1, 1, **f64)
    for o in range(c):
        expected[o, o % (c // g), 0, 0] = 1
    assert torch.equal(w, expected)


@given(st.integers(1, 4), st.floats(1e-5, 0.5))
def test_batchnorm_affine_matches_f_batch_norm(c, eps):
    mean, var, w, b = torch.randn(c, **f64), torch.rand(c, **f64) + 0.1, torch.randn(c, **f64), torch.randn(c, **f64)
    x = torch.randn(3, c, 4, **f64)
    aff = K.batchnorm_as_affine(mean, var, w, b, eps)
    y = aff.scale[None, :, None] * x + aff.shift[None, :, None]
    torch.testing.assert_close(y, F.batch_norm(x, mean, var, w, b, False, 0.0, eps), rtol=1e-12, atol=1e-12)


@given(specs(ndim=2, stride=(1, 1)), specs(ndim=2), st.booleans())
def test_compose_equals_sequential(first, second, zero_pad_second):
    # make the pair chainable: channels match, first stride 1 dilation 1
    first = first.with_(dilation=(1, 1), groups=1, weight=torch.randn(second.in_channels, 3, *first.kernel_size, **f64),
                        bias=torch.randn(second.in_channels, **f64))
    second = second.with_(dilation=(1, 1))
    if zero_pad_second:
        second = second.with_(padding=(0, 0))
    x = torch.randn(2, 3, 9, 9, **f64)
    reason = K.why_not_composable(first, second)
    if reason is None:
        torch.testing.assert_close(run(K.compose(first, second), x), run(second, run(first, x)),
                                   rtol=1e-11, atol=1e-11)
    else:
        assert any(second.padding)


@given(st.data())
def test_sum_parallel_equals_sum(data):
    g = data.draw(st.integers(1, 2))
    cin, cout = 2 * g, 3 * g
    stride = (data.draw(st.integers(1, 2)),) * 2
    branches = []
    for _ in range(data.draw(st.integers(2, 4))):
        k = data.draw(st.sampled_from([1, 3, 5]))
        d = data.draw(st.integers(1, 2)) if k > 1 else 1
        gb = data.draw(st.sampled_from([g, cin] if cin == cout else [g]))
        branches.append(ConvSpec(torch.randn(cout, cin // gb, k, k, **f64), torch.randn(cout, **f64), stride,
                                 (d * (k - 1) // 2,) * 2, (d, d), gb))
    assert K.why_not_on_one_grid(branches) is None
    x = torch.randn(2, cin, 9, 9, **f64)
    torch.testing.assert_close(run(K.sum_parallel(branches), x), sum(run(b, x) for b in branches),
                               rtol=1e-11, atol=1e-11)


def test_misaligned_centres_are_refused():
    a = ConvSpec(torch.randn(2, 2, 3, 3, **f64), torch.zeros(2, **f64), (2, 2), (1, 1), (1, 1), 1)
    b = ConvSpec(torch.randn(2, 2, 2, 2, **f64), torch.zeros(2, **f64), (2, 2), (0, 0), (1, 1), 1)
    assert "align" in K.why_not_on_one_grid([a, b])


def test_conv_transpose_affine_group_mapping():
    g, cin, cout = 2, 4, 6
    w, b = torch.randn(cin, cout // g, 3, 3, **f64), torch.randn(cout, **f64)
    spec = ConvSpec(w, b, (2, 2), (1, 1), (1, 1), g, transposed=True, output_padding=(1, 1))
    aff = ChannelAffine(torch.randn(cout, **f64), torch.randn(cout, **f64))
    fused = K.conv_then_affine(spec, aff)
    x = torch.randn(1, cin, 4, 4, **f64)
    y = F.conv_transpose2d(x, w, b, 2, 1, 1, g)
    expected = aff.scale[None, :, None, None] * y + aff.shift[None, :, None, None]
    torch.testing.assert_close(F.conv_transpose2d(x, fused.weight, fused.bias, 2, 1, 1, g), expected)


def test_affine_then_conv_grouped():
    g = 2
    spec = ConvSpec(torch.randn(4, 3, 3, 3, **f64), torch.randn(4, **f64), (1, 1), (0, 0), (1, 1), g)
    aff = ChannelAffine(torch.randn(6, **f64), torch.randn(6, **f64))
    x = torch.randn(1, 6, 5, 5, **f64)
    fused = K.affine_then_conv(aff, spec)
    torch.testing.assert_close(run(fused, x), run(spec, aff.scale[None, :, None, None] * x
                                                   + aff.shift[None, :, None, None]))


def test_stack_parallel_equals_cat():
    a = ConvSpec(torch.randn(2, 3, 1, 1, **f64), torch.randn(2, **f64), (1, 1), (0, 0), (1, 1), 1)
    b = ConvSpec(torch.randn(4, 3, 3, 3, **f64), torch.randn(4, **f64), (1, 1), (1, 1), (1, 1), 1)
    x = torch.randn(1, 3, 6, 6, **f64)
    torch.testing.assert_close(run(K.stack_parallel([a, b]), x), torch.cat([run(a, x), run(b, x)], 1))
