#!/usr/bin/env python3
"""Markdown tables (medians, with min-max and n) from bench/gpu/flow.ts result files (.json) or
from bench/gpu/thaw-e2e.sh logs (any other file: its `RESULT key=value ...` lines).
Usage: summarize.py RESULTS.json|run.log [...]  (each file is one device call; calls are not mixed)"""
import json
import statistics
import sys
from collections import defaultdict


def fmt(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ({min(vals):.2f}–{max(vals):.2f}, n={len(vals)})"


def parse_result_line(line):
    """`RESULT k=v k=v ... [reason="..."]` -> dict (numbers as floats, True/False/None as such)."""
    body, _, reason = line[len("RESULT "):].partition(" reason=")
    row = {}
    for kv in body.split():
        k, _, v = kv.partition("=")
        if v in ("True", "False"):
            row[k] = v == "True"
        elif v == "None":
            row[k] = None
        else:
            try:
                row[k] = float(v)
            except ValueError:
                row[k] = v
    if reason:
        row["reason"] = reason.strip()
    return row


def e2e_tables(path):
    """thaw-e2e.sh RESULT lines: one row per restore, grouped by size, route, lazy pages, cache."""
    rows = [parse_result_line(l.strip()) for l in open(path, errors="replace") if l.startswith("RESULT ")]
    print(f"\n### {path.split('/')[-1]}: thaw run → restore, per route\n")
    bad = [r for r in rows if not r.get("bit_exact")]
    print(f"Restores: {len(rows)}; all restored and bit-exact: {'yes' if not bad else 'NO: ' + json.dumps(bad)[:600]}\n")
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("gib"), r.get("route", "driver"), r.get("lazy"), r.get("kv"), r.get("queue", 0), r.get("verify", 1), r.get("cache", "warm"))].append(r)
    print("| GiB | route | lazy | KV | queued | verify | cache | restore → weights on GPU s | restore → first request s | `thaw run` returns s | CUDA restore s | unpark s (copy) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (gib, route, lazy, kv, queue, verify, cache), rs in groups.items():
        ok = [r for r in rs if r.get("bit_exact")]
        first = [r["restore_to_first_request"] for r in ok]
        weights = [r["weights_on_gpu"] if r.get("weights_on_gpu") is not None else r["restore_to_first_request"] for r in ok]
        gpu = [r["gpu_restore_ms"] / 1000 for r in ok if isinstance(r.get("gpu_restore_ms"), float)]
        unpark = fmt([r["unpark_s"] for r in ok if isinstance(r.get("unpark_s"), float)])
        copy = fmt([r["unpark_copy"] for r in ok if isinstance(r.get("unpark_copy"), float)])
        failed = len(rs) - len(ok)
        print(f"| {gib:g} | {route} | {lazy} | {kv} | {'yes' if queue == 1 else 'no'} | {'yes' if verify == 1 else 'no'} | {cache} | {fmt(weights)} | **{fmt(first)}** | {fmt([r['thaw_run_restore'] for r in ok])} "
              f"| {fmt(gpu)} | {unpark} ({copy}) |" + (f" {failed} failed |" if failed else ""))
    print("\n| GiB | route | lazy | image GB | park s | `thaw checkpoint` s | cold start → ready s |")
    print("|---|---|---|---|---|---|---|")
    seen = set()
    for r in rows:
        k = (r.get("gib"), r.get("route", "driver"), r.get("lazy"), r.get("kv"))
        if k in seen:
            continue
        seen.add(k)
        img = r.get("image_bytes")
        park = r.get("park")
        print(f"| {k[0]:g} | {k[1]} | {k[2]} | {img / 1e9:.2f} | {park if park is not None else '–'} | {r.get('checkpoint')} | {r.get('cold_to_ready')} |"
              if isinstance(img, float) else f"| {k[0]:g} | {k[1]} | {k[2]} | – | {park} | {r.get('checkpoint')} | {r.get('cold_to_ready')} |")


def main():
    for path in sys.argv[1:]:
        if not path.endswith(".json"):
            e2e_tables(path)
            continue
        rows = json.load(open(path))
        thp = next((r.get("thp") for r in rows if r.get("thp")), "?")
        print(f"\n### {path.split('/')[-1]} (THP {thp})\n")
        bad = [r for r in rows if r.get("step") == "error" or (r.get("step") == "restore" and not r.get("ok"))]
        print(f"All restores bit-exact: {'yes' if not bad else 'NO: ' + json.dumps(bad)[:300]}\n")
        print("| case | GPU bytes | cold start, cold cache s | cold start, warm cache s |")
        print("|---|---|---|---|")
        cs = defaultdict(list)
        gb = {}
        for r in rows:
            if r.get("step") == "coldStart":
                cs[(r["case"], r["cache"])].append(r["toServingS"])
                gb[r["case"]] = r.get("gpuBytes")
        for case in dict.fromkeys(c for c, _ in cs):
            print(f"| {case} | {gb[case]/2**30:.2f} GiB | {fmt(cs[(case, 'cold')])} | {fmt(cs[(case, 'warm')])} |")
        print("\n| case | image GB | CUDA lock+checkpoint s | runc checkpoint (CRIU dump) s | total s |")
        print("|---|---|---|---|---|")
        for r in rows:
            if r.get("step") == "checkpoint":
                print(f"| {r['case']} | {r['imageBytes']/1e9:.1f} | {r['gpuS']:.2f} | {r['runcCheckpointS']:.2f} | {r['totalS']:.2f} |")
        print("\n| case | kind | cache | runc restore (CRIU) s | CUDA restore+unlock s | restore → first request served s |")
        print("|---|---|---|---|---|---|")
        rs = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r.get("step") == "restore" and r.get("ok"):
                k = (r["case"], r["kind"], r["cache"])
                rs[k]["runc"].append(r["runcRestoreS"])
                rs[k]["gpu"].append(r["gpuS"])
                rs[k]["serve"].append(r["toServingS"])
        for (case, kind, cache), d in rs.items():
            print(f"| {case} | {kind} | {cache} | {fmt(d['runc'])} | {fmt(d['gpu'])} | **{fmt(d['serve'])}** |")


if __name__ == "__main__":
    main()
