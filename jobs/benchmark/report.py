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


def same_case_table(records: list[dict], base_ids: dict) -> str:
    """Cases measured on several devices, side by side, with each answer's first tokens."""
    by_case: dict = {}
    for r in records:
        if r["status"] == "ok":
            by_case.setdefault(r["case_id"], []).append(r)
    lines = []
    for cid, recs in by_case.items():
        if len(recs) < 2 or cid not in base_ids.values():
            continue
        lines += [f"Case {cid}:", "", "| device | backend | encode (s) | prefill (s) | TTFT (s) | decode (tok/s) "
                  "| peak (MB) | first tokens |", "|---" * 8 + "|"]
        for r in recs:
            m = r["metrics"]
            toks = ",".join(map(str, (m.get("tokens") or [])[:8])) or "-"
            lines.append(f"| {r['device']} | {r['backend']} | {_fmt(m.get('encode_s'))} | {_fmt(m.get('prefill_s'))} | "
                         f"{_fmt(m.get('ttft_s'))} | {_fmt(m.get('decode_tokens_per_s'), 1)} | "
                         f"{_fmt(m.get('peak_memory_mb'), 0)} | {toks} |")
        lines.append("")
    return "\n".join(lines)


def write_report(path: Path, devices: dict, records: list[dict], bases: dict, pictures: dict, header: str,
                 anchors: str = "") -> None:
    failed = [r for r in records if r["status"] == "failed"]
    lines = ["# Benchmark report", "", header, "", "## Per device (base case, like the paper's Table 5)", "",
             table5(devices, bases), "", "## Per device in the AI Hub / ExecuTorch benchmark columns", "", anchors, "",
             "## Sweeps (cases that differ from the base case in one field)",
             sweep_tables(records, bases), ""]
    if pictures:
        lines += ["## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in pictures.items()] + [""]
    if failed:
        lines += ["## Failed cases", "", "| device | case | attempts | error |", "|---|---|---|---|"]
        lines += [f"| {r['device']} | {r['case_id']} | {r.get('attempts')} | {str(r.get('error')).replace('|', '/')[:300]} |"
                  for r in failed]
    path.write_text("\n".join(lines) + "\n")


# -- results in the schema of the AI Hub / ExecuTorch benchmarks ---------------------------------
ANCHOR_METRICS = (("load_ms", "load_s", 1e3), ("encode_ms", "encode_s", 1e3), ("ttft_ms", "ttft_s", 1e3),
                  ("prefill_tokens_per_s", "prefill_tokens_per_s", 1.0),
                  ("decode_tokens_per_s", "decode_tokens_per_s", 1.0))


def anchor_rows(records: list[dict], loads: dict) -> list[dict]:
    """One row per ok case: device, backend, compute unit, load / encode / TTFT in ms, prefill and
    decode tokens/s, peak memory range [min, max] over the trials (MB), environment."""
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        m, info = r["metrics"], ((loads.get(r["device"]) or {}).get("load") or {})
        desc = info.get("backend") or {}
        peaks = [t["peak_memory_mb"] for t in r.get("per_trial") or [] if isinstance(t.get("peak_memory_mb"), (int, float))]
        peaks = peaks or ([m["peak_memory_mb"]] if isinstance(m.get("peak_memory_mb"), (int, float)) else [])
        row = {"device": r["device"], "backend": r["backend"], "compute_unit": desc.get("compute_unit", "cpu"),
               "case_id": r["case_id"], "simulated": bool(m.get("simulated"))}
        for name, key, scale in ANCHOR_METRICS:
            row[name] = m[key] * scale if isinstance(m.get(key), (int, float)) else None
        row["peak_memory_range_mb"] = [min(peaks), max(peaks)] if peaks else None
        row["environment"] = {k: v for k, v in desc.items() if k not in ("backend", "kind", "compute_unit", "profile_values")
                              and isinstance(v, (str, int, float))}
        rows.append(row)
    return rows


def executorch_records(rows: list[dict], model: str) -> list[dict]:
    """The rows as ExecuTorch's benchmark records (v3: benchmark, model, metric, runners)."""
    out = []
    for row in rows:
        for name, _, _ in ANCHOR_METRICS:
            if row[name] is None:
                continue
            out.append({"benchmark": {"name": "bluelm_v", "mode": "inference", "extra_info": {"case": row["case_id"]}},
                        "model": {"name": model, "type": "vlm", "backend": row["backend"]},
                        "metric": {"name": name, "benchmark_values": [row[name]], "target_value": 0,
                                   "extra_info": {"peak_memory_range_mb": row["peak_memory_range_mb"]}},
                        "runners": [{"name": row["device"], "type": row["compute_unit"], **row["environment"]}]})
    return out


def anchor_table(rows: list[dict], case_ids: dict) -> str:
    """Per device, its base case in the anchors' columns."""
    lines = ["| device | backend | compute unit | load (ms) | encode (ms) | TTFT (ms) | prefill (tok/s) | decode (tok/s) "
             "| peak memory (MB) | environment |", "|---" * 10 + "|"]
    for row in rows:
        if row["case_id"] != case_ids.get(row["device"]):
            continue
        mem = row["peak_memory_range_mb"]
        env = ", ".join(f"{k} {v}" for k, v in list(row["environment"].items())[:5])
        lines.append(f"| {row['device']} | {row['backend']} | {row['compute_unit']} | {_fmt(row['load_ms'], 0)} | "
                     f"{_fmt(row['encode_ms'], 0)} | {_fmt(row['ttft_ms'], 0)} | {_fmt(row['prefill_tokens_per_s'], 0)} | "
                     f"{_fmt(row['decode_tokens_per_s'], 1)} | {'-' if not mem else f'{mem[0]:.0f}-{mem[1]:.0f}'} | {env} |")
    return "\n".join(lines)


def comparison_plot(rows: list[dict], case_ids: dict, out_dir: Path) -> dict[str, str]:
    """Cross-device comparison of the base case: latencies (load, encode, TTFT) and decode speed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [r for r in rows if r["case_id"] == case_ids.get(r["device"])]
    if not base:
        return {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1.4]})
    names = [f"{r['device']}{' (sim)' if r['simulated'] else ''}" for r in base]
    width = 0.8 / 3
    for i, (key, label) in enumerate((("load_ms", "load"), ("encode_ms", "encode"), ("ttft_ms", "TTFT"))):
        xs = [j + (i - 1) * width for j in range(len(base))]
        ax1.bar(xs, [(r[key] or 0) / 1e3 for r in base], width, label=label)
    ax1.set_xticks(range(len(base)), names, rotation=20, ha="right", fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("seconds (log)")
    ax1.set_title("latency of the base case")
    ax1.legend(fontsize=8)
    ax2.bar(range(len(base)), [r["decode_tokens_per_s"] or 0 for r in base], color="tab:green")
    ax2.set_xticks(range(len(base)), names, rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("decode tokens/s")
    ax2.set_title("decode speed")
    for ax in (ax1, ax2):
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "devices_compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"devices_compare": str(path)}
