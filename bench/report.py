"""Write a benchmark's results: ``results.json``, ``results.md`` and PNG plots.

The JSON is the record (every cell's metrics, the ratios against their targets, what was
skipped and why, the profile summary, the machine); the markdown and plots are views of it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOT_FILES", "markdown_report", "write_plots", "write_report"]

PLOT_FILES: tuple[str, ...] = (
    "throughput_vs_concurrency.png",
    "latency_cdf.png",
    "batch_size_histogram.png",
)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _stat(metrics: dict[str, Any], key: str, stat: str) -> Any:
    dist = metrics.get(key)
    return dist.get(stat) if dist else None


def _cell_row(cell: dict[str, Any]) -> str:
    m = cell["metrics"]
    columns = [
        cell["id"],
        cell["label"],
        cell["mode"],
        "stream" if cell["stream"] else "unary",
        cell["adapter_mix"],
        str(cell["concurrency"]),
        f"{m['ok']}/{m['requests']}",
        _fmt(m["request_throughput_rps"], 2),
        _fmt(m["output_tokens_per_s"]),
        f"{_fmt(_stat(m, 'ttft_ms', 'p50'))} / {_fmt(_stat(m, 'ttft_ms', 'p99'))}",
        _fmt(_stat(m, "tpot_ms", "p50"), 2),
        f"{_fmt(_stat(m, 'itl_ms', 'p50'), 2)} / {_fmt(_stat(m, 'itl_ms', 'p99'), 2)}",
        " / ".join(_fmt(_stat(m, "e2e_ms", s)) for s in ("p50", "p90", "p99")),
        _fmt(_stat(m, "queue_wait_ms", "p50")),
        _fmt(m["mean_batch_size"]),
        _fmt(m["goodput_rps"], 2),
        f"{_fmt((cell.get('server_steps') or {}).get('mean_step_ms'), 2)} "
        f"/ {_fmt((cell.get('server_steps') or {}).get('mean_rows_per_step'), 1)}",
        _fmt(_stat(m, "queue_wait_steps", "p50"), 1),
        f"{_fmt(m.get('server_cores_busy'), 2)} / {_fmt(m.get('client_cores_busy'), 2)} "
        f"/ {_fmt(m.get('other_cores_busy'), 2)}",
    ]
    return "| " + " | ".join(columns) + " |"


def _verdict(row: dict[str, Any]) -> str:
    if row["value"] is None:
        return "not measured"
    if row.get("informational"):
        return "info: " + ("yes" if row["met"] else "no")
    return "met" if row["met"] else "**missed**"


def _target_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | measured | bound | met | per CPU-second | from |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        value = "–" if row["value"] is None else f"{row['value']:.2f}{row['unit']}"
        per_cpu = row.get("per_cpu_value")
        per_cpu_text = "–" if per_cpu is None else f"{per_cpu:.2f}{row['unit']}"
        lines.append(
            f"| {row['name']}: {row['description']} | {value} "
            f"| {row['op']} {row['target']:g}{row['unit']} | {_verdict(row)} "
            f"| {per_cpu_text} | {row['detail'] or '–'} |"
        )
    return lines


def _scenario_sections(results: dict[str, Any]) -> list[str]:
    """Natural lengths, Poisson arrivals, streams next to beams, cancelled-row reuse."""
    cells = results["cells"]
    records = results.get("scenarios") or {}
    lines: list[str] = []
    natural = records.get("natural")
    if natural:
        lines += [
            "",
            "## Natural lengths",
            "",
            f"{natural['requests']} requests that end at EOS (max_new_tokens "
            f"{natural['max_new_tokens']}), adapter mix incl. LoHa, {natural['clients']} "
            "clients on the batched server vs the same requests one by one in-process; "
            f"{natural['same_token_counts']} of {natural['compared']} requests generated the "
            "same number of tokens in both (greedy).",
            "",
        ]
        for cell in (c for c in cells if c.get("scenario") == "natural"):
            m = cell["metrics"]
            lines.append(
                f"- `{cell['id']}`: {_fmt(m['output_tokens_per_s'])} tok/s, "
                f"{m['output_tokens']} tokens, e2e p50 {_fmt(_stat(m, 'e2e_ms', 'p50'))} ms"
            )
    rated = [c for c in cells if c.get("scenario") == "poisson"]
    if rated:
        objective = results["meta"]["objective"]
        lines += [
            "",
            "## Poisson arrivals (open loop, streaming)",
            "",
            f"Goodput: requests/s with TTFT <= {objective['ttft_ms']:.0f} ms and end-to-end "
            f"<= {objective['e2e_ms']:.0f} ms.",
            "",
            "| rate req/s | ok | req/s done | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
            "| queue p50 ms | goodput req/s | goodput share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for cell in rated:
            m = cell["metrics"]
            lines.append(
                f"| {cell['rate_rps']:g} | {m['ok']}/{m['requests']} "
                f"| {_fmt(m['request_throughput_rps'], 2)} | {_fmt(m['output_tokens_per_s'])} "
                f"| {_fmt(_stat(m, 'ttft_ms', 'p50'))} / {_fmt(_stat(m, 'ttft_ms', 'p99'))} "
                f"| {_fmt(_stat(m, 'itl_ms', 'p50'), 2)} / {_fmt(_stat(m, 'itl_ms', 'p99'), 2)} "
                f"| {_fmt(_stat(m, 'queue_wait_ms', 'p50'))} | {_fmt(m['goodput_rps'], 2)} "
                f"| {_fmt(m['goodput_fraction'], 2)} |"
            )
    beams = [c for c in cells if c.get("scenario") == "beams"]
    if beams:
        lines += [
            "",
            "## Streams next to beam searches",
            "",
            "| cell | ITL p50 / p90 / p99 ms | TTFT p50 / p99 ms | out tok/s (streams) "
            "| beam requests done |",
            "| --- | --- | --- | --- | --- |",
        ]
        for cell in beams:
            m = cell["metrics"]
            background = cell.get("background") or {}
            lines.append(
                f"| `{cell['id']}` | "
                + " / ".join(_fmt(_stat(m, "itl_ms", q), 2) for q in ("p50", "p90", "p99"))
                + f" | {_fmt(_stat(m, 'ttft_ms', 'p50'))} / {_fmt(_stat(m, 'ttft_ms', 'p99'))}"
                f" | {_fmt(m['output_tokens_per_s'])} | {background.get('ok', '–')} |"
            )
    reuse = records.get("cancel-reuse")
    if reuse:
        config = reuse["config"]
        lines += [
            "",
            "## A cancelled row's place",
            "",
            f"A server with room for {config['capacity']} rows, {config['capacity']} streams "
            f"of {config['neighbour_tokens']} tokens running, one more queued; one stream is "
            "cancelled. Steps: tokens a running neighbour received between the cancel and the "
            "queued request's first token.",
            "",
            "| trial | steps | ms | neighbour ITL ms |",
            "| --- | --- | --- | --- |",
        ]
        for trial in reuse["trials"]:
            if not trial["valid"]:
                lines.append(f"| {trial['trial']} | invalid: {trial['reason']} | | |")
                continue
            lines.append(
                f"| {trial['trial']} | {trial['steps']} | {_fmt(trial['ms'])} "
                f"| {_fmt(trial['neighbour_itl_ms'], 2)} |"
            )
        engine = reuse.get("engine")
        if engine:
            counted = ", ".join(
                str(t["steps"]) if t["valid"] else f"invalid ({t['reason']})"
                for t in engine["trials"]
            )
            lines += [
                "",
                "The same trial on the engine in the benchmark process, counted by its step "
                "listener (steps from the one running at `cancel()` to the first that ends "
                f"with the queued request admitted; 1 = the next step): {counted}.",
            ]
    return lines


def markdown_report(results: dict[str, Any]) -> str:
    """The human-readable summary of ``results``."""
    meta = results["meta"]
    lines = [
        "# peftserve benchmark results",
        "",
        f"Run {meta['started_at']} ({meta['mode_name']} mode, {meta['elapsed_s']:.0f} s). "
        f"Model `{meta['model_path']}`, adapters {', '.join(meta['adapters']) or 'none'}; "
        f"every request generates exactly N tokens (min_new_tokens = max_new_tokens), "
        f"N uniform in [{meta['min_output_tokens']}, {meta['max_output_tokens']}], greedy; "
        f"{meta['torch_threads']} torch thread(s) per model process.",
        "",
        f"Machine: {meta['environment'].get('cpu_model', '?')}, "
        f"{meta['environment'].get('nproc', '?')} cores, "
        f"{meta['environment'].get('memory_gib', '?')} GiB; "
        + ", ".join(f"{k} {v}" for k, v in meta["environment"].get("versions", {}).items()),
        "",
        f"Machine load (1/5/15-minute load average): {meta.get('load_average_start')} at the "
        f"start, {meta.get('load_average_end')} at the end; per cell, the cores used by "
        "other processes are in the last column of the cells table.",
        "",
        "## Targets",
        "",
        "Measured: the ratio of output tokens/s (wall clock), which decides met or missed. "
        "Per CPU-second: the same ratio over output tokens per CPU-second of the process that "
        "ran the model, a cross-check on a shared machine where one cell of a pair may get less "
        "CPU than the other.",
        "",
    ]
    targets = results.get("targets", [])
    lines += _target_rows([t for t in targets if not t.get("informational")])
    informational = [t for t in targets if t.get("informational")]
    if informational:
        lines += ["", "Informational (earlier issues' ratios):", ""]
        lines += _target_rows(informational)
    lines += _scenario_sections(results)
    lines += [
        "",
        "## Cells",
        "",
        "Latencies in ms; TTFT, TPOT and ITL exist for streamed requests only. Goodput counts "
        f"requests with end-to-end <= {meta['objective']['e2e_ms']:.0f} ms and (streams) "
        f"TTFT <= {meta['objective']['ttft_ms']:.0f} ms. Cores busy: CPU seconds used during "
        "the cell / its wall time, for the server process and the load generator (which also "
        "runs the in-process baseline), and by every other process on the machine. Step ms / "
        "rows: the server's mean model step over the cell and the mean rows in it (its step "
        "histograms); queue p50 in steps: the queue wait p50 over that step time.",
        "",
        "| cell | system | load | rpc | adapters | clients | ok | req/s | out tok/s "
        "| TTFT p50 / p99 | TPOT p50 | ITL p50 / p99 | e2e p50 / p90 / p99 | queue p50 "
        "| mean batch | goodput req/s | step ms / rows | queue p50 steps "
        "| cores busy server / client / other |",
        "| " + " | ".join(["---"] * 19) + " |",
    ]
    lines += [_cell_row(cell) for cell in results["cells"]]
    histograms = [c for c in results["cells"] if c["metrics"]["batch_size_histogram"]]
    if histograms:
        lines += ["", "## Batch sizes (requests per batch size, from the server's request log)", ""]
        for cell in histograms:
            hist = cell["metrics"]["batch_size_histogram"]
            lines.append(f"- `{cell['id']}`: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
    if results.get("skipped"):
        lines += ["", "## Skipped", ""]
        lines += [f"- ({s['baseline']}) {s['reason']}" for s in results["skipped"]]
    profile = results.get("profile")
    if profile:
        lines += ["", "## Profile of the batched server", ""]
        if profile.get("error"):
            lines.append(f"Profiling failed: {profile['error']}")
        else:
            summary = profile["summary"]
            lines.append(
                f"py-spy, {summary['samples']} samples over cell `{profile['cell']}` "
                "(self time by where the innermost frame lives):"
            )
            lines.append("")
            lines += [
                f"- {entry['name']}: {entry['percent']}%" for entry in summary["self_by_category"]
            ]
            lines += ["", "Files with the most self time:", ""]
            lines += [
                f"- {entry['percent']}% `{entry['name']}`"
                for entry in summary.get("top_self_files", [])
            ]
            worker = summary.get("worker")
            if worker:
                lines += [
                    "",
                    f"Worker thread `{worker['thread']}`: {worker['samples']} samples, "
                    f"{worker['forward_percent']}% inside the model forward (a `torch.nn` "
                    "module or the fast forward on the stack), "
                    f"**{worker['engine_python_percent']}% the engine's own Python around it**; "
                    "that part by file and function:",
                    "",
                ]
                lines += [
                    f"- {entry['percent']}% `{entry['name']}`"
                    for entry in worker["engine_python_by_file"]
                ]
                lines.append("")
                lines += [
                    f"- {entry['percent']}% `{entry['name']}`"
                    for entry in worker["engine_python_by_function"]
                ]
            lines += ["", "Top inclusive functions:", ""]
            lines += [
                f"- {entry['percent']}% `{entry['name']}`" for entry in summary["top_inclusive"]
            ]
    if results.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in results["plots"]]
    return "\n".join(lines) + "\n"


def write_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Throughput vs concurrency, latency CDFs and batch-size histograms, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a server or in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells: Sequence[dict[str, Any]] = results["cells"]
    written: list[str] = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for cell in cells:
        if cell.get("series"):
            series.setdefault(cell["series"], []).append(
                (cell["concurrency"], cell["metrics"]["output_tokens_per_s"])
            )
    for name, points in series.items():
        # Open-loop cells have no client count (0) and no place on a log axis.
        points = sorted(p for p in points if p[0] > 0)
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    for cell in cells:
        if cell["baseline"] == "a":
            ax.axhline(
                cell["metrics"]["output_tokens_per_s"],
                linestyle="--",
                color="gray",
                label=cell["label"],
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_FILES[0], dpi=110)
    plt.close(fig)
    written.append(PLOT_FILES[0])

    top = max((c["concurrency"] for c in cells), default=0)
    fig, (ax_e2e, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    # End to end: every cell at the top concurrency plus the serial baseline, so one panel
    # compares systems under the same load; TTFT: every streamed cell, across concurrencies.
    panels = (
        (
            ax_e2e,
            "e2e_ms_values",
            lambda c: c["concurrency"] == top or c["baseline"] == "a",
            f"End-to-end latency ({top} clients; serial baseline)",
            "end-to-end latency (ms)",
        ),
        (
            ax_ttft,
            "ttft_ms_values",
            lambda c: bool(c.get("ttft_ms_values")),
            "Time to first token (streams)",
            "TTFT (ms)",
        ),
    )
    for ax, key, keep, title, xlabel in panels:
        for cell in cells:
            values = sorted(cell.get(key) or [])
            if not values or not keep(cell):
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=cell["id"])
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_FILES[1], dpi=110)
    plt.close(fig)
    written.append(PLOT_FILES[1])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Only the cells at the top concurrency: that is where batch formation matters, and more
    # lines than that would be unreadable.
    shown = [c for c in cells if c["metrics"]["batch_size_histogram"] and c["concurrency"] == top]
    for i, cell in enumerate(shown):
        hist = {int(k): v for k, v in cell["metrics"]["batch_size_histogram"].items()}
        total = sum(hist.values())
        # Stems, nudged sideways per cell so equal sizes of different cells stay visible.
        xs = [k + (i - (len(shown) - 1) / 2) * 0.25 for k in sorted(hist)]
        ys = [hist[k] / total for k in sorted(hist)]
        color = f"C{i % 10}"
        ax.vlines(xs, 0, ys, colors=color, linewidth=1.5)
        ax.plot(xs, ys, "o", color=color, label=cell["id"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("size of the batch a request ran in (server request log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Batch sizes at {top} clients")
    ax.grid(True, alpha=0.3)
    if shown:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_FILES[2], dpi=110)
    plt.close(fig)
    written.append(PLOT_FILES[2])
    return written


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write plots, ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = write_plots(results, out_dir)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown_report(results))
    return {"json": json_path, "markdown": md_path, **{p: out_dir / p for p in results["plots"]}}
