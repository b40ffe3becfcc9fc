"""The fold math on its own (fxfuse.ir.folds): each identity checked against PyTorch's conv ops in float64
(``max|Δ| ≤ 1e-10 · max|y|``), and each ``why_not_*`` exactness condition refusing what is not exact."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxfuse import Reason
from fxfuse.ir import ChannelAffine, ConvSpec, Refusal
from fxfuse.ir import folds as K
from fxfuse.testing import assert_close_f64

f64 = {"dtype": torch.float64}
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
    assert_close_f64(run(spec, x), run(K.regroup(spec, target), x))


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
    assert_close_f64(F.batch_norm(x, mean, var, w, b, False, 0.0, eps), y)


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
        assert_close_f64(run(second, run(first, x)), run(K.compose(first, second), x))
    else:
        assert any(second.padding)


@given(specs(ndim=2), specs(ndim=2), st.booleans(), st.booleans())
def test_compose_strided_first_equals_sequential(first, second, zero_pad_second, pointwise_bias_free_first):
    """Any first stride: one conv of stride s1·s2, kernel k1 + s1·(k2 − 1) (dilation s1 where k1 = 1), padding
    p1 + s1·p2, equal on inputs of several sizes wherever the pair is declared composable."""
    k1 = (1, 1) if pointwise_bias_free_first else first.kernel_size
    first = first.with_(dilation=(1, 1), groups=1, weight=torch.randn(second.in_channels, 3, *k1, **f64),
                        bias=torch.zeros(second.in_channels, **f64) if pointwise_bias_free_first
                        else torch.randn(second.in_channels, **f64))
    second = second.with_(dilation=(1, 1), padding=(0, 0) if zero_pad_second else second.padding)
    reason = K.why_not_composable(first, second)
    if reason is not None:
        assert any(second.padding) and not pointwise_bias_free_first
        return
    merged = K.compose(first, second)
    for size in ((9, 9), (12, 10), (15, 16)):
        x = torch.randn(2, 3, *size, **f64)
        assert_close_f64(run(second, run(first, x)), run(merged, x))


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.sampled_from([1, 3]),
       st.integers(1, 2), st.integers(1, 2), st.booleans())
def test_compose_pointwise_first_fast_paths(g, m_pg, n_pg, depthwise, k, s, s1, pad_second):
    """1x1 first of any stride: one product per group (same groups), or a per-channel product (a depthwise second,
    e.g. a pool); a zero-padded second needs the 1x1 bias-free."""
    cin, m = g * 2, g * m_pg
    b1 = torch.zeros(m, **f64) if pad_second else torch.randn(m, **f64)
    first = ConvSpec(torch.randn(m, cin // g, 1, 1, **f64), b1, (s1, s1), (1, 1), (1, 1), g)
    p = k // 2 if pad_second else 0
    if depthwise:
        second = ConvSpec(torch.randn(m, 1, k, k, **f64), torch.randn(m, **f64), (s, s), (p, p), (1, 1), m)
    else:
        second = ConvSpec(torch.randn(g * n_pg, m_pg, k, k, **f64), torch.randn(g * n_pg, **f64), (s, s), (p, p),
                          (1, 1), g)
    assert K.why_not_composable(first, second) is None
    fused = K.compose(first, second)
    assert fused.groups == g and fused.kernel_size == (k, k)
    for size in (7, 10):
        x = torch.randn(2, cin, size, size, **f64)
        assert_close_f64(run(second, run(first, x)), run(fused, x))


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
    assert_close_f64(sum(run(b, x) for b in branches), run(K.sum_parallel(branches), x))


@given(st.data())
def test_sum_onto_equals_sum_parallel_or_declines(data):
    """The base branch's kernel as the grid: equal to the sum of the branches (a depthwise or more-grouped branch on
    the block diagonal, smaller kernels on the centre taps, dilated ones on every d-th tap), the base's weight left
    untouched; ``None`` where the base's kernel is not the grid (a larger branch, or fewer groups)."""
    g = data.draw(st.integers(1, 2))
    c = 2 * g
    stride = (data.draw(st.integers(1, 2)),) * 2
    kb = data.draw(st.sampled_from([3, 5]))
    base = ConvSpec(torch.randn(c, c // g, kb, kb, **f64), torch.randn(c, **f64), stride, (kb // 2,) * 2, (1, 1), g)
    others = []
    for _ in range(data.draw(st.integers(1, 4))):
        k = data.draw(st.sampled_from([1, 3, 5]))
        d = data.draw(st.integers(1, 2)) if k > 1 else 1
        gb = data.draw(st.sampled_from([g, c, 1]))
        others.append(ConvSpec(torch.randn(c, c // gb, k, k, **f64), torch.randn(c, **f64), stride,
                               (d * (k - 1) // 2,) * 2, (d, d), gb))
    if K.why_not_on_one_grid([base, *others]) is not None:
        return
    before = base.weight.clone()
    merged = K.sum_onto(base, others)
    fits = all(o.groups % g == 0 and o.dilation[0] * (o.kernel_size[0] - 1) <= kb - 1 for o in others)
    assert (merged is not None) == fits
    if merged is None:
        return
    assert torch.equal(base.weight, before) and merged.groups == g and merged.kernel_size == base.kernel_size
    x = torch.randn(2, c, 9, 9, **f64)
    assert_close_f64(run(base, x) + sum(run(o, x) for o in others), run(merged, x))


def test_misaligned_centres_are_refused():
    a = ConvSpec(torch.randn(2, 2, 3, 3, **f64), torch.zeros(2, **f64), (2, 2), (1, 1), (1, 1), 1)
    b = ConvSpec(torch.randn(2, 2, 2, 2, **f64), torch.zeros(2, **f64), (2, 2), (0, 0), (1, 1), 1)
    assert _says(K.why_not_on_one_grid([a, b]), Reason.TAP_GRID, "align")


def test_conv_transpose_affine_group_mapping():
    g, cin, cout = 2, 4, 6
    w, b = torch.randn(cin, cout // g, 3, 3, **f64), torch.randn(cout, **f64)
    spec = ConvSpec(w, b, (2, 2), (1, 1), (1, 1), g, transposed=True, output_padding=(1, 1))
    aff = ChannelAffine(torch.randn(cout, **f64), torch.randn(cout, **f64))
    fused = K.conv_then_affine(spec, aff)
    x = torch.randn(1, cin, 4, 4, **f64)
    y = F.conv_transpose2d(x, w, b, 2, 1, 1, g)
    expected = aff.scale[None, :, None, None] * y + aff.shift[None, :, None, None]
    assert_close_f64(expected, F.conv_transpose2d(x, fused.weight, fused.bias, 2, 1, 1, g))


def test_affine_then_conv_grouped():
    g = 2
    spec = ConvSpec(torch.randn(4, 3, 3, 3, **f64), torch.randn(4, **f64), (1, 1), (0, 0), (1, 1), g)
    aff = ChannelAffine(torch.randn(6, **f64), torch.randn(6, **f64))
    x = torch.randn(1, 6, 5, 5, **f64)
    fused = K.affine_then_conv(aff, spec)
    assert_close_f64(run(spec, aff.scale[None, :, None, None] * x + aff.shift[None, :, None, None]), run(fused, x))


def test_stack_parallel_equals_cat():
    a = ConvSpec(torch.randn(2, 3, 1, 1, **f64), torch.randn(2, **f64), (1, 1), (0, 0), (1, 1), 1)
    b = ConvSpec(torch.randn(4, 3, 3, 3, **f64), torch.randn(4, **f64), (1, 1), (1, 1), (1, 1), 1)
    x = torch.randn(1, 3, 6, 6, **f64)
    assert_close_f64(torch.cat([run(a, x), run(b, x)], 1), run(K.stack_parallel([a, b]), x))


def _says(refusal, code: Reason, fragment: str) -> bool:
    """A ``why_not_*`` condition refused with reason code ``code`` and a sentence mentioning ``fragment``."""
    assert isinstance(refusal, Refusal), refusal
    assert refusal.code is code, (refusal, code)
    return fragment in refusal.reason


def _affine(c: int, zero_shift: bool = False) -> ChannelAffine:
    shift = torch.zeros(c, **f64) if zero_shift else torch.randn(c, **f64)
    return ChannelAffine(torch.randn(c, **f64), shift)


def _apply(aff: ChannelAffine, y, axis: int = 1):
    shape = [1] * y.dim()
    shape[axis] = -1
    return aff.scale.reshape(shape) * y + aff.shift.reshape(shape)


@given(specs())
def test_conv_then_affine_is_the_affine_of_the_conv(spec):
    aff = _affine(spec.out_channels)
    x = torch.randn(2, spec.in_channels, *([6] * spec.ndim), **f64)
    assert_close_f64(_apply(aff, run(spec, x)), run(K.conv_then_affine(spec, aff), x))


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2))
def test_conv_transpose_then_affine_any_groups(g, in_pg, out_pg, stride):
    w, b = torch.randn(g * in_pg, out_pg, 3, **f64), torch.randn(g * out_pg, **f64)
    spec = ConvSpec(w, b, (stride,), (1,), (1,), g, transposed=True, output_padding=(stride - 1,))
    aff = _affine(g * out_pg)
    x = torch.randn(2, g * in_pg, 5, **f64)
    fused = K.conv_then_affine(spec, aff)
    want = _apply(aff, F.conv_transpose1d(x, w, b, stride, 1, stride - 1, g))
    assert_close_f64(want, F.conv_transpose1d(x, fused.weight, fused.bias, stride, 1, stride - 1, g))


@given(specs(), st.booleans())
def test_affine_then_conv_where_exact(spec, padded):
    """Exact without zero padding; with zero padding only for a zero shift (then ``why_not`` says None too)."""
    if not padded:
        spec = spec.with_(padding=(0,) * spec.ndim)
    aff = _affine(spec.in_channels, zero_shift=padded)
    assert K.why_not_affine_then_conv(aff, spec) is None
    x = torch.randn(2, spec.in_channels, *([7] * spec.ndim), **f64)
    assert_close_f64(run(spec, _apply(aff, x)), run(K.affine_then_conv(aff, spec), x))


@given(specs(ndim=2), st.sampled_from(["reflect", "replicate", "circular"]))
def test_affine_then_conv_with_a_copying_padding_mode(spec, mode):
    """Reflect / replicate / circular padding copies values within a channel, so ``pad(a·x + c) = a·pad(x) + c``:
    the fold is exact for any shift, the fused conv keeping the padding mode."""
    spec = spec.with_(padding_mode=mode)
    aff = _affine(spec.in_channels)
    assert K.why_not_affine_then_conv(aff, spec) is None
    fused = K.affine_then_conv(aff, spec)
    assert fused.padding_mode == mode

    def run_padded(s: ConvSpec, t):  # what nn.Conv2d does for a non-zero padding_mode
        pads = [p for p in reversed(s.padding) for _ in range(2)]
        return F.conv2d(F.pad(t, pads, mode=s.padding_mode), s.weight, s.bias, s.stride, 0, s.dilation, s.groups)

    x = torch.randn(2, spec.in_channels, 7, 7, **f64)
    assert_close_f64(run_padded(spec, _apply(aff, x)), run_padded(fused, x))


def test_affine_then_conv_refusals():
    spec = ConvSpec(torch.randn(4, 3, 3, 3, **f64), torch.randn(4, **f64), (1, 1), (1, 1), (1, 1), 1)
    assert _says(K.why_not_affine_then_conv(_affine(3), spec), Reason.PADDING, "nonzero shift")
    assert K.why_not_affine_then_conv(_affine(3, zero_shift=True), spec) is None
    assert K.why_not_affine_then_conv(_affine(3), spec.with_(padding=(0, 0))) is None
    for mode in ("reflect", "replicate", "circular"):  # copying pads commute with the affine: any shift
        assert K.why_not_affine_then_conv(_affine(3), spec.with_(padding_mode=mode)) is None
    transposed = ConvSpec(torch.randn(3, 4, 3, 3, **f64), torch.randn(4, **f64), (1, 1), (0, 0), (1, 1), 1,
                          transposed=True, output_padding=(0, 0))
    assert _says(K.why_not_affine_then_conv(_affine(3), transposed), Reason.NOT_LINEAR, "transposed")


def test_linear_folds():
    w, b = torch.randn(5, 4, **f64), torch.randn(5, **f64)
    x = torch.randn(3, 2, 4, **f64)
    after, before = _affine(5), _affine(4)
    w1, b1 = K.linear_then_affine(w, b, after)
    assert_close_f64(_apply(after, F.linear(x, w, b), axis=-1), F.linear(x, w1, b1))
    w2, b2 = K.affine_then_linear(before, w, b)
    assert_close_f64(F.linear(_apply(before, x, axis=-1), w, b), F.linear(x, w2, b2))


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_affine_eps_and_no_affine(affine):
    c, eps = 3, 0.3  # a large eps: placing it anywhere but under the square root is visible
    mean, var = torch.randn(c, **f64), torch.rand(c, **f64) + 0.1
    w, b = (torch.randn(c, **f64), torch.randn(c, **f64)) if affine else (None, None)
    aff = K.batchnorm_as_affine(mean, var, w, b, eps)
    x = torch.randn(2, c, 3, **f64)
    assert_close_f64(F.batch_norm(x, mean, var, w, b, False, 0.0, eps), _apply(aff, x))


@pytest.mark.parametrize(("kernel", "stride", "padding"), [((3, 3), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 1))])
def test_avg_pool_as_conv(kernel, stride, padding):
    x = torch.randn(2, 3, 7, 6, **f64)
    spec = K.avg_pool_as_conv(3, kernel, stride, padding)
    assert_close_f64(F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True), run(spec, x))


def test_identity_and_scale_as_conv():
    x = torch.randn(2, 4, 5, 5, **f64)
    assert_close_f64(x, run(K.identity_as_conv(4, 2), x), rtol=0.0)
    spec = ConvSpec(torch.randn(3, 4, 3, 3, **f64), torch.randn(3, **f64), (1, 1), (1, 1), (1, 1), 1)
    assert_close_f64(-2.5 * run(spec, x), run(K.scale_conv(spec, -2.5), x))


def test_one_grid_refusals():
    base = ConvSpec(torch.randn(2, 2, 3, 3, **f64), torch.zeros(2, **f64), (1, 1), (1, 1), (1, 1), 1)
    pointwise = ConvSpec(torch.randn(2, 2, 1, 1, **f64), torch.zeros(2, **f64), (1, 1), (0, 0), (1, 1), 1)
    assert K.why_not_on_one_grid([base, pointwise]) is None
    assert _says(K.why_not_on_one_grid([base, pointwise.with_(stride=(2, 2))]), Reason.TAP_GRID, "stride")
    assert _says(K.why_not_on_one_grid([base, base.with_(padding_mode="reflect")]), Reason.PADDING, "padding_mode")
    assert _says(K.why_not_on_one_grid([base, pointwise.with_(padding=(1, 1))]), Reason.TAP_GRID, "align")
    transposed = base.with_(transposed=True, output_padding=(0, 0))
    assert _says(K.why_not_on_one_grid([base, transposed]), Reason.NOT_LINEAR, "transposed")


def test_composable_conditions():
    def conv(k, stride=1, padding=0, dilation=1, bias=True):
        b = torch.randn(2, **f64) if bias else torch.zeros(2, **f64)
        return ConvSpec(torch.randn(2, 2, k, k, **f64), b, (stride,) * 2, (padding,) * 2, (dilation,) * 2, 1)

    assert K.why_not_composable(conv(3, padding=1), conv(3)) is None
    assert K.why_not_composable(conv(1, bias=False), conv(3, padding=1)) is None
    assert K.why_not_composable(conv(3, stride=2, padding=1), conv(3)) is None  # any first stride, p2 = 0
    assert K.why_not_composable(conv(1, stride=2, padding=1, bias=False), conv(3, padding=1)) is None
    assert _says(K.why_not_composable(conv(1, stride=2), conv(3, padding=1)), Reason.PADDING, "nonzero bias")
    assert _says(K.why_not_composable(conv(3, dilation=2), conv(3)), Reason.TAP_GRID, "dilation")
    assert _says(K.why_not_composable(conv(1), conv(3, dilation=2)), Reason.TAP_GRID, "dilation")
    assert _says(K.why_not_composable(conv(3), conv(3, padding=1)), Reason.PADDING, "non-pointwise")
    assert _says(K.why_not_composable(conv(1), conv(3, padding=1)), Reason.PADDING, "nonzero bias")


def test_place_on_grid_centres_a_small_kernel():
    """A 1x1 branch on a 3x3 grid (padding 1) lands on the centre tap."""
    spec = ConvSpec(torch.randn(2, 2, 1, 1, **f64), torch.zeros(2, **f64), (1, 1), (0, 0), (1, 1), 1)
    out = K.place_on_grid(spec, (1, 1), (1, 1), (3, 3))
    expected = torch.zeros(2, 2, 3, 3, **f64)
    expected[:, :, 1, 1] = spec.weight[:, :, 0, 0]
    assert torch.equal(out, expected)


# ------------------------------------------------------------------- linear maps across a reshape
@given(specs(), st.data())
def test_conv_as_matrix_is_the_conv_on_flattened_samples(spec, data):
    """The conv on one fixed-size sample as a (grouped) matrix of the NCHW-flattened sample: equal to the conv on
    random inputs, densified or as the grouped 1x1 conv on ``[N, C·∏size, 1, …]``; a refusal for what it is not."""
    size = tuple(data.draw(st.integers(m, m + 3)) for m in spec.geometry.min_input_size())
    x = torch.randn(3, spec.in_channels, *size, **f64)
    y = run(spec, x).flatten(1)
    rows = K.conv_as_matrix(spec, size)
    dense = K.regroup(rows, 1)
    assert_close_f64(y, x.flatten(1) @ dense.weight[:, :, 0].t() + dense.bias)
    pointwise = K.map_as_pointwise_conv(rows, 2)
    assert_close_f64(y, run(pointwise, x.reshape(3, -1, 1, 1)).flatten(1))
    assert K.why_not_conv_as_matrix(spec) is None
    assert K.why_not_conv_as_matrix(spec.with_(padding_mode="reflect")).code is Reason.PADDING


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_affine_on_rows_is_the_channel_affine(r, c, h, w):
    """A per-channel affine on ``[R, C, h, w]`` is a per-feature affine of its ``C·h·w`` rows (and of rows of a
    multiple of that); on rows that cut a channel period it is not one."""
    a = ChannelAffine(torch.randn(c, **f64), torch.randn(c, **f64))
    x = torch.randn(r, c, h, w, **f64)
    y = x * a.scale[:, None, None] + a.shift[:, None, None]
    row = K.affine_on_rows(a, (r, c, h, w), 1, c * h * w)
    assert row is not None
    assert_close_f64(y.flatten(1), x.flatten(1) * row.scale + row.shift)
    if c > 1:
        assert K.affine_on_rows(a, (r, c, h, w), 1, h * w) is None


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups", "size"),
                         [(1, 1, 1, 1, (3, 3)), (2, 1, 1, 1, (5, 4)), (1, 2, 2, 3, (6, 5)), (2, 0, 1, 3, (7, 7))])
def test_linear_after_conv_composes_without_the_matrix(stride: int, padding: int, dilation: int, groups: int,
                                                       size: tuple) -> None:
    """``fc(affine(conv(x)).flatten(1))`` = one Linear on ``x.flatten(1)``; the same as densifying the conv's
    matrix (:func:`conv_as_matrix`) and multiplying, which it never does."""
    spec = ConvSpec(torch.randn(6, 6 // groups, 3, 3, **f64), torch.randn(6, **f64), (stride,) * 2, (padding,) * 2,
                    (dilation,) * 2, groups)
    x = torch.randn(2, 6, *size, **f64)
    f_out = run(spec, x)[0].numel()
    rows = ChannelAffine(torch.randn(f_out, **f64), torch.randn(f_out, **f64))
    w2, b2 = torch.randn(5, f_out, **f64), torch.randn(5, **f64)
    weight, bias = K.linear_after_conv(spec, size, rows, w2, b2)
    want = F.linear(run(spec, x).flatten(1) * rows.scale + rows.shift, w2, b2)
    assert_close_f64(want, F.linear(x.flatten(1), weight, bias))
    dense = K.regroup(K.conv_as_matrix(spec, size), 1).weight[:, :, 0]
    assert_close_f64(w2 * rows.scale @ dense, weight)
    plain, plain_bias = K.linear_after_conv(spec, size, None, w2, b2)
    assert_close_f64(F.linear(run(spec, x).flatten(1), w2, b2), F.linear(x.flatten(1), plain, plain_bias))


