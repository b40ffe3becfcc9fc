"""The fused model as an object: picklable, deep-copyable, ``state_dict`` round-trips, a second pass changes
nothing, and the input model is never touched unless ``inplace=True``.

``fxfuse_report`` survives ``pickle``, ``torch.save``/``torch.load`` and ``copy.deepcopy`` (fxfuse registers it
in ``GraphModule.meta["_user_preserved_attributes"]``, the attribute list ``GraphModule.__deepcopy__`` keeps).
Known limit: torch's GraphModule unpickling rebuilds ``meta``, so a *deep copy of an unpickled* module loses the
report (the unpickled module itself has it).

Models: reference RepVGG (``repvgg-tiny``, 32x32) and torchvision resnet18 (64x64), random BN statistics,
outputs compared in float64 (rel. error ≤ 1e-9 of max|y|) or bit for bit where nothing should change.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import Counter
from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse import GraphStats
from fxfuse.testing import assert_close_f64
from fxfuse.verify import compare

from _helpers import EXPECTED, make


def structure(m: nn.Module) -> Tuple[int, int, int]:
    s = GraphStats.of(m)
    return s.convs, s.batch_norms, s.adds


def module_types(m: nn.Module) -> Counter:
    return Counter(type(sub).__name__ for _, sub in m.named_modules() if sub is not m)


def snapshot(m: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}


def same_state(m: nn.Module, snap: Dict[str, Tensor], ordered: bool = True) -> bool:
    """Same names (in the same order if ``ordered``), dtypes, strides and values."""
    sd = m.state_dict()
    same_names = list(sd) == list(snap) if ordered else sorted(sd) == sorted(snap)
    return same_names and all(
        v.dtype == snap[k].dtype and v.stride() == snap[k].stride() and torch.equal(v, snap[k]) for k, v in sd.items())


@pytest.fixture(scope="module")
def repvgg_fused() -> Tuple[nn.Module, nn.Module, Tensor]:
    model, x = make()
    fused = fxfuse.reparametrize(model, x)
    assert structure(fused) == EXPECTED["repvgg-tiny"] and not fused.fxfuse_report.rolled_back
    with torch.no_grad():
        assert_close_f64(model(x), fused(x), rtol=1e-9)
    return model, fused, x


def check_copy(fused: nn.Module, other: nn.Module, x: Tensor) -> None:
    """``other`` is an independent, equal copy of ``fused`` with the same report."""
    assert structure(other) == structure(fused)
    assert not other.training
    with torch.no_grad():
        assert torch.equal(other(x), fused(x))
    mine = dict(fused.named_parameters())
    assert all(p.data_ptr() != mine[n].data_ptr() for n, p in other.named_parameters())
    report, copied = fused.fxfuse_report, other.fxfuse_report
    assert copied.summary() == report.summary() and copied.fused == report.fused
    assert copied.total_fused == EXPECTED_FUSIONS


EXPECTED_FUSIONS = 24  # repvgg-tiny: 16 conv_bn + 8 branch_sum


def test_pickle_round_trip(repvgg_fused) -> None:
    _, fused, x = repvgg_fused
    check_copy(fused, pickle.loads(pickle.dumps(fused)), x)


def test_torch_save_whole_module(repvgg_fused) -> None:
    _, fused, x = repvgg_fused
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    check_copy(fused, torch.load(buf, weights_only=False), x)


def test_deepcopy_keeps_the_report(repvgg_fused) -> None:
    _, fused, x = repvgg_fused
    other = copy.deepcopy(fused)
    check_copy(fused, other, x)
    assert other.fxfuse_report is not fused.fxfuse_report
    check_copy(fused, copy.deepcopy(other), x)  # and again


def test_state_dict_round_trip_into_a_second_fused_instance(repvgg_fused) -> None:
    model, fused, x = repvgg_fused
    other_model, _ = make(seed=5)  # same architecture, different weights and BN statistics
    other = fxfuse.reparametrize(other_model, x)
    with torch.no_grad():
        assert not compare(fused(x), other(x), rtol=1e-3).ok  # a different model before loading
    sd = fused.state_dict()
    assert list(other.state_dict()) == list(sd)
    assert not other.load_state_dict(sd, strict=True).missing_keys
    with torch.no_grad():
        assert torch.equal(other(x), fused(x))
        assert_close_f64(model(x), other(x), rtol=1e-9)


@pytest.mark.parametrize("name", ["repvgg-tiny", "resnet18"])
def test_second_pass_changes_nothing(name: str) -> None:
    model, x = make(name)
    fused = fxfuse.reparametrize(model, x)
    snap = snapshot(fused)
    again = fxfuse.reparametrize(fused, x)
    assert again.fxfuse_report.total_fused == 0 and not again.fxfuse_report.rolled_back
    assert fused.fxfuse_report.total_fused > 0  # the first result's report is its own
    assert structure(again) == structure(fused) == EXPECTED[name]
    assert module_types(again) == module_types(fused)
    # (the re-traced module registers its sub-modules in graph order, so only the key order may differ)
    assert same_state(again, snap, ordered=False) and same_state(fused, snap)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))
        assert_close_f64(model(x), again(x), rtol=1e-9)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_input_model_is_never_changed(training: bool) -> None:
    model, x = make()
    model.train(training)
    model.stage1.requires_grad_(False)
    grads = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    snap = snapshot(model)
    if training:
        with pytest.warns(UserWarning, match="training mode"):
            fused = fxfuse.reparametrize(model, x)
    else:
        fused = fxfuse.reparametrize(model, x)
    assert same_state(model, snap)  # bit-identical, same dtypes and strides, BN statistics included
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert structure(fused) == EXPECTED["repvgg-tiny"] and not fused.fxfuse_report.rolled_back
    assert not any(p is q for p in fused.parameters() for q in model.parameters())
    with torch.no_grad():
        assert_close_f64(copy.deepcopy(model).eval()(x), fused(x), rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_inplace_result_is_correct(dtype: torch.dtype) -> None:
    """``inplace=True`` may change (and reuse) the input model; the result must still be right: equal to the
    out-of-place result, in the model's dtype. (The input model is left as scratch: modules fused away may be
    in float64.)"""
    model, x = make()
    model, x = model.to(dtype), x.to(dtype)
    reference = copy.deepcopy(model)
    out_of_place = fxfuse.reparametrize(reference, x)
    fused = fxfuse.reparametrize(model, x, inplace=True)
    assert structure(fused) == EXPECTED["repvgg-tiny"]
    assert {p.dtype for p in fused.parameters()} == {dtype}
    want = out_of_place.state_dict()
    assert list(fused.state_dict()) == list(want)
    assert all(torch.equal(v, want[k]) for k, v in fused.state_dict().items())
    with torch.no_grad():
        y = fused(x)
        assert y.dtype == dtype
        assert torch.equal(y, out_of_place(x))
        if dtype == torch.float64:
            assert_close_f64(reference(x), y, rtol=1e-9)
