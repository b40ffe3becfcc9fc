"""Mutation check for the fold math, the rules and the checks around them (``make mutants``).

Each mutant is one small source patch — a sign, an eps placement, a dropped group mapping, a skipped exactness
condition — that a wrong implementation could plausibly contain. For each, this script copies the package and the
tests to a temporary directory, applies the patch there (the working tree is never edited), and runs the mutant's
relevant test files from the default suite with ``pytest -x -q``. A mutant is *killed* when a test fails; it
*survives* when they all pass, which means the tests cannot tell the wrong code from the right one.

Usage::

    python tests/mutants.py                 # every mutant; exit status 1 if any survives
    python tests/mutants.py NAME [NAME …]   # only these
    python tests/mutants.py --list          # names, files and what each breaks

Not collected by pytest (the file name does not start with ``test_``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("fxfuse", "tests", "benchmarks", "docs", "pyproject.toml", "README.md")

KERNELS = "tests/test_kernels.py"
RULES = "tests/rules"
ONLINE = "tests/test_expand_online.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file to patch, relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: Tuple[str, ...]  # test files / directories to run (default suite, in this order, -x)
    what: str


MUTANTS: Tuple[Mutant, ...] = (
    # ------------------------------------------------------------------------------------- fold math
    Mutant("conv_then_affine_shift_sign", "fxfuse/ir/folds.py",
           "bias=affine.scale * spec.bias + affine.shift)", "bias=affine.scale * spec.bias - affine.shift)",
           (KERNELS, f"{RULES}/test_conv_bn.py"), "b' = a·b − c instead of a·b + c"),
    Mutant("batchnorm_eps_outside_sqrt", "fxfuse/ir/folds.py",
           "inv_std = torch.rsqrt(running_var + eps)", "inv_std = 1.0 / (torch.sqrt(running_var) + eps)",
           (KERNELS, f"{RULES}/test_conv_bn.py"), "1/(σ + ε) instead of 1/sqrt(σ² + ε)"),
    Mutant("affine_then_conv_drops_group_mapping", "fxfuse/ir/folds.py",
           "idx = input_channel_index(w.shape[0], w.shape[1], spec.groups, w.device)",
           "idx = input_channel_index(w.shape[0], w.shape[1], 1, w.device)",
           (KERNELS, f"{RULES}/test_bn_conv.py"), "W[o, j] scaled by a[j] instead of a[group(o)·C_in/g + j]"),
    Mutant("affine_then_conv_bias_mean_not_sum", "fxfuse/ir/folds.py",
           "new_b = spec.bias + (taps_sum * affine.shift[idx]).sum(dim=1)",
           "new_b = spec.bias + (taps_sum * affine.shift[idx]).mean(dim=1)",
           (KERNELS, f"{RULES}/test_bn_conv.py"), "b' = b + mean_j (not Σ_j) of W·c"),
    Mutant("conv_transpose_affine_on_input_axis", "fxfuse/ir/folds.py",
           "    if spec.transposed:\n        c_in, out_per_group", "    if False:\n        c_in, out_per_group",
           (KERNELS, f"{RULES}/test_conv_bn.py"), "a transposed conv scaled along axis 0 (its input channels)"),
    Mutant("linear_then_affine_drops_scale_on_bias", "fxfuse/ir/folds.py",
           "return weight * affine.scale[:, None], affine.scale * bias + affine.shift",
           "return weight * affine.scale[:, None], bias + affine.shift",
           (KERNELS, f"{RULES}/test_conv_bn.py"), "linear b' = b + c instead of a·b + c"),
    Mutant("affine_then_linear_shift_sign", "fxfuse/ir/folds.py",
           "return weight * affine.scale[None, :], bias + weight @ affine.shift",
           "return weight * affine.scale[None, :], bias - weight @ affine.shift",
           (KERNELS, f"{RULES}/test_bn_conv.py"), "linear b' = b − W·c"),
    Mutant("avg_pool_weight_one_axis", "fxfuse/ir/folds.py",
           "1.0 / math.prod(kernel)", "1.0 / kernel[0]",
           (KERNELS, f"{RULES}/test_branch_sum.py"), "avg-pool kernel 1/k instead of 1/prod(k)"),
    Mutant("regroup_wrong_block", "fxfuse/ir/folds.py",
           "cols = (group % ratio)[:, None] * in_pg", "cols = ((group + 1) % ratio)[:, None] * in_pg",
           (KERNELS, f"{RULES}/test_branch_sum.py"), "block-diagonal expansion puts a group in the wrong block"),
    Mutant("place_on_grid_at_corner", "fxfuse/ir/folds.py",
           "start = (padding[axis] - spec.padding[axis]) // dilation[axis]", "start = 0",
           (KERNELS, f"{RULES}/test_branch_sum.py"), "a small kernel placed at the grid's corner, not its centre"),
    Mutant("sum_parallel_first_bias_only", "fxfuse/ir/folds.py",
           "weight, bias = weight + place_on_grid(s, padding, dilation, kernel), bias + s.bias",
           "weight, bias = weight + place_on_grid(s, padding, dilation, kernel), bias",
           (KERNELS, f"{RULES}/test_branch_sum.py"), "merged bias = the first branch's only"),
    # (max(p1, p2) for the composed padding would be an equivalent mutant: the exactness conditions allow padding on
    # at most one of the two convs.)
    Mutant("compose_drops_first_padding", "fxfuse/ir/folds.py",
           "padding = tuple(a + st * b for a, b, st in zip(first.padding, second.padding, s1))",
           "padding = tuple(st * b for a, b, st in zip(first.padding, second.padding, s1))",
           (KERNELS, f"{RULES}/test_sequential.py"), "composed padding s1·p2 instead of p1 + s1·p2"),
    Mutant("compose_bias_ignores_first_bias", "fxfuse/ir/folds.py",
           "bias = second.bias + (taps_sum * first.bias[idx]).sum(dim=1)", "bias = second.bias",
           (KERNELS, f"{RULES}/test_sequential.py"), "composed bias b2 instead of b2 + Σ W2·b1"),
    Mutant("compose_pointwise_depthwise_wrong_groups", "fxfuse/ir/folds.py",
           "return ConvSpec(first.weight * second.weight, bias, stride, padding, tap_dilation, first.groups)",
           "return ConvSpec(first.weight * second.weight, bias, stride, padding, tap_dilation, 1)",
           (KERNELS, ONLINE), "1x1 then depthwise composed as a dense conv (groups 1, not the 1x1's)"),
    Mutant("sum_onto_drops_branch_bias", "fxfuse/ir/folds.py",
           "        bias = bias + s.bias\n", "        bias = bias\n",
           (KERNELS, ONLINE), "branches summed onto the base kernel keep only the base's bias"),
    Mutant("sum_onto_diagonal_wrong_columns", "fxfuse/ir/folds.py",
           "cols = (group % ratio)[:, None] * s_in + torch.arange(s_in, device=weight.device)[None, :]",
           "cols = torch.arange(s_in, device=weight.device)[None, :].expand(c_out, s_in)",
           (KERNELS, ONLINE), "a more-grouped branch added into the first input channels, not its block diagonal"),
    # --------------------------------------------------------------------- online re-parameterization (OREPA)
    Mutant("online_kernel_ignores_branch_scale", "fxfuse/expansion/online.py",
           "else conv_then_affine(spec, layer.affine()))", "else spec)",
           (ONLINE,), "the online kernel leaves out a branch's linearized-BN scale (the twin applies it)"),
    Mutant("online_map_branch_dropped", "fxfuse/expansion/online.py",
           "            out = out + self.branches[name](x)\n", "            pass\n",
           (ONLINE,), "a chain run on the feature map (merge='auto') left out of the block's sum"),
    Mutant("online_kernel_pad_border_not_shift", "fxfuse/expansion/online.py",
           "spec = conv_then_affine(spec, layer.affine()).with_(padding=layer.padding)",
           "spec = conv_then_affine(spec, ChannelAffine(layer.scale, torch.zeros_like(layer.scale)))"
           ".with_(padding=layer.padding)",
           (ONLINE,), "DBB's scale-and-pad composed without its shift (border and interior lose it)"),
    # ------------------------------------------------------------------ export capture: cheap functionalization
    Mutant("out_of_place_ignores_views", "fxfuse/ir/graphs.py",
           "or any(u is not node and ops.is_alias(u) for u in x.users):", ":",
           ("tests/test_out_of_place.py",), "an in-place write into a tensor a view shares made out-of-place"),
    Mutant("out_of_place_later_reads_stay", "fxfuse/ir/graphs.py",
           "if user is not node and user is not fresh and order.get(user, -1) > order[node]:", "if False:",
           ("tests/test_out_of_place.py",), "a read of the written tensor after the write keeps the old value"),
    # ------------------------------------------------------------------------------ exactness conditions
    Mutant("why_not_affine_then_conv_ignores_padding", "fxfuse/ir/folds.py",
           "if any(spec.padding) and bool((affine.shift != 0).any()):", "if False:",
           (KERNELS, f"{RULES}/test_bn_conv.py"), "BN with a shift folded into a zero-padding conv"),
    Mutant("why_not_on_one_grid_ignores_stride", "fxfuse/ir/folds.py",
           "if s.stride != first.stride:", "if False:",
           (KERNELS, f"{RULES}/test_branch_sum.py"), "branches of different stride declared mergeable"),
    Mutant("why_not_composable_pads_any_first_conv", "fxfuse/ir/folds.py",
           "if any(k != 1 for k in first.kernel_size):", "if False:",
           (KERNELS, f"{RULES}/test_sequential.py", f"{RULES}/test_sequential_strided.py"),
           "a padded second conv composed after a kxk conv"),
    Mutant("compose_ignores_first_stride", "fxfuse/ir/folds.py",
           "stride = tuple(a * b for a, b in zip(s1, second.stride))", "stride = tuple(second.stride)",
           (KERNELS, f"{RULES}/test_sequential_strided.py"), "composed stride s2 instead of s1·s2"),
    Mutant("compose_strided_padding_unscaled", "fxfuse/ir/folds.py",
           "padding = tuple(a + st * b for a, b, st in zip(first.padding, second.padding, s1))",
           "padding = tuple(a + b for a, b, st in zip(first.padding, second.padding, s1))",
           (KERNELS, f"{RULES}/test_sequential_strided.py"), "composed padding p1 + p2 instead of p1 + s1·p2"),
    Mutant("compose_strided_taps_adjacent", "fxfuse/ir/folds.py",
           "slice(st * t, st * t + k) for t, k, st in zip(tap, k1, s1))",
           "slice(t, t + k) for t, k, st in zip(tap, k1, s1))",
           (KERNELS, f"{RULES}/test_sequential_strided.py"), "second-conv taps placed 1 apart instead of s1"),
    Mutant("compose_dilated_keeps_every_tap", "fxfuse/ir/folds.py",
           "tuple(slice(None, None, d) for d in dilation)", "tuple(slice(None, None, 1) for d in dilation)",
           (KERNELS, f"{RULES}/test_sequential_strided.py"), "dilated merged kernel keeps the zero taps"),
    Mutant("linear_after_conv_bias_scaled", "fxfuse/ir/folds.py",
           "composed.flatten(1), weight @ conv_rows + bias", "composed.flatten(1), scaled @ conv_rows + bias",
           (KERNELS, f"{RULES}/test_conv_into_fc.py"), "the affine after a conv scales the Linear's bias term twice"),
    Mutant("conv_as_matrix_bias_tiled", "fxfuse/ir/folds.py",
           "spec.bias.repeat_interleave(positions)", "spec.bias.repeat(positions)",
           (KERNELS, f"{RULES}/test_conv_into_fc.py"),
           "conv-as-matrix bias tiled over channels (b[f mod C_out]) instead of b[o] at each of o's positions"),
    Mutant("affine_on_rows_ignores_inner_axes", "fxfuse/ir/folds.py",
           "index = (torch.arange(features, device=affine.scale.device) // inner) % shape[axis]",
           "index = torch.arange(features, device=affine.scale.device) % shape[axis]",
           (KERNELS, f"{RULES}/test_conv_into_fc.py"),
           "a BN on [R, O, h, w] read on the rows as if its channel were the innermost axis"),
    # ------------------------------------------------------------------------------------------ rules
    Mutant("remove_noop_zero_minus_is_neutral", "fxfuse/rules/remove_noop.py",
           '"sub": (None, 0)', '"sub": (0, 0)',
           (f"{RULES}/test_remove_noop.py",), "0 − t bypassed as if it were t"),
    Mutant("conv_bn_ignores_other_users", "fxfuse/rules/conv_bn.py",
           "if ctx.single_user(producer) is not node:", "if False:",
           (f"{RULES}/test_conv_bn.py",), "conv + BN folded although the conv output is read elsewhere"),
    Mutant("linear_view_bn_ignores_axis_mixing", "fxfuse/rules/linear_view_bn.py",
           "if flat[1] != out[-1] or flat[0] != math.prod(out[:-1]):", "if False:",
           (f"{RULES}/test_linear_view_bn.py",), "BN over an axis-mixing view folded as per-feature"),
    Mutant("copying_pad_accepts_zero_pads", "fxfuse/ir/ops.py",
           'COPY_PAD_MODES = ("reflect", "replicate", "circular")',
           'COPY_PAD_MODES = ("reflect", "replicate", "circular", "constant")',
           (f"{RULES}/test_bn_conv.py",), "a zero pad treated as commuting with a BN's shift"),
    Mutant("bn_conv_ignores_pad_users", "fxfuse/rules/bn_conv.py",
           "while padded is not None and ctx.single_user(source) is (pads[-1] if pads else node):",
           "while padded is not None:",
           (f"{RULES}/test_bn_conv.py",), "BN folded through a pad that another node also reads"),
    Mutant("pad_into_conv_ignores_padding_mode", "fxfuse/rules/pad_into_conv.py",
           ' or conv.spec.padding_mode != "zeros":', ":",
           (f"{RULES}/test_pad_into_conv.py",), "a zero pad absorbed into a reflect-padding conv"),
    Mutant("pad_through_pointwise_ignores_bias", "fxfuse/rules/pad_through_pointwise.py",
           "if bool((conv.spec.bias != 0).any()):", "if False:",
           (f"{RULES}/test_pad_through_pointwise.py",), "a zero pad moved before a biased 1x1 conv"),
    Mutant("branch_sum_inplace_read_later", "fxfuse/rules/branch_sum.py",
           "if any(u is not node and _comes_after(u, node) for t in chain for u in ctx.real_users(t)):",
           "if False:",
           (f"{RULES}/test_branch_sum.py",), "an in-place add merged although its target is read again"),
    Mutant("branch_sum_pool_bn_drops_shift", "fxfuse/rules/branch_sum.py",
           "spec = folds.scale_conv(folds.conv_then_affine(pool.spec, affine), coef)",
           "spec = folds.scale_conv(folds.conv_then_affine(pool.spec, ChannelAffine(affine.scale, 0 * affine.shift)),"
           " coef)",
           (f"{RULES}/test_branch_sum.py",), "BN(avg_pool(x)) merged as the scaled pool kernel without the BN shift"),
    Mutant("avg_pool_padded_count_exclude_is_a_conv", "fxfuse/ir/read/layers.py",
           "if (not cip and any(as_tuple(p, ndim))) or ceil or div is not None:",
           "if ceil or div is not None:",
           (f"{RULES}/test_branch_sum.py",), "a padded count_include_pad=False pool read as a 1/k² conv"),
    Mutant("sequential_ignores_other_users", "fxfuse/rules/sequential.py",
           "if ctx.single_user(mid) is not node:", "if False:",
           (f"{RULES}/test_sequential.py",), "conv → conv merged although the intermediate is read elsewhere"),
    Mutant("conv_into_fc_ignores_spatial_size", "fxfuse/rules/conv_into_fc.py",
           "if _pinned_by_view(ctx, side.input) or _guarded(side.input):", "if True:",
           (f"{RULES}/test_conv_into_fc.py",),
           "a conv read as the matrix of its example size although the graph runs other sizes"),
    Mutant("conv_into_fc_ignores_element_order", "fxfuse/rules/conv_into_fc.py",
           "    if first.root is not second.root:\n", "    if False:\n",
           (f"{RULES}/test_conv_into_fc.py",), "an FC over NHWC rows summed with a conv's NCHW matrix"),
    Mutant("concat_densifies_grouped_convs", "fxfuse/rules/concat.py",
           "r.kind == \"conv\" and r.spec.groups == 1 and", "r.kind == \"conv\" and",
           (f"{RULES}/test_concat.py",), "grouped convs stacked (expanded to dense: more work)"),
    Mutant("horizontal_densifies_grouped_convs", "fxfuse/rules/horizontal.py",
           "read.input is node and read.spec.groups == 1", "read.input is node",
           (f"{RULES}/test_horizontal.py",), "grouped sibling convs stacked (expanded to dense: more work)"),
    Mutant("fold_constants_folds_inner_nodes", "fxfuse/rules/fold_constants.py",
           "if all(constants.value(u) is not constants._MISSING for u in node.users):", "if False:",
           (f"{RULES}/test_fold_constants.py",), "every node of a constant sub-graph folded, not only the outermost"),
    Mutant("fold_constants_copies_views", "fxfuse/rules/fold_constants.py",
           "if not _computes(ctx, node, set()):", "if False:",
           (f"{RULES}/test_fold_constants.py",), "a view of a parameter copied into a new parameter"),
    Mutant("fold_constants_ignores_in_place_writers", "fxfuse/rules/fold_constants.py",
           "if writer is not None:", "if False:",
           (f"{RULES}/test_fold_constants.py",), "a computed weight written in place later folded (drifts per call)"),
    Mutant("pad_values_ignores_leak", "fxfuse/rules/pad_values.py",
           "if leak is not None:", "if False:",
           (f"{RULES}/test_pad_values.py",), "the zero-padded map is read before the writes, and folded anyway"),
    Mutant("pad_values_ignores_other_users", "fxfuse/rules/pad_values.py",
           "if ctx.single_user(source) is not vp.pad:", "if False:",
           (f"{RULES}/test_pad_values.py",), "the padded op moved although another user keeps it (computed twice)"),
    Mutant("pad_values_through_spatial_op", "fxfuse/ir/folds.py",
           'if not spec.is_pointwise or spec.padding_mode != "zeros":', 'if spec.padding_mode != "zeros":',
           (f"{RULES}/test_pad_values.py",), "a pad with values moved before a kxk conv (its border is not f(0))"),
    Mutant("pad_values_any_value", "fxfuse/ir/folds.py",
           "if float((bias - v).abs().max()) > PAD_VALUE_RTOL * scale:", "if False:",
           (f"{RULES}/test_pad_values.py",), "pad values that differ from f(0) accepted"),
    Mutant("pad_values_compares_f_of_one", "fxfuse/ir/folds.py",
           "bias = spec.bias.to(torch.float64)", "bias = (spec.bias + spec.weight.flatten(1).sum(1)).to(torch.float64)",
           (f"{RULES}/test_pad_values.py",), "the pad value compared with f(1) = b + ΣW instead of f(0) = b"),
    Mutant("valued_pad_accepts_partial_border", "fxfuse/ir/read/pads.py",
           "if p and not covered.get(axis + 2, set()) >= set(range(p)) | set(range(size - p, size)):", "if False:",
           (f"{RULES}/test_pad_values.py",), "a border only partly written read as a pad with values"),
    Mutant("valued_pad_accepts_interior_writes", "fxfuse/ir/read/pads.py",
           "if hi <= lo or not (hi <= p or lo >= size - p):", "if hi <= lo:",
           (f"{RULES}/test_pad_values.py",), "a write reaching into the interior read as a border write"),
    Mutant("zero_pad_axis_order", "fxfuse/ir/read/pads.py",
           "per_axis[spatial - 1 - i] = left", "per_axis[i] = left",
           (f"{RULES}/test_pad_into_conv.py", f"{RULES}/test_pad_values.py"),
           "F.pad's list read first axis first (it lists the last axis first)"),
    # --------------------------------------------------------------------------- verification and checks
    Mutant("driver_ignores_deny", "fxfuse/rewrite/driver.py",
           "if key in deny:", "if False:",
           ("tests/test_testing.py", "tests/test_errors.py"), "rollback never takes effect"),
    Mutant("compare_lenient", "fxfuse/verify.py",
           "if err > tol:", "if err > tol + 1e-4 * scale:",
           ("tests/test_testing.py", KERNELS), "the one output comparison accepts 1e-4 relative errors"),
    Mutant("literals_not_restored", "fxfuse/_dtypes.py",
           "_restore(out.gm.graph, self.literals)", "pass",
           ("tests/test_artifact.py",), "the returned graph keeps the float64 lens's dtype literals"),
    Mutant("overflow_not_checked", "fxfuse/artifact.py",
           "    if overflowed:\n", "    if False:\n",
           ("tests/test_artifact.py",), "a fused float16 weight that overflows is returned"),
    Mutant("ill_conditioned_not_measured", "fxfuse/verified.py",
           "            if not noise.ok:  # bisecting", "            if False:  # bisecting",
           ("tests/test_ill_conditioned.py",), "an ill-conditioned model's failed check bisected as a wrong rewrite"),
    Mutant("conditioned_rtol_uncapped", "fxfuse/verified.py",
           "adapted > CONDITIONED_RTOL_CAP", "adapted > 1.0",
           ("tests/test_ill_conditioned.py",), "any sensitivity adapts the check, however blunt it becomes"),
    Mutant("conditioned_rtol_not_for_artifact", "fxfuse/verified.py",
           "rtol = artifact_rtol = adapted", "rtol = adapted",
           ("tests/test_ill_conditioned.py",), "the returned float64 model is held to 1e-9 after the check adapted"),
    Mutant("auto_keeps_the_first", "fxfuse/capture/auto.py",
           "kept = min(pool, key=lambda c: (c.executed or 0, ORDER.index(c.capture)))", "kept = pool[-1]",
           ("tests/test_capture_export.py",), "auto keeps a capture that executes more"),
    Mutant("checker_ignores_rolled_back", "fxfuse/testing.py",
           "if report is not None and not allow_rollback:", "if False:",
           ("tests/test_testing.py", f"{RULES}/test_conv_bn.py"),
           "assert_reparametrizes passes a model whose rewrites were undone"),
)


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst / name)


def _apply(m: Mutant, tree: Path) -> None:
    path = tree / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise LookupError(f"{m.path}: the text to mutate occurs {count} times (expected once): {m.old!r}")
    path.write_text(text.replace(m.old, m.new))


def _env(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _pytest(tree: Path, tests: Sequence[str], timeout: float) -> Tuple[str, str, float]:
    """``(status, detail, seconds)`` of ``pytest -x`` on ``tests`` in ``tree``: status is ``passed``, ``failed``
    (detail: the first failing test), ``error`` (collection / usage error) or ``timeout``."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:logging",
           "-W", "ignore", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "passed", "", seconds
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if proc.returncode == 1 and first:
        return "failed", first.group(1), seconds
    tail = " | ".join(out.strip().splitlines()[-3:])
    return "error", f"pytest exit {proc.returncode}: {first.group(1) if first else tail}", seconds


def _check_isolation(tree: Path) -> None:
    """The copy, not the installed working tree, must be what the tests import."""
    code = "import fxfuse, sys; sys.stdout.write(fxfuse.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True,
                           check=True).stdout
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the mutated copy is not what gets imported: fxfuse comes from {where}")


def run_one(m: Mutant, timeout: float) -> Tuple[str, str, float]:
    with tempfile.TemporaryDirectory(prefix=f"fxfuse-mutant-{m.name}-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        try:
            _apply(m, tree)
        except LookupError as exc:
            return "stale", str(exc), 0.0
        _check_isolation(tree)
        status, detail, seconds = _pytest(tree, m.tests, timeout)
    # A mutant that breaks collection (not a test) is reported, not counted as killed: fix the mutant.
    verdict = {"failed": "killed", "passed": "SURVIVED", "error": "ERROR", "timeout": "TIMEOUT"}[status]
    return verdict, detail, seconds


def baseline(tests: Sequence[str], timeout: float) -> Optional[str]:
    """Run the selected tests on an unmutated copy: they must pass, or no kill means anything."""
    with tempfile.TemporaryDirectory(prefix="fxfuse-mutant-baseline-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        _check_isolation(tree)
        status, detail, seconds = _pytest(tree, tests, timeout)
    print(f"{'baseline':9} {'(no mutant)':44} {status} in {seconds:.0f} s {detail}", flush=True)
    return None if status == "passed" else f"the tests fail without any mutant: {detail}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATH",
                        help="drop this test file from every mutant's list (e.g. tests/test_kernels.py, to see "
                             "whether the rule tests alone kill the fold-math mutants); repeatable")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
    if args.exclude:
        chosen = [replace(m, tests=tuple(t for t in m.tests if t not in args.exclude)) for m in chosen]
        chosen = [m for m in chosen if m.tests]
    if args.list:
        stale = 0
        for m in chosen:
            path = ROOT / m.path
            found = path.read_text().count(m.old) if path.is_file() else 0
            stale += found != 1
            mark = "" if found == 1 else f"  [STALE: the text to mutate occurs {found} times]"
            print(f"{m.name:44} {m.path:34} {m.what}{mark}")
        return 1 if stale else 0
    if not args.no_baseline:
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        problem = baseline(tests, args.timeout * 2)
        if problem:
            print(problem)
            return 2
    bad = 0
    for m in chosen:
        verdict, detail, seconds = run_one(m, args.timeout)
        bad += verdict != "killed"
        by = f"by {detail}" if verdict == "killed" else detail
        print(f"{verdict:9} {m.name:44} {by} ({seconds:.0f} s)", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants killed" + (f"; {bad} not" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
