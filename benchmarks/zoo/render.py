"""docs/zoo.md: the summary, the per-model table, the details of models with BatchNorms left, fallbacks and
refusals, and the pass-speed section."""

from __future__ import annotations

import math
import platform
from typing import Any, Dict, List, Optional, Sequence

import torch
import torchvision

from ..common import cpu_text
from .checks import FLOAT32_RTOL, RTOL, ZooRow, export_failure_kind, fmt_err


def machine(threads: bool = True) -> str:
    """CPU model and core count (and torch threads), torch / torchvision / Python versions."""
    return (f"{cpu_text()}{f', {torch.get_num_threads()} torch threads' if threads else ''}; "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}")


def _short(text: str, limit: int = 140) -> str:
    """First sentence-ish of a long message (fx trace errors run to several lines)."""
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def err_text(r: ZooRow) -> str:
    if not r.float32_reason:
        probe = "" if math.isnan(r.conditioning) or r.status == "refused" else \
            f" (weights × (1 + 1e-15): {fmt_err(r.conditioning)})"
        return fmt_err(r.max_rel_error) + probe
    if not r.submodule_checks:  # captured whole (export): no float64 run of any part is possible
        return f"{fmt_err(r.max_rel_error)} (float32 only)"
    return f"{fmt_err(r.max_rel_error)} (float32); sub-modules in float64: {fmt_err(r.max_rel_error_f64)}"


STATIC_EXPORT = ("exported with static shapes: the returned model accepts only the example input's shapes "
                 "(torch.export has no graph with a dynamic batch for it), where the original accepts any batch size")


def capture_text(r: ZooRow) -> str:
    """The capture column: ``symbolic`` / ``export`` / ``submodules``, ``—`` when the pass returned nothing."""
    return r.capture or "—"


def export_tried(r: ZooRow) -> bool:
    """Whether ``capture="auto"`` also tried ``torch.export`` on this model (its reason says how that went)."""
    return r.capture != "symbolic" or "export" in r.capture_reason


def capture_notes(r: ZooRow) -> List[str]:
    """Why ``r`` got its capture: ``report.capture_reason``, and for a sub-module fallback why ``torch.export``
    failed (from the reason, else the harness's own export probe) and whether that is torch.export's limit."""
    notes = [r.capture_reason or "(no reason recorded)"]
    if r.export_error:
        notes.append(f"`reparametrize(capture=\"export\")`, run again by the harness: {r.export_error}")
    kind = export_failure_kind(r.export_error or r.capture_reason) if r.capture == "submodules" else ""
    if kind:
        notes.append(kind)
    if r.capture == "export" and "static shapes" in r.capture_reason and "no tensor input" not in r.capture_reason:
        notes.append(STATIC_EXPORT)
    return [_short(n, 400) for n in notes]


def _fmt_speed(r: ZooRow) -> str:
    if math.isnan(r.speed_ratio):
        return "—"
    return f"{r.speed_ratio:.2f} ({r.speed_min:.2f}–{r.speed_max:.2f})"


def ratio_text(r: float) -> str:
    return "—" if math.isnan(r) else f"{r:.2f}"


def status_text(row: ZooRow) -> str:
    if row.status == "fallback":
        return f"fallback ({row.detail})"
    if row.status == "refused":
        probe = ""
        if not math.isnan(row.conditioning):
            probe = (f" (ill-conditioned: scaling every weight by 1 + 1e-15 alters the output by "
                     f"{fmt_err(row.conditioning)})" if row.conditioning > RTOL
                     else f" (weight-perturbation probe: {fmt_err(row.conditioning)})")
        return f"refused: {row.detail}{probe}"
    if row.status == "FAIL":
        return "**FAIL**: " + "; ".join(row.failures)
    return row.status


def render(rows: Sequence[ZooRow], header: str, speed_info: Optional[Dict[str, Any]]) -> str:
    lines = [header, ""]
    n_ok = sum(r.status == "ok" for r in rows)
    n_fb = sum(r.status == "fallback" for r in rows)
    n_ref = sum(r.status == "refused" for r in rows)
    n_fail = sum(r.status == "FAIL" for r in rows)
    captures = {c: sum(r.capture == c for r in rows) for c in ("symbolic", "export", "submodules")}
    lines.append(f"**{len(rows)} models: {n_ok} ok (captured whole), {n_fb} fallback (sub-modules rewritten), "
                 f"{n_ref} refused, {n_fail} failed. Capture: {captures['symbolic']} symbolic, "
                 f"{captures['export']} export, {captures['submodules']} submodules.**")
    lines.append("")
    for title, pick in (
            ("Refused (FusionError)", lambda r: r.status == "refused"),
            ("Failed", lambda r: r.status == "FAIL"),
            ("Captured whole by torch.export (symbolic tracing could not, or did less)",
             lambda r: r.capture == "export"),
            ("Fallback (sub-modules rewritten: neither torch.fx nor a torch.export graph that keeps every batch size "
             "captured the whole model)",
             lambda r: r.status == "fallback"),
            ("BatchNorms left after the pass", lambda r: r.batch_norms[1] > 0),
            ("Checked in float32 (cannot run in float64)", lambda r: bool(r.float32_reason))):
        picked = [r for r in rows if pick(r)]
        if picked:
            lines.append(f"- {title}: " + ", ".join(
                f"{r.name}" + (f" ({r.batch_norms[1]} left)" if "BatchNorms" in title else "") for r in picked))
    lines.append("")
    lines.append("Columns: convs / BNs executed on the example input before → after (counted at run time, "
                 "module and functional calls); fused rewrites (by rule); pass time of `reparametrize` on the "
                 "float64 model with `verify=True`; max relative error (float64, max over both batch sizes of "
                 "`max|Δ| / max|ref|` per output); CPU speed ratio original / fused in float32 at batch 1 "
                 "(>1: fused is faster), median (min–max) of paired rounds; capture: the front end "
                 "`reparametrize(capture=\"auto\")` used (`report.capture`: `symbolic` = torch.fx, `export` = "
                 "torch.export ATen graph, `submodules` = per-sub-module fallback; † = see "
                 "[Capture notes](#capture-notes)); status.")
    lines.append("")
    lines.append("| model | kind | input | convs | BNs | rewrites | pass s | max rel err | speed ×"
                 " | capture | status |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r.rewrites_by_rule.items()))
        mark = " †" if r.capture and export_tried(r) else ""
        lines.append(f"| {r.name} | {r.kind} | {r.input} | {r.convs[0]} → {r.convs[1]} | "
                     f"{r.batch_norms[0]} → {r.batch_norms[1]} | {r.rewrites}{f' ({rules})' if rules else ''} | "
                     f"{r.pass_s:.2f} | {err_text(r)} | {_fmt_speed(r)} | {capture_text(r)}{mark} | "
                     f"{status_text(r)} |")
    lines.append("")
    noted = [r for r in rows if r.capture and export_tried(r)]
    if noted:
        lines.append("## Capture notes")
        lines.append("")
        lines.append("Every model not captured by symbolic tracing, and every symbolic one where `capture=\"auto\"` "
                     "also tried `torch.export`: `report.capture_reason` first; then, for sub-module fallbacks, the "
                     "error of `reparametrize(model, x, capture=\"export\")` (innermost exception, and the line "
                     "where it stopped: the model's code, or fxfuse's) and whose limit that is.")
        lines.append("")
        for r in noted:
            notes = capture_notes(r)
            lines.append(f"- **{r.name}** (`{r.capture}`): {notes[0]}")
            lines.extend(f"  - {n}" for n in notes[1:])
        lines.append("")
    remaining = [r for r in rows if r.batch_norms[1] > 0 or r.status in ("refused", "fallback", "FAIL")
                 or r.untraced_bns or r.float32_reason]
    if remaining:
        lines.append("## Models with BatchNorms left, fallbacks and refusals")
        lines.append("")
        for r in remaining:
            lines.append(f"### {r.name}: {status_text(r)}")
            lines.append("")
            if r.capture and r.capture != "symbolic":
                lines.append(f"- capture: `{r.capture}` ({_short(r.capture_reason, 300)})")
            if r.float32_reason and not r.submodule_checks:
                lines.append(f"- runs in float32 only ({r.float32_reason}): captured whole, so the pass rewrote "
                             "and verified it in float32, and the harness compares the whole model in float32 on "
                             f"both batch sizes (relative error {fmt_err(r.max_rel_error)}, limit "
                             f"{FLOAT32_RTOL:g}); no part of it can run in float64.")
            elif r.float32_reason:
                lines.append(f"- runs in float32 only ({r.float32_reason}): the whole model is compared in "
                             f"float32 (relative error {fmt_err(r.max_rel_error)}, limit {FLOAT32_RTOL:g}); each "
                             "rewritten sub-module is reparametrized again in float64 on the inputs it received and "
                             "must equal the float64 original (≤ 1e-9) and, rounded once, be the shipped one "
                             "(same code, bit-identical parameters):")
                for path, c in r.submodule_checks.items():
                    detail = f"; {c.detail}" if c.detail else ""
                    lines.append(f"  - `{path}`: float64 error {fmt_err(c.error)}, shipped = float64 rewrite "
                                 f"rounded: {'yes' if c.same_as_shipped else 'NO'}{detail}")
            if r.batch_norms[1]:
                fed = ", ".join(f"{k}: {v}" for k, v in r.bn_left_inputs.items())
                lines.append(f"- {r.batch_norms[1]} BatchNorm call(s) remain at run time"
                             + (f"; in the rewritten graphs they read from {fed} (no conv/linear producer with a "
                                "single user: cannot fold)" if fed else "") + ".")
            if r.unfused_conv_bn:
                lines.append(f"- conv → BN pairs left in parts the pass did not rewrite: {len(r.unfused_conv_bn)} "
                             f"({', '.join(r.unfused_conv_bn[:3])}{', …' if len(r.unfused_conv_bn) > 3 else ''}).")
            if r.untraced_bns:
                lines.append(f"- BatchNorm modules run from untraced Python code (not in any fx graph): "
                             f"{len(r.untraced_bns)} ({', '.join(r.untraced_bns[:6])}"
                             f"{', …' if len(r.untraced_bns) > 6 else ''}).")
            lines.extend(f"- left unfused: {u}" for u in r.unfused[:8])
            if len(r.unfused) > 8:
                lines.append(f"- … {len(r.unfused) - 8} more unfused candidates")
            for path, why in r.submodules.items():
                lines.append(f"- `{path}`: {_short(why)}")
            lines.append("")
    if speed_info:
        lines.append(render_pass_speed(speed_info))
    return "\n".join(lines) + "\n"


def render_pass_speed(info: Dict[str, Any]) -> str:
    nodes, limit = info["nodes"], 1.2 * info["node_ratio"]
    lines = [
        "## Pass speed on a big graph",
        "",
        f"`reparametrize(model, x, verify=False)`, float32 model, x = 1x3x64x64; median (min–max) of "
        f"{info['repeats']} runs after one warm-up, resnet50 and resnet152 alternating. Command "
        f"`{info['command']}`; {info['machine']}; {info['date']}; load average "
        f"{info['load_before'][0]:.1f} before, {info['load_after'][0]:.1f} after (the machine is shared).",
        "",
        "| torch threads | resnet50 pass s | resnet152 pass s | time ratio 152/50 | node ratio 152/50 "
        "| linear (ratio ≤ 1.2 × node ratio) | resnet152 ≤ 1.0 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, run in info["runs"].items():
        r50, r152 = run["resnet50"], run["resnet152"]
        ratio = r152["median_s"] / r50["median_s"]
        lines.append(
            f"| {n} | {r50['median_s']:.3f} ({r50['min_s']:.3f}–{r50['max_s']:.3f}) | {r152['median_s']:.3f} "
            f"({r152['min_s']:.3f}–{r152['max_s']:.3f}) | {ratio:.2f} | {info['node_ratio']:.2f} "
            f"({nodes['resnet152']}/{nodes['resnet50']}) | {'yes' if ratio <= limit else 'NO'} ({limit:.2f}) | "
            f"{'yes' if r152['median_s'] <= 1.0 else 'NO'} |")
    lines.append("")
    return "\n".join(lines)


def header(command: str, date: str, min_run_time: float, note: str = "", machine_text: Optional[str] = None) -> str:
    """The top of docs/zoo.md: how it was generated and what a row checks (``note``: a sentence about the run, e.g.
    the machine's load, added after the command line; ``machine_text``: the run's :func:`machine`, default this
    one)."""
    return "\n".join([
        "# fxfuse on the torchvision model zoo",
        "",
        f"Generated by `{command.strip()}` on {machine_text or machine()}, {date}."
        f"{f' {note.strip()}' if note.strip() else ''}",
        "",
        "Every model of `torchvision.models.list_models()` is built with `weights=None` (and "
        "`weights_backbone=None`; `quantize=False` for the `quantized_*` entries), its BatchNorm statistics "
        "randomized (`fxfuse.models.randomize_batchnorm_`, seed 0), in eval mode, cast to float64, and passed to "
        "`fxfuse.reparametrize(model, x)` (`verify=True`, `capture=\"auto\"`: torch.fx symbolic tracing; "
        "torch.export when tracing fails or leaves fusable structure; the per-sub-module fallback when neither "
        "captures the whole model; the capture column says which one each model got). Inputs are small (input "
        "column; detection takes a list of `[3, H, W]` images, RAFT a pair of frames); the second check input has "
        "another batch size. "
        "A row passes when the outputs are equal (relative error ≤ 1e-9 of max-abs per output, on both inputs; "
        "for a model whose output moves by η when its weights are scaled by 1 + 2⁻⁵⁰ — the error column's "
        "`weights × (1 + 1e-15)` figure — ≤ 10·η up to 1e-6, the resolution fxfuse itself checks such a model at, "
        "docs/dtypes.md), "
        "`verify=True` accepted the result, no BatchNorm is left whose input is a conv/linear with no other real "
        "user (in every fx graph of the result, and in the largest traceable ancestor of any BatchNorm the pass "
        "left as Python), and the input model's `state_dict` is bit-identical afterwards (SHA-256 per entry). "
        "RAFT cannot run in float64 (torchvision builds its coordinate grid in float32), so it is checked in "
        "float32 (and, where the pass rewrote it per sub-module, each rewritten sub-module in float64; see below). "
        "Speed: float32, batch 1, one torch thread "
        "(robust on this shared 2-core machine), `torch.utils.benchmark.Timer.blocked_autorange(min_run_time="
        f"{min_run_time})`, original and fused alternating over 7 rounds in one process; the column gives "
        "the median (min–max) of the 7 paired ratios original / fused (>1: fused is faster).",
        "",
        "The timm model zoo has its own sweep and page: [zoo-timm.md](zoo-timm.md) (`make zoo-timm`, "
        "`python -m benchmarks.zoo_timm`).",
    ])
