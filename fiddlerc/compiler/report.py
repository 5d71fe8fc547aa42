"""Why each expert sits where it sits: a text table for terminals, JSON for tools, and one
self-contained HTML page (heatmap, memory bar, time split, every decision) for people."""

from __future__ import annotations

import json

from fiddlerc.plan import CPU, Plan
from fiddlerc.plan_file import plan_to_dict
from fiddlerc.quant_format import bits_per_weight, stored_bytes
from fiddlerc.units import format_size, parse_dtype


def report_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=1) + "\n"


def report_text(plan: Plan) -> str:
    m, t, mem = plan.model, plan.target, plan.memory
    assert mem is not None
    gpu_experts = mem.expert_bytes.get(t.device, 0)
    gpus = " + ".join(t.gpus())
    if t.cpu_only:
        return _cpu_only_text(plan)
    placed_by = f"measured popularity {t.popularity}" if t.popularity else "uniform routing (no --popularity)"
    lines = [
        f"fiddlerc plan for {m.architecture} ({m.model_type}, {m.dtype}, {m.num_layers} layers)",
        f"target {t.device}: budget {format_size(t.budget_bytes)}; placed by {placed_by}",
        *([f"  budget: {t.budget_note}"] if t.budget_note else []),
        f"  dense weights     {format_size(mem.dense_bytes):>12}  (embeddings, attention, norms, routers, shared experts, lm_head)",
        f"  KV-cache reserve  {format_size(mem.kv_reserve_bytes):>12}  ({t.context_tokens} tokens x {t.batch_size} sequence(s))",
        f"  experts on {t.device:<7}{format_size(gpu_experts):>12}",
        f"  free              {format_size(mem.free_bytes):>12}",
        *(
            f"target {dev}: budget {format_size(budget)}, experts {format_size(mem.expert_bytes.get(dev, 0))}"
            for dev, budget in t.more_gpus.items()
        ),
        f"experts on cpu      {format_size(mem.expert_bytes.get(CPU, 0)):>12}" + _cpu_format(plan),
        *_host_lines(plan),
        *_dense_format(plan),
        "",
        f"{'layer':>5}  {'experts':>7}  {'top-k':>5}  {'per expert':>12}  {'shared':>12}  {'on GPU' if t.more_gpus else 'on ' + t.device:>10}  {'on cpu':>6}  {'expected hit rate':>17}  routing",
    ]
    total_use = fast_use = 0.0
    for ml in plan.moe_layers:
        mine = [e for e in plan.experts if e.layer == ml.layer]
        fast = [e for e in mine if e.device != CPU]
        use = sum(e.expected_use for e in mine)
        hit = sum(e.expected_use for e in fast) / use if use else 0.0
        total_use += use
        fast_use += sum(e.expected_use for e in fast)
        lines.append(
            f"{ml.layer:>5}  {ml.num_experts:>7}  {ml.top_k:>5}  {format_size(ml.bytes_per_expert):>12}  "
            f"{format_size(ml.shared_expert_bytes) if ml.shared_expert_bytes else '-':>12}  "
            f"{len(fast):>10}  {len(mine) - len(fast):>6}  {hit:>16.1%}   {ml.routing}"
        )
    n_fast = sum(1 for e in plan.experts if e.device != CPU)
    lines += [
        "",
        f"{n_fast} of {len(plan.experts)} experts on {gpus}; expected share of routed tokens served there: "
        f"{(fast_use / total_use if total_use else 0):.1%}",
        "per-expert decisions and reasons: fiddlerc report OUT --format json",
        *_attention_lines(plan),
    ]
    if t.micro_batches > 1:
        lines.append(
            f"schedule: a batch of {t.batch_size} runs as {t.micro_batches} micro-batches whose CPU experts overlap "
            f"each other's fast-device work ({len(t.schedule)} steps: {' '.join(t.schedule[:6])} ...)"
        )
    return "\n".join([*lines, *_prediction_lines(plan)]) + "\n"


def _prediction_lines(plan: Plan) -> list[str]:
    pr, t = plan.prediction, plan.target
    if pr is None:
        return []
    lines = [
        f"predicted decode on {t.hardware} (batch 1, position {pr.position}): {1000 / pr.decode_ms_per_token:.2f} tokens/s "
        f"({pr.decode_ms_per_token:.1f} ms/token: dense {pr.dense_ms:.1f} ms, experts busy "
        f"{pr.fast_expert_ms:.1f} ms fast tier / {pr.cpu_expert_ms:.1f} ms CPU)"
    ]
    split = time_split(plan)
    if split is not None:
        lines.append(
            f"simulated: {pr.simulated_ms_per_token:.1f} ms/token; GPU busy {split['GPU']:.1f} ms, CPU busy "
            f"{split['CPU']:.1f} ms, transfers {split['transfers']:.2f} ms, fast device idle {split['idle']:.1f} ms"
        )
    return lines


def _cpu_format(plan: Plan) -> str:
    """What the CPU tier runs in, where it is not the compute dtype."""
    fmt, mem = plan.target.expert_dtype, plan.memory
    if fmt is None:
        return ""
    stored = stored_bytes(mem.expert_bytes.get(CPU, 0), parse_dtype(plan.model.dtype).itemsize, fmt)
    return (
        f" in {plan.model.dtype}; stored and run as {fmt} ({bits_per_weight(fmt)} bits per weight): "
        f"{format_size(stored)} in quantized.safetensors; GPU-tier experts run in {plan.model.dtype}"
    )


def _cpu_only_text(plan: Plan) -> str:
    """The report of a plan with no GPU tier: what host memory holds, and how its layers run."""
    m, t, mem = plan.model, plan.target, plan.memory
    experts = mem.expert_bytes.get(CPU, 0)
    lines = [
        f"fiddlerc plan for {m.architecture} ({m.model_type}, {m.dtype}, {m.num_layers} layers)",
        "target: CPU only, no GPU tier" + (f" ({t.budget_note})" if t.budget_note else " (--gpu-memory 0)"),
        "  every weight and the KV cache in host memory; a CPU load runs each token's experts beside each other",
        f"  dense weights     {format_size(mem.dense_bytes):>12}  (embeddings, attention, norms, routers, shared experts, lm_head)",
        f"  KV-cache reserve  {format_size(mem.kv_reserve_bytes):>12}  ({t.context_tokens} tokens x {t.batch_size} sequence(s))",
        f"  experts           {format_size(experts):>12}" + _cpu_format(plan),
        *_host_lines(plan),
        *_dense_format(plan),
        "",
        f"{'layer':>5}  {'experts':>7}  {'top-k':>5}  {'per expert':>12}  {'shared':>12}  routing",
        *(
            f"{ml.layer:>5}  {ml.num_experts:>7}  {ml.top_k:>5}  {format_size(ml.bytes_per_expert):>12}  "
            f"{format_size(ml.shared_expert_bytes) if ml.shared_expert_bytes else '-':>12}  {ml.routing}"
            for ml in plan.moe_layers
        ),
        "",
        *_attention_lines(plan),
    ]
    return "\n".join([*lines, *_prediction_lines(plan)]) + "\n"


def _dense_format(plan: Plan) -> list[str]:
    fmt = plan.target.dense_dtype
    if fmt is None:
        return []
    return [
        f"dense projections   also stored as {fmt} ({bits_per_weight(fmt)} bits per weight; attention, shared experts, "
        f"lm_head): run so on a CPU-only load, in {plan.model.dtype} on a GPU; embeddings, norms, routers in {plan.model.dtype}"
    ]


def _attention_paths(plan: Plan) -> list[tuple[str, str, list[int]]]:
    """(path, reason, layers) groups of the plan's attention layers, in layer order of first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for a in sorted(plan.attention, key=lambda a: a.layer):
        groups.setdefault((a.path, a.reason), []).append(a.layer)
    return [(path, reason, layers) for (path, reason), layers in groups.items()]


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _attention_lines(plan: Plan) -> list[str]:
    label = {"generated": "generated code", "hf": "Hugging Face module"}
    return [
        *(
            f"attention, layers {layer_ranges(layers)}: {label[path]} ({reason})"
            for path, reason, layers in _attention_paths(plan)
        ),
        "kernels under each layer's decode step are chosen at load, for that machine (C calls on a CPU load): "
        "`fiddlerc -v run` logs them, CompiledModel.decode_paths() returns them",
    ]


def _host_lines(plan: Plan) -> list[str]:
    mem = plan.memory
    if mem.host_bytes is None or mem.host_budget_bytes is None:
        return []
    source = (
        "--cpu-memory" if mem.host_budget_given else f"the {plan.target.hardware} profile's; set it with --cpu-memory"
    )
    line = f"host memory         {format_size(mem.host_bytes):>12}  of {format_size(mem.host_budget_bytes)} ({source})"
    if mem.paged_fraction > 0:
        return [line, f"  PAGES FROM DISK: {mem.paged_fraction:.0%} of the host-resident weight reads miss memory "
                f"(predictions include it); raise --cpu-memory or --gpu-memory"]  # fmt: skip
    return [line]


# ---------------------------------------------------------------------------------------------
# Time split and HTML


def time_split(plan: Plan) -> dict[str, float] | None:
    """Predicted ms per decode token: the fast device busy, the CPU worker busy, copies, and the fast
    device idle (waiting for the CPU); None without a simulated prediction."""
    pr = plan.prediction
    if pr is None or not pr.busy_ms or not pr.simulated_ms_per_token:
        return None
    busy = pr.busy_ms
    total = pr.simulated_ms_per_token
    if plan.target.hardware and busy.get("gpu", 0.0) == 0.0:  # CPU-only: one resource does everything
        return {"GPU": 0.0, "CPU": busy.get("cpu", 0.0), "transfers": 0.0, "idle": max(0.0, total - busy["cpu"])}
    gpu = busy.get("gpu", 0.0)
    return {
        "GPU": gpu,
        "CPU": busy.get("cpu", 0.0),
        "transfers": busy.get("h2d", 0.0) + busy.get("d2h", 0.0),
        "idle": max(0.0, total - gpu),
    }


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0}.legend span{display:inline-block;margin-right:16px}.sw{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin-right:5px;border:1px solid #999}
table{border-collapse:collapse;width:100%;font-size:12px}th,td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f6f6f6;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}.warn{color:#b00020;font-weight:600}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""
_MEMORY_COLOURS = {"dense": "#6b6ecf", "kv": "#9c9ede", "fast": "#e6550d", "free": "#eeeeee", "cpu": "#3182bd"}
_TIME_COLOURS = {"GPU": "#e6550d", "CPU": "#3182bd", "transfers": "#31a354", "idle": "#d9d9d9"}


def _esc(value) -> str:
    import html

    return html.escape(str(value), quote=True)


def _blue(fraction: float) -> str:
    """Sequential colour: white (0), mid blue (0.5), dark blue (1), as ColorBrewer's Blues."""
    f = min(1.0, max(0.0, fraction))
    lo, hi = ((247, 251, 255), (66, 146, 198)) if f <= 0.5 else ((66, 146, 198), (8, 48, 107))
    f = f * 2 if f <= 0.5 else f * 2 - 1
    return "#" + "".join(f"{round(a + (b - a) * f):02x}" for a, b in zip(lo, hi, strict=True))


def _stacked_bar(parts: list[tuple[str, int | float, str]], width: int = 1000, height: int = 26) -> str:
    """One horizontal bar split into labelled parts (label, amount, colour)."""
    total = sum(max(0, a) for _, a, _ in parts) or 1
    x, rects = 0.0, []
    for label, amount, colour in parts:
        w = width * max(0, amount) / total
        rects.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{colour}"><title>{_esc(label)}</title></rect>'
        )
        x += w
    return (
        f'<svg width="100%" height="{height}" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img">'
        f"{''.join(rects)}</svg>"
    )


def _legend(items: list[tuple[str, str]]) -> str:
    return (
        '<p class="legend">'
        + "".join(f'<span><i class="sw" style="background:{c}"></i>{_esc(t)}</span>' for t, c in items)
        + "</p>"
    )


def _heatmap(plan: Plan) -> str:
    """Layer x expert grid: colour = expected use against uniform routing (white 0, mid-blue uniform,
    dark 2x uniform or more), red outline = fast tier."""
    rows = plan.moe_layers
    n = max(ml.num_experts for ml in rows)
    cell = max(3, min(26, 960 // n))
    left, top = 56, 18
    width, height = left + n * cell + 8, top + len(rows) * cell + 4
    uniform = {ml.layer: ml.top_k / ml.num_experts for ml in rows}
    by_layer: dict[int, list] = {ml.layer: [] for ml in rows}
    for e in plan.experts:
        by_layer[e.layer].append(e)
    out = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="expert heatmap">'
    ]
    step = max(1, n // 16)
    for e in range(0, n, step):
        out.append(f'<text x="{left + e * cell + cell / 2:.1f}" y="12" text-anchor="middle">{e}</text>')
    label_every = max(1, len(rows) // 40)
    for r, ml in enumerate(rows):
        y = top + r * cell
        if r % label_every == 0:
            out.append(f'<text x="{left - 6}" y="{y + cell * 0.75:.1f}" text-anchor="end">{ml.layer}</text>')
        for e in sorted(by_layer[ml.layer], key=lambda e: e.expert):
            fast = e.device != CPU
            stroke = 'stroke="#d62728" stroke-width="2"' if fast else 'stroke="#bbbbbb" stroke-width="0.5"'
            inset = 1 if fast else 0
            out.append(
                f'<rect x="{left + e.expert * cell + inset}" y="{y + inset}" width="{cell - 2 * inset}" height="{cell - 2 * inset}" '
                f'fill="{_blue(e.expected_use / (2 * uniform[e.layer]))}" {stroke}><title>layer {e.layer} expert {e.expert}: {_esc(e.device)}, '
                f"expected use {e.expected_use:.3f}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def _html_memory(plan: Plan) -> list[str]:
    """Each GPU's budget as a bar (dense, KV reserve, experts, headroom); the CPU tier and host memory."""
    t, mem = plan.target, plan.memory
    fast_bytes = mem.expert_bytes.get(t.device, 0)
    parts = [
        "<h2>Memory</h2>",
        _stacked_bar(
            [
                (f"dense weights {format_size(mem.dense_bytes)}", mem.dense_bytes, _MEMORY_COLOURS["dense"]),
                (f"KV-cache reserve {format_size(mem.kv_reserve_bytes)}", mem.kv_reserve_bytes, _MEMORY_COLOURS["kv"]),
                (f"experts {format_size(fast_bytes)}", fast_bytes, _MEMORY_COLOURS["fast"]),
                (f"free {format_size(mem.free_bytes)}", mem.free_bytes, _MEMORY_COLOURS["free"]),
            ]
        ),
        _legend(
            [
                (f"dense weights {format_size(mem.dense_bytes)}", _MEMORY_COLOURS["dense"]),
                (f"KV-cache reserve {format_size(mem.kv_reserve_bytes)}", _MEMORY_COLOURS["kv"]),
                (f"experts on {t.device} {format_size(fast_bytes)}", _MEMORY_COLOURS["fast"]),
                (f"headroom {format_size(mem.free_bytes)}", _MEMORY_COLOURS["free"]),
            ]
        ),
    ]
    for dev, budget in t.more_gpus.items():
        used = mem.expert_bytes.get(dev, 0)
        parts.append(
            f"<p>{_esc(dev)}: {_esc(format_size(used))} of experts in a budget of {_esc(format_size(budget))}.</p>"
            + _stacked_bar(
                [
                    (f"experts {format_size(used)}", used, _MEMORY_COLOURS["fast"]),
                    ("free", budget - used, _MEMORY_COLOURS["free"]),
                ]
            )
        )
    parts.append(
        f"<p>Experts on the CPU: {_esc(format_size(mem.expert_bytes.get(CPU, 0)))} (host memory, memory-mapped).</p>"
    )
    if mem.host_bytes is not None and mem.host_budget_bytes is not None:
        warn = (
            f' <span class="warn">Pages from disk: {mem.paged_fraction:.0%} of host-resident weight reads.</span>'
            if mem.paged_fraction
            else ""
        )
        parts.append(
            f"<p>Host memory: {_esc(format_size(mem.host_bytes))} needed of {_esc(format_size(mem.host_budget_bytes))}.{warn}</p>"
        )
    return parts


def _html_time(plan: Plan) -> list[str]:
    """The predicted token: one bar per resource, busy then idle; or how to get a prediction."""
    parts = ["<h2>Predicted time per token</h2>"]
    split = time_split(plan)
    pr = plan.prediction
    if pr is None or split is None:
        return [*parts, "<p>No prediction: compile with <code>--hardware NAME</code> to price the plan.</p>"]
    total = pr.simulated_ms_per_token
    parts.append(
        f"<p>Decode, batch 1, position {pr.position}, on {_esc(plan.target.hardware)}: {total:.2f} ms per token "
        f"simulated ({1000 / total:.2f} tokens/s; closed form {pr.decode_ms_per_token:.2f} ms). Each bar is one "
        "resource over one token: busy, then idle.</p>"
    )
    for name in ("GPU", "CPU", "transfers"):
        busy = split[name]
        parts.append(f"<div>{name}: {busy:.2f} ms busy</div>")
        parts.append(
            _stacked_bar(
                [
                    (f"{name} busy {busy:.2f} ms", busy, _TIME_COLOURS[name]),
                    ("idle", max(0.0, total - busy), _TIME_COLOURS["idle"]),
                ],
                height=16,
            )
        )
    parts.append(f"<p>The fast device waits {split['idle']:.2f} ms per token (idle).</p>")
    return parts


def _html_decisions(plan: Plan) -> list[str]:
    """The per-expert table: device, size, expected use, fetch threshold and the reason."""
    parts = [
        "<h2>Decisions</h2>",
        "<table><thead><tr><th>layer</th><th>expert</th><th>device</th><th>size</th><th>expected use</th>"
        "<th>fetch from</th><th>reason</th></tr></thead><tbody>",
    ]
    for e in plan.experts:
        fetch = "-" if e.fetch_min_tokens is None else f"{e.fetch_min_tokens} tokens"
        parts.append(
            f'<tr><td class="n">{e.layer}</td><td class="n">{e.expert}</td><td>{_esc(e.device)}</td>'
            f'<td class="n">{_esc(format_size(e.bytes))}</td><td class="n">{e.expected_use:.4f}</td>'
            f"<td>{_esc(fetch)}</td><td>{_esc(e.reason)}</td></tr>"
        )
    return [*parts, "</tbody></table>"]


def report_html(plan: Plan) -> str:
    """One self-contained page (inline CSS and SVG, no scripts, no network): heatmap, memory, time, decisions."""
    m, t = plan.model, plan.target
    assert plan.memory is not None
    n_fast = sum(1 for e in plan.experts if e.device != CPU)
    source = f"measured popularity {_esc(t.popularity)}" if t.popularity else "uniform routing (no --popularity)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fiddlerc report: {_esc(m.architecture)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>fiddlerc plan for {_esc(m.architecture)}</h1>",
        f'<p class="sub">{_esc(m.model_type)}, {_esc(m.dtype)}, {m.num_layers} layers, {len(plan.moe_layers)} MoE layers; '
        f"target {_esc(t.device)} with {_esc(format_size(t.budget_bytes))}; KV reserve for {t.context_tokens} tokens x "
        f"{t.batch_size}; placed by {source}; hardware profile {_esc(t.hardware or 'none')}</p>",
        f"<p>{n_fast} of {len(plan.experts)} experts on {_esc(' + '.join(t.gpus()))}.</p>",
        *_html_memory(plan),
        *_html_time(plan),
        "<h2>Experts</h2>",
        f"<p>Rows are MoE layers, columns experts; red outline: on {_esc(' or '.join(t.gpus()))}. Colour: expected share "
        "of the layer's routed tokens against uniform routing.</p>",
        _legend(
            [
                ("never", _blue(0.0)),
                ("half of uniform", _blue(0.25)),
                ("uniform", _blue(0.5)),
                ("1.5x", _blue(0.75)),
                ("2x uniform or more", _blue(1.0)),
            ]
        ),  # fmt: skip
        _heatmap(plan),
        "<h2>Attention</h2>",
        "<ul>",
        *(f"<li>{_esc(line)}</li>" for line in _attention_lines(plan)),
        "</ul>",
        *_html_decisions(plan),
        f'<p class="sub">fiddlerc {_esc(plan.fiddlerc_version)}</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
