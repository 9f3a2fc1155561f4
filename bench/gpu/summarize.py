#!/usr/bin/env python3
"""Markdown tables (medians, with min-max and n) from bench/gpu/flow.ts result files.
Usage: summarize.py RESULTS.json [...]  (each file is one device call; calls are not mixed)"""
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


def main():
    for path in sys.argv[1:]:
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
