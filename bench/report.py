"""Ratios to the ceilings, the markdown table, the JSON file and the PNG plots.

Also a small command line to re-render saved results side by side without measuring again:

    python -m bench.report bench/results/A.json --compare bench/results/B-triton.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

SIZE_ORDER = ["4B", "1MiB", "16MiB", "64MiB"]


def save_dated(out: Path | None, name: str, results: dict[str, Any], text: str) -> None:
    """Write ``results`` as JSON and ``text`` as markdown to ``out/<today>-<name>.*`` (a
    side bench's ``--out``); nothing when ``out`` is None."""
    if out is None:
        return
    import time
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y-%m-%d')}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")


# --- ratios ----------------------------------------------------------------------------------
def _ok(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _div(a: Any, b: Any) -> float | None:
    return a / b if _ok(a) and _ok(b) else None


def _echo(document: dict[str, Any], key: str) -> dict[str, Any] | None:
    point = document["ceilings"].get("echo", {}).get(key)
    if point and point.get("status") == "ok":
        return point["result"]
    return None


def _by_id(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in document["scenarios"]}


def attach_ratios(document: dict[str, Any]) -> None:
    """Store next to each figure its ratio to the ceilings measured in the same run."""
    scenarios = _by_id(document)
    memcpy = document["ceilings"].get("memcpy", {})
    gpu = document["ceilings"].get("gpu_copy", {})
    for entry in document["scenarios"]:
        result = entry.get("result")
        if entry["status"] != "ok" or not result:
            continue
        vs: dict[str, Any] = {}
        group, transport = entry["group"], entry.get("transport")
        if group in ("simple", "batching"):
            echo = _echo(document, f"simple/c{entry['concurrency']}")
            if echo:
                vs["echo_infer_per_s"] = echo["infer_per_s"]
                vs["echo_p50_ms"] = echo["p50_ms"]
                vs["infer_per_s_vs_echo"] = _div(result["infer_per_s"], echo["infer_per_s"])
                vs["p50_vs_echo"] = _div(result["p50_ms"], echo["p50_ms"])
        if group == "batching" and entry.get("batching") == "on":
            off = scenarios.get(f"batching/off/c{entry['concurrency']}")
            if off and off["status"] == "ok":
                vs["on_vs_off"] = _div(result["infer_per_s"], off["result"]["infer_per_s"])
        if group == "identity":
            size = entry["size"]
            copy = memcpy.get(size, {})
            vs["memcpy_ms"] = copy.get("p50_ms")
            vs["p50_vs_memcpy"] = _div(result["p50_ms"], copy.get("p50_ms"))
            key = "identity/shm" if transport in ("system_shm", "cuda_shm", "cuda_shm_gpu") else \
                f"identity/payload/{size}"
            echo = _echo(document, key)
            if echo:
                vs["echo_p50_ms"] = echo["p50_ms"]
                vs["p50_vs_echo"] = _div(result["p50_ms"], echo["p50_ms"])
                if transport == "system_shm" and _ok(copy.get("p50_ms")):
                    floor = echo["p50_ms"] + copy["p50_ms"]
                    vs["floor_ms"] = floor
                    vs["p50_vs_floor"] = _div(result["p50_ms"], floor)
            if transport in ("cuda_shm", "cuda_shm_gpu"):
                device = gpu.get(size, {})
                vs["gpu_copy_ms"] = device.get("p50_ms")
                vs["p50_vs_gpu_copy"] = _div(result["p50_ms"], device.get("p50_ms"))
        if group == "scaling":
            # 2 ms of CPU per request: one busy core does at most 500/s; instances beyond the
            # host's cores cannot add more (and the frontend and client need CPU too).
            cores = document["meta"].get("cpus") or 1
            burn_ms = entry.get("burn_ms", 2.0)
            ideal = min(entry.get("instances", 1), cores) * 1000.0 / burn_ms
            vs["ideal_infer_per_s"] = ideal
            vs["vs_ideal"] = _div(result["infer_per_s"], ideal)
            base = scenarios.get("scaling/instances1")
            if base and base["status"] == "ok":
                vs["speedup_vs_1"] = _div(result["infer_per_s"], base["result"]["infer_per_s"])
        entry["vs"] = vs


# --- formatting ------------------------------------------------------------------------------
def _num(value: Any, digits: int = 0) -> str:
    if not _ok(value) and value != 0:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ms(value: Any) -> str:
    if not _ok(value):
        return "-"
    if value < 1:
        return f"{value:.3g}"
    if value < 100:
        return f"{value:.2f}"
    return f"{value:.0f}"


def _x(value: Any) -> str:
    if not _ok(value):
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.2f}x"


def _ceiling_text(entry: dict[str, Any]) -> tuple[str, str]:
    vs = entry.get("vs") or {}
    group, transport = entry["group"], entry.get("transport")
    if group in ("simple", "batching"):
        ceiling = (f"echo {_num(vs.get('echo_infer_per_s'))}/s, p50 {_ms(vs.get('echo_p50_ms'))}"
                   if vs.get("echo_infer_per_s") else "-")
        ratio = (f"{_x(vs.get('infer_per_s_vs_echo'))} echo infer/s, "
                 f"p50 {_x(vs.get('p50_vs_echo'))}")
        if "on_vs_off" in vs:
            ratio += f"; on/off {_x(vs['on_vs_off'])}"
        batch = ((entry.get("result") or {}).get("server_stats") or {}).get("avg_batch")
        if group == "batching" and batch:
            ratio += f"; avg batch {batch:.1f}"
        return ceiling, ratio
    if group == "identity":
        parts = [f"memcpy {_ms(vs.get('memcpy_ms'))}"]
        ratios = [f"{_x(vs.get('p50_vs_memcpy'))} memcpy"]
        if vs.get("echo_p50_ms"):
            parts.append(f"echo {_ms(vs.get('echo_p50_ms'))}")
            ratios.append(f"{_x(vs.get('p50_vs_echo'))} echo")
        if vs.get("floor_ms"):
            ratios.append(f"{_x(vs.get('p50_vs_floor'))} echo+memcpy")
        if transport in ("cuda_shm", "cuda_shm_gpu") and vs.get("gpu_copy_ms"):
            parts.append(f"GPU copy {_ms(vs.get('gpu_copy_ms'))}")
            ratios.append(f"{_x(vs.get('p50_vs_gpu_copy'))} GPU copy")
        return ", ".join(parts), ", ".join(ratios)
    if group == "scaling":
        return (f"ideal {_num(vs.get('ideal_infer_per_s'))}/s",
                f"{_x(vs.get('vs_ideal'))} ideal, {_x(vs.get('speedup_vs_1'))} vs 1 instance")
    return "-", "-"


def _compare_cell(entry: dict[str, Any], other: dict[str, Any] | None) -> tuple[str, str]:
    if not other or other.get("status") != "ok" or entry["status"] != "ok":
        reason = (other or {}).get("status", "not run")
        return (reason if reason != "ok" else "-"), "-"
    ours, theirs = entry["result"], other["result"]
    figure = f"{_num(theirs['infer_per_s'])}/s, {_ms(theirs['p50_ms'])} ms"
    if entry["group"] == "identity":
        ratio = f"p50 {_x(_div(ours['p50_ms'], theirs['p50_ms']))}"
    else:
        ratio = (f"{_x(_div(ours['infer_per_s'], theirs['infer_per_s']))} infer/s, "
                 f"p50 {_x(_div(ours['p50_ms'], theirs['p50_ms']))}")
    return figure, ratio


def label_of(document: dict[str, Any]) -> str:
    meta = document["meta"]
    return meta.get("label") or ("shmserve" if meta.get("target", "").startswith("shmserve")
                                 else meta.get("target_url", "target"))


def markdown(document: dict[str, Any], compared: list[dict[str, Any]] | None = None) -> str:
    compared = compared or []
    meta = document["meta"]
    name = label_of(document)
    lines = [f"### {name}: {meta['date']} on {meta['host']} ({meta['cpus']} CPUs)", ""]
    procs = meta.get("client_processes")
    lines.append(f"Target {meta['target']} at {meta['target_url']}; client "
                 f"{meta['client']}{f' ({procs} processes)' if procs else ''}; "
                 f"load average {_loadavg(meta.get('loadavg_start'))} at start, "
                 f"{_loadavg(meta.get('loadavg_end'))} at end"
                 + (f"; {meta['elapsed_s']} s" if meta.get("elapsed_s") else "")
                 + (f"; median of {meta['repeats']} runs per point (spread: min-max infer/s "
                    f"in the JSON)" if (meta.get("repeats") or 1) > 1 else "")
                 + (" — **quick run: checks correctness, not speed**" if meta.get("quick")
                    else "") + ".")
    busy = other_load(document)
    if busy is not None and busy > 0.3:
        lines.append(f"**Note:** other processes kept about {busy:.1f} cores busy during the "
                     f"measurements (host busy minus client and server); figures are lower than "
                     f"on a quiet host.")
    lines.append("")
    header = ["scenario", "infer/s", "p50 ms", "p99 ms", "ceiling (same run)", "vs ceiling",
              "client cores", "server cores", "correct"]
    for other in compared:
        label = label_of(other)
        header += [label, f"{name} vs {label}"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    others = [_by_id(other) for other in compared]
    for entry in document["scenarios"]:
        result = entry.get("result") or {}
        if entry["status"] == "ok":
            ceiling, ratio = _ceiling_text(entry)
            rate = _num(result.get("infer_per_s"))
            if result.get("repeats"):
                rates = [r["infer_per_s"] for r in result["repeats"]]
                rate += f" ({_num(min(rates))}-{_num(max(rates))})"
            row = [entry["id"], rate, _ms(result.get("p50_ms")),
                   _ms(result.get("p99_ms")), ceiling, ratio,
                   _num(result.get("client_cpu_cores"), 2),
                   _num(result.get("server_cpu_cores"), 2),
                   "yes" if entry.get("correct") else "**no**"]
        else:
            reason = entry["reason"].replace("|", "/")[:120]
            row = [entry["id"], entry["status"], "", "", reason, "", "", "",
                   "**no**" if entry["status"] == "failed" else "-"]
        for other in others:
            row += list(_compare_cell(entry, other.get(entry["id"])))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", ceilings_markdown(document), "", breakdown_markdown(document)]
    return "\n".join(lines).rstrip() + "\n"


def breakdown_markdown(document: dict[str, Any]) -> str:
    """Server-side averages from ModelStatistics (what the server says it spent per request)."""
    rows = []
    for entry in document["scenarios"]:
        stats = (entry.get("result") or {}).get("server_stats") or {}
        if entry["status"] != "ok" or not stats:
            continue
        p50 = entry["result"].get("p50_ms")
        main = entry["result"].get("server_main_cpu_cores")
        rows.append(f"| {entry['id']} | {_ms(p50)} | {_ms(stats.get('success_ms'))} | "
                    f"{_ms(stats.get('queue_ms'))} | {_ms(stats.get('compute_input_ms'))} | "
                    f"{_ms(stats.get('compute_infer_ms'))} | "
                    f"{_ms(stats.get('compute_output_ms'))} | {_num(stats.get('avg_batch'), 2)} "
                    f"| {_num(main, 2)} |")
    if not rows:
        return ""
    return "\n".join([
        "Server-side averages per request from ModelStatistics (ms), next to the client's p50, "
        "and the CPU of the server's main process alone (supervisor / frontend):",
        "",
        "| scenario | client p50 | server request | queue | compute input | compute infer | "
        "compute output | avg batch | main process cores |",
        "|---|---|---|---|---|---|---|---|---|", *rows])


def ceilings_markdown(document: dict[str, Any]) -> str:
    ceilings = document["ceilings"]
    lines = ["| ceiling | " + " | ".join(SIZE_ORDER) + " |",
             "|---|" + "---|" * len(SIZE_ORDER)]
    memcpy = ceilings.get("memcpy", {})
    lines.append("| NumPy memcpy p50 ms (GB/s) | " + " | ".join(
        f"{_ms(memcpy[s]['p50_ms'])} ({memcpy[s]['gb_per_s']:.3g})" if s in memcpy else "-"
        for s in SIZE_ORDER) + " |")
    gpu = ceilings.get("gpu_copy", {})
    lines.append("| GPU D2D copy p50 ms | " + " | ".join(
        _ms(gpu[s]["p50_ms"]) if "p50_ms" in gpu.get(s, {}) else
        ("skipped" if s in gpu else "-") for s in SIZE_ORDER) + " |")
    lines.append("| echo, identity payload p50 ms | " + " | ".join(
        _ms((_echo(document, f"identity/payload/{s}") or {}).get("p50_ms")) for s in SIZE_ORDER)
        + " |")
    shm = _echo(document, "identity/shm")
    lines.append("| echo, shm-style request (metadata only) p50 ms | "
                 + " | ".join(_ms((shm or {}).get("p50_ms")) for _ in SIZE_ORDER) + " |")
    skipped = {g.get("skipped") for g in gpu.values() if "skipped" in g}
    lines.append("")
    echo_simple = [(key, point) for key, point in ceilings.get("echo", {}).items()
                   if key.startswith("simple/") and point.get("status") == "ok"]
    if echo_simple:
        lines.append("| echo (bare grpc.aio, canned answer) | infer/s | p50 ms | p99 ms | "
                     "client cores | echo server cores |")
        lines.append("|---|---|---|---|---|---|")
        for key, point in sorted(echo_simple, key=lambda kv: int(kv[0].split("/c")[1])):
            r = point["result"]
            lines.append(f"| {key} | {_num(r['infer_per_s'])} | {_ms(r['p50_ms'])} | "
                         f"{_ms(r['p99_ms'])} | {_num(r.get('client_cpu_cores'), 2)} | "
                         f"{_num(r.get('server_cpu_cores'), 2)} |")
    if skipped:
        lines += ["", f"GPU copy skipped: {'; '.join(sorted(str(s) for s in skipped))}."]
    return "\n".join(lines)


def _loadavg(value: Any) -> str:
    if not value:
        return "?"
    return "/".join(f"{v:.2f}" for v in value)


def other_load(document: dict[str, Any]) -> float | None:
    """Average cores used by neither the client nor the server during the measured points."""
    samples = []
    for entry in document["scenarios"]:
        result = entry.get("result") or {}
        busy, server = result.get("host_busy_cores"), result.get("server_cpu_cores")
        client = result.get("client_cpu_cores")
        if _ok(busy) and isinstance(server, float) and math.isfinite(server) and _ok(client):
            samples.append(max(0.0, busy - server - client))
    return sum(samples) / len(samples) if samples else None


# --- plots -----------------------------------------------------------------------------------
def _series(document: dict[str, Any], transport: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for entry in document["scenarios"]:
        if entry.get("group") == "identity" and entry.get("transport") == transport \
                and entry["status"] == "ok":
            xs.append(entry["bytes"])
            ys.append(entry["result"]["p50_ms"])
    return xs, ys


def plot(document: dict[str, Any], compared: list[dict[str, Any]], out: Path,
         stem: str) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    name = label_of(document)
    paths: dict[str, Path] = {}
    ceilings = document["ceilings"]
    sizes = {"4B": 4, "1MiB": 1 << 20, "16MiB": 16 << 20, "64MiB": 64 << 20}

    figure, axis = plt.subplots(figsize=(7.5, 5))
    styles = {"payload": "o-", "system_shm": "s-", "cuda_shm": "^-", "cuda_shm_gpu": "v-"}
    for transport, style in styles.items():
        xs, ys = _series(document, transport)
        if xs:
            axis.plot(xs, ys, style, label=f"{name}: {transport.replace('_', ' ')}")
    for other in compared:
        for transport, style in styles.items():
            xs, ys = _series(other, transport)
            if xs:
                axis.plot(xs, ys, style.replace("-", "--"), alpha=0.7,
                          label=f"{label_of(other)}: {transport.replace('_', ' ')}")
    memcpy = ceilings.get("memcpy", {})
    xs = [sizes[s] for s in SIZE_ORDER if s in memcpy]
    axis.plot(xs, [memcpy[s]["p50_ms"] for s in SIZE_ORDER if s in memcpy], "k:",
              label="ceiling: one NumPy memcpy")
    gpu = ceilings.get("gpu_copy", {})
    gpu_sizes = [s for s in SIZE_ORDER if "p50_ms" in gpu.get(s, {})]
    if gpu_sizes:
        axis.plot([sizes[s] for s in gpu_sizes], [gpu[s]["p50_ms"] for s in gpu_sizes], "g:",
                  label="ceiling: one GPU D2D copy")
    echo_sizes = [s for s in SIZE_ORDER if _echo(document, f"identity/payload/{s}")]
    if echo_sizes:
        axis.plot([sizes[s] for s in echo_sizes],
                  [_echo(document, f"identity/payload/{s}")["p50_ms"]  # type: ignore[index]
                   for s in echo_sizes], "x:", color="grey",
                  label="ceiling: bare grpc.aio echo (payload)")
    shm = _echo(document, "identity/shm")
    if shm:
        axis.axhline(shm["p50_ms"], color="grey", linestyle="-.", linewidth=0.8,
                     label="ceiling: echo of a shm request (metadata only)")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks([sizes[s] for s in SIZE_ORDER], SIZE_ORDER)
    axis.set_xlabel("tensor size (input and output each)")
    axis.set_ylabel("p50 latency, ms (log)")
    axis.set_title("identity FP32, concurrency 1: latency vs size per transport")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    paths["latency_plot"] = out / f"{stem}-latency.png"
    figure.savefig(paths["latency_plot"], dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7.5, 5))

    def simple_curve(doc: dict[str, Any], prefix: str) -> tuple[list[int], list[float]]:
        points = sorted((s["concurrency"], s["result"]["infer_per_s"])
                        for s in doc["scenarios"]
                        if s["id"].startswith(prefix) and s["status"] == "ok")
        return [p[0] for p in points], [p[1] for p in points]

    xs, ys = simple_curve(document, "simple/")
    if xs:
        axis.plot(xs, ys, "o-", label=f"{name}: simple")
    xs, ys = simple_curve(document, "batching/on/")
    if xs:
        axis.plot(xs, ys, "s-", label=f"{name}: simple + dynamic batching")
    for other in compared:
        xs, ys = simple_curve(other, "simple/")
        if xs:
            axis.plot(xs, ys, "o--", alpha=0.7, label=f"{label_of(other)}: simple")
    echo = sorted((int(key.split("/c")[1]), point["result"]["infer_per_s"])
                  for key, point in ceilings.get("echo", {}).items()
                  if key.startswith("simple/") and point.get("status") == "ok")
    if echo:
        axis.plot([p[0] for p in echo], [p[1] for p in echo], "x:", color="grey",
                  label="ceiling: bare grpc.aio echo")
    axis.set_xscale("log", base=2)
    axis.set_xticks([1, 4, 8, 32], ["1", "4", "8", "32"])
    axis.set_xlabel("concurrency (requests in flight)")
    axis.set_ylabel("infer/s")
    axis.set_ylim(bottom=0)
    axis.set_title("simple (2x16 INT32): throughput vs concurrency")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths["throughput_plot"] = out / f"{stem}-throughput.png"
    figure.savefig(paths["throughput_plot"], dpi=110)
    plt.close(figure)
    return paths


# --- files -----------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON without NaN/inf (they become null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write(document: dict[str, Any], out: Path, stem: str, compared: list[dict[str, Any]],
          plots: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    if plots:
        try:
            paths.update(plot(document, compared, out, stem))
        except ImportError as exc:
            print(f"plots skipped: {exc} (pip install matplotlib)", file=sys.stderr)
    document["files"] = {key: value.name for key, value in paths.items()
                         if isinstance(value, Path)}
    paths["json"].write_text(json.dumps(_clean(document), indent=1) + "\n")
    text = markdown(document, compared)
    images = "".join(f"\n![{key}]({paths[key].name})" for key in
                     ("latency_plot", "throughput_plot") if key in paths)
    paths["markdown"].write_text(text + "\n" + images + "\n")
    paths["markdown_text"] = text
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="Re-render saved bench results side by side.")
    parser.add_argument("results", type=Path, help="a results .json written by python -m bench")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="other results .json to put next to it (e.g. a peer)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write <stem>-vs-<labels>.md and plots (default: next to "
                             "the results)")
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text())
    compared = [json.loads(path.read_text()) for path in args.compare]
    stem = args.results.stem + "".join(f"-vs-{label_of(c)}" for c in compared)
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(document, compared)
    paths = plot(document, compared, out, stem)
    images = "".join(f"\n![{key}]({path.name})" for key, path in paths.items())
    (out / f"{stem}.md").write_text(text + "\n" + images + "\n")
    print(text)
    print(f"wrote {out / f'{stem}.md'} and {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
