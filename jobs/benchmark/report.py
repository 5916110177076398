"""Benchmark summary, report.md and plots from the records of results.jsonl.

Per device: the base case as a row of a table like the paper's Table 5 (image processing =
load + encode, LLM prefill, decode tokens/s, TTFT, peak memory, output check), and the sweeps
found among its cases: encode latency by tiles per batch, prefill latency by chunk, figures by
image size and by quantizer (a sweep = the cases that differ from the base in that field only).
"""
from __future__ import annotations

from pathlib import Path

SWEEPS = {"tiles_per_batch": "encode_s", "prefill_chunk": "prefill_s", "image": "encode_s",
          "quantizer": "decode_tokens_per_s"}


def _same_but(case: dict, base: dict, key: str) -> bool:
    keys = (set(case) | set(base)) - {"id", key}
    return all(case.get(k) == base.get(k) for k in keys)


def sweeps(records: list[dict], base: dict) -> dict:
    """{field: [(value, record), ...]} for the ok records that vary only ``field`` from base."""
    out = {}
    for key in SWEEPS:
        rows = [(r["case"].get(key), r) for r in records
                if r["status"] == "ok" and _same_but(r["case"], base, key)]
        if len(rows) > 1:
            out[key] = sorted(rows, key=lambda vr: _order(vr[0]))
    return out


def _order(value):
    """Sweep values in a natural order: numbers ascending, image sizes by area, others by name."""
    if isinstance(value, (int, float)):
        return (0, value, "")
    if isinstance(value, list) and len(value) == 2:
        return (0, value[0] * value[1], str(value))
    return (1, 0, _label(value))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _label(value) -> str:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, dict):
        return value.get("name", str(value))
    return str(value)


def device_summary(name: str, records: list[dict], base: dict) -> dict:
    mine = [r for r in records if r["device"] == name]
    ok = [r for r in mine if r["status"] == "ok"]
    base_rec = next((r for r in ok if r["case_id"] == base["id"]), None)
    out = {"cases": len(mine), "ok": len(ok), "failed": len(mine) - len(ok),
           "unstable": sum(1 for r in ok if r.get("stable") is False),
           "backend": mine[0]["backend"] if mine else None, "kind": next((r.get("kind") for r in mine if r.get("kind")), None)}
    if base_rec:
        m = base_rec["metrics"]
        out["base"] = {k: m.get(k) for k in ("grid", "crops", "load_s", "encode_s", "prefill_s", "ttft_s",
                                             "decode_tokens_per_s", "peak_memory_mb", "check_ok",
                                             "check_max_abs_diff") if k in m}
    for key, rows in sweeps(mine, base).items():
        metric = SWEEPS[key]
        out[f"{metric}_by_{key}"] = {_label(v): r["metrics"].get(metric) for v, r in rows}
        numeric = [(v, r["metrics"][metric]) for v, r in rows if isinstance(r["metrics"].get(metric), (int, float))]
        if numeric:
            pick = max if metric.endswith("per_s") else min
            out[f"best_{key}"] = pick(numeric, key=lambda vm: vm[1])[0]
    return out


def table5(devices: dict, bases: dict) -> str:
    lines = ["| device | backend | image processing (load + encode) | LLM prefill | TTFT | decode | peak memory | output check |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in devices.items():
        b = s.get("base")
        if not b:
            lines.append(f"| {name} | {s.get('backend')} | (base case not finished) | | | | | |")
            continue
        load, enc = b.get("load_s"), b.get("encode_s")
        image = f"{(load or 0) + (enc or 0):.2f} s ({_fmt(load, 2)} load + {_fmt(enc, 2)} encode)"
        check = "-" if "check_ok" not in b else ("ok" if b["check_ok"] else "MISMATCH") + (
            f" (max abs diff {b['check_max_abs_diff']:.2e})" if isinstance(b.get("check_max_abs_diff"), float) else "")
        c = bases[name]
        lines.append(f"| {name} | {s.get('backend')} | {image} | {_fmt(b.get('prefill_s'), 2)} s ({c['prompt_tokens']} tokens, "
                     f"t{c['prefill_chunk']}) | {_fmt(b.get('ttft_s'), 2)} s | {_fmt(b.get('decode_tokens_per_s'), 1)} tokens/s "
                     f"| {_fmt(b.get('peak_memory_mb'), 0)} MB | {check} |")
    return "\n".join(lines)


def sweep_tables(records: list[dict], bases: dict) -> str:
    parts = []
    for key, metric in SWEEPS.items():
        per_dev = {name: {_label(v): r["metrics"].get(metric) for v, r in sweeps([r for r in records if r["device"] == name], base).get(key, [])}
                   for name, base in bases.items()}
        cols = []
        for vals in per_dev.values():
            cols += [c for c in vals if c not in cols]
        if not cols:
            continue
        parts.append(f"\n### {metric} by {key}\n\n| device | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
        for name, vals in per_dev.items():
            if vals:
                parts.append(f"| {name} | " + " | ".join(_fmt(vals.get(c)) for c in cols) + " |")
    return "\n".join(parts)


def plots(records: list[dict], bases: dict, out_dir: Path) -> dict[str, str]:
    """encode latency vs tiles per batch, prefill latency vs chunk: one line per device."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    files = {}
    for key, metric, xlabel, fname in (("tiles_per_batch", "encode_s", "tiles per batch", "encode_vs_tiles_per_batch.png"),
                                       ("prefill_chunk", "prefill_s", "prefill chunk (tokens)", "prefill_vs_chunk.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = set()
        for name, base in bases.items():
            rows = sweeps([r for r in records if r["device"] == name], base).get(key, [])
            if rows:
                ax.plot([v for v, _ in rows], [r["metrics"][metric] for _, r in rows], marker="o", label=name)
                drawn.update(v for v, _ in rows)
        if not drawn:
            plt.close(fig)
            continue
        if key == "prefill_chunk":
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(drawn), [str(v) for v in sorted(drawn)])
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric.replace('_s', '')} latency (s, log)")
        ax.set_title(f"{metric} vs {xlabel}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[fname[:-4]] = str(path)
    return files


def write_report(path: Path, devices: dict, records: list[dict], bases: dict, pictures: dict, header: str) -> None:
    failed = [r for r in records if r["status"] == "failed"]
    lines = ["# Benchmark report", "", header, "", "## Per device (base case, like the paper's Table 5)", "",
             table5(devices, bases), "", "## Sweeps (cases that differ from the base case in one field)",
             sweep_tables(records, bases), ""]
    if pictures:
        lines += ["## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in pictures.items()] + [""]
    if failed:
        lines += ["## Failed cases", "", "| device | case | attempts | error |", "|---|---|---|---|"]
        lines += [f"| {r['device']} | {r['case_id']} | {r.get('attempts')} | {str(r.get('error')).replace('|', '/')[:300]} |"
                  for r in failed]
    path.write_text("\n".join(lines) + "\n")
