"""Markdown tables (for the README) from the JSON files in bench/results/.

    python bench/summarize.py            # prints every table it has data for
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _machine(d):
    m = d["machine"]
    return (f"*{m.get('cpu', '?')}, {m.get('cores', m.get('cpu_count', '?'))} cores, "
            f"{m.get('platform', '')}, jax {m.get('jax', d.get('versions', {}).get('jax', '?'))}*")


def ann():
    d = _load("ann_cpu.json")
    if not d:
        return ""
    rr = next(k for k in d["results"][0] if k.startswith("st_jax_rerank"))
    p = d["params"]
    out = [f"**Flat filtered Int8 search** (`bench/ann.py`, N = {p['items']:,}, D = {p['dim']}, "
           f"B = {p['batch']}; {_machine(d)})", "",
           "| pass rate | k | st_jax recall | st_jax QPS | XLA twin QPS | + rerank recall | "
           "+ rerank QPS | faiss SQ8 recall | faiss SQ8 QPS | speed-up (Int8 / rerank) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        s, x, f = r["st_jax"], r[rr], r["faiss_sq8"]
        twin = r.get("st_jax_xla_twin")
        tq = f"{twin['qps']:.0f}" if twin else "—"
        out.append(f"| {r['pass_rate']:.1%} | {r['k']} | {s['recall']:.3f} | {s['qps']:.0f} | "
                   f"{tq} | {x['recall']:.3f} | {x['qps']:.0f} | {f['recall']:.3f} | "
                   f"{f['qps']:.0f} | "
                   f"{r['speedup_vs_sq8']:.2f}× / {r['speedup_vs_sq8_rerank']:.2f}× |")
    b = d["bytes_per_item"]
    out += ["", f"Bytes/item: st_jax {b['st_jax']:.0f} (+ bf16 cache {b['st_jax_with_bf16_cache']:.0f}), "
            f"faiss SQ8 {b['faiss_sq8']}. All slots filled in every row."]
    return "\n".join(out)


def filter_search():
    d = _load("filter_search_cpu.json")
    if not d:
        return ""
    p = d["params"]
    out = [f"**End-to-end filtered search** (`bench/filter_search.py`, N = {p['items']:,}, "
           f"D = {p['dim']}, B = {p['batch']}, k = {p['k']}; {_machine(d)})", "",
           "| filter | pass rate | st_jax recall | false positives | st_jax QPS | "
           "faiss SQ8 + bitmap recall | faiss QPS |", "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        s, f = r["st_jax"], r["faiss_sq8_bitmap"]
        out.append(f"| `{r['filter']}` | {r['pass_rate']:.2%} | {s['recall']:.3f} | "
                   f"{s['false_positives']} | {s['qps']:.0f} | {f['recall']:.3f} | {f['qps']:.0f} |")
    return "\n".join(out)


def ivf():
    d = _load("ivf_cpu.json")
    if not d:
        return ""
    p = d["params"]
    out = [f"**IVF with filters** (`bench/ivf.py`, N = {p['items']:,}, D = {p['dim']}, "
           f"nlist = {p['nlist']}, B = {p['batch']}; {_machine(d)}). Best QPS reaching recall "
           "≥ 0.95 (— = never reached), and the best recall reached:", "",
           "| filter | k | method | best recall (knob) | QPS at recall ≥ 0.95 (knob) | slots filled |",
           "|---|---|---|---|---|---|"]
    rows = d["results"]
    order = {f: i for i, f in enumerate(dict.fromkeys(r["filter"] for r in rows))}
    keys = sorted(dict.fromkeys((r["filter"], r["k"], r["method"]) for r in rows),
                  key=lambda key: (order[key[0]], key[1]))   # by filter, then k (stable)
    for f, k, m in keys:
        rs = [r for r in rows if (r["filter"], r["k"], r["method"]) == (f, k, m)]
        best = max(rs, key=lambda r: r["recall"])
        ok = [r for r in rs if r["recall"] >= 0.95]
        fast = max(ok, key=lambda r: r["qps"]) if ok else None
        q = f"{fast['qps']:.0f} ({fast['knob']})" if fast else "—"
        out.append(f"| {f} | {k} | {m} | {best['recall']:.3f} ({best['knob']}) | {q} | "
                   f"{best['slots_filled']:.2f} |")
    bs = d["build_seconds"]
    out += ["", "Build seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in bs.items()) + "."]
    if d.get("head_to_head"):
        out += ["", "Head to head at recall ≥ 0.95 (each side's two fastest configurations from "
                "the sweep, timed again together, interleaved):", "",
                "| filter | k | st_jax (knob) | recall | QPS | faiss IVF-SQ8 (knob) | recall | QPS "
                "| st_jax / faiss |", "|---|---|---|---|---|---|---|---|---|"]
        for h in sorted(d["head_to_head"], key=lambda h: (order[h["filter"]], h["k"])):
            s, f = h["st_jax"], h["faiss_ivf_sq8"]
            cell = (lambda x: (f"{x['method']} ({x['knob']}) | {x['recall']:.3f} | "
                               f"{x['qps']:.0f}") if x else "never reached | — | —")
            ratio = f"{h['speedup']:.2f}×" if h["speedup"] else ("faiss never reaches it" if s
                                                                 else "—")
            out.append(f"| {h['filter']} | {h['k']} | {cell(s)} | {cell(f)} | {ratio} |")
    return "\n".join(out)


def train():
    d = _load("train_ml100k.json")
    if not d:
        return ""
    a = d["aggregate_over_seeds"]
    g = lambda key: a[key]  # noqa: E731
    return "\n".join([
        f"**MovieLens-100K training** (`bench/train_ml100k.py`, seeds {d['seeds']}, test split, "
        f"task `watch`; {_machine(d)})", "",
        "| metric | mean | min | max | target |", "|---|---|---|---|---|",
        *[f"| {name} | {g(key)['mean']:.4f} | {g(key)['min']:.4f} | {g(key)['max']:.4f} | {t} |"
          for name, key, t in [
              ("popularity Recall@20", "popularity_recall@20", ""),
              ("two-tower Recall@20", "two_tower_recall@20", ""),
              ("two-tower / popularity", "two_tower_over_popularity_recall@20", "≥ 1.3"),
              ("MoL OverArch re-rank (top 200) Recall@20", "overarch_rerank_recall@20", ""),
              ("relative gain of the re-rank", "overarch_rerank_relative_gain_recall@20", "≥ 0.05"),
              ("two-tower Recall@20, validation split", "valid_two_tower_recall@20", ""),
              ("re-rank Recall@20, validation split", "valid_overarch_rerank_recall@20", ""),
              ("relative gain of the re-rank, validation split",
               "valid_overarch_rerank_relative_gain_recall@20", "≥ 0")]
          if key in a]])


def serve():
    d = _load("serve_cpu.json")
    if not d:
        return ""
    p = d["params"]
    out = [f"**Whole served graph** (`bench/serve.py`: user tower → filtered Int8 top-k0 = "
           f"{p['k0']} per task (2 tasks) → merge → MoL OverArch → Value Model → top-{p['k']}; "
           f"{_machine(d)})", "",
           "| items | index | batch | filter | p50 ms | p99 ms | QPS | tower ms | retrieve ms "
           "| OverArch ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size in d["sizes"]:
        ix = size["index"]
        kind = f"IVF {ix['num_clusters']}, nprobe {ix['nprobe']}" if ix["num_clusters"] else "flat"
        for r in size["rows"]:
            st = r["stage_ms"]
            out.append(f"| {r['items']:,} | {kind} | {r['batch']} | {r['filter']} | "
                       f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['qps']:,.0f} | "
                       f"{st['user_tower']:.2f} | {st['retrieve_merge']:.1f} | "
                       f"{st['overarch_value_topk']:.1f} |")
    return "\n".join(out)


def server():
    d = _load("server_cpu.json")
    if not d:
        return ""
    p = d["params"]
    out = [f"**HTTP server** (`bench/server.py`: `st-jax serve` on loopback, {p['items']:,} "
           f"items, closed-loop clients, half the requests with a ~10 % filter; {_machine(d)})",
           "", "| clients | requests | QPS | p50 ms | p99 ms | users per graph call | errors |",
           "|---|---|---|---|---|---|---|"]
    for r in d["levels"]:
        out.append(f"| {r['clients']} | {r['requests']} | {r['qps']:,.0f} | {r['p50_ms']:.1f} | "
                   f"{r['p99_ms']:.1f} | {r['mean_batch_users']:.1f} | {r['errors']} |")
    if d.get("updates"):
        out += ["", "| `POST /v1/items` (journaled, fsynced) | requests | items/s | p50 ms | "
                "p99 ms | errors |", "|---|---|---|---|---|---|"]
        for name, r in d["updates"].items():
            out.append(f"| {name.replace('_', ' ')} | {r['requests']} | {r['items_per_s']:,.0f}"
                       f" | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    if d.get("restart_load_warm_seconds") is not None:
        out += ["", f"Start (load + warm-up): {d['load_warm_seconds']:.1f} s with an empty "
                f"compilation cache, {d['restart_load_warm_seconds']:.1f} s on restart (graphs "
                f"loaded from the cache, `--compilation-cache`)."]
    c = d.get("compaction")
    if c:
        out += ["", f"Compaction (`POST /v1/admin/compact`) of {c['updates_folded']} journaled "
                f"updates: new version written in {c['seconds_write_version']:.1f} s, served "
                f"after {c['seconds_total']:.1f} s (load and warm-up included)."]
    return "\n".join(out)


def shard():
    d = _load("shard_cpu.json")
    if not d:
        return ""
    p = d["params"]
    out = [f"**Sharded search** (`bench/shard.py`: {p['items']:,} x {p['dim']}, B = "
           f"{p['batch']}, k = {p['k']}, IVF {p['clusters']} clusters / nprobe {p['nprobe']}; "
           f"forced CPU host devices sharing the machine's cores; {_machine(d)})", "",
           "| devices | index | filter | sharded QPS | single-device QPS | recall vs single | "
           "scores and paths equal |", "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        out.append(f"| {r['devices']} | {r['index']} | {r['filter']} | "
                   f"{r['sharded_qps']:,.0f} | {r['single_device_qps']:,.0f} | "
                   f"{r['recall_vs_single']:.3f} | "
                   f"{'yes' if r['scores_equal'] and r['paths_equal'] else 'no'} |")
    return "\n".join(out)


def native_scan():
    d = _load("native_scan_cpu.json")
    if not d:
        return ""
    p = d["params"]
    out = [f"**Native CPU scan** (`bench/native_scan.py`, N = {p['items']:,}, D = "
           f"{p['dim']}, nlist = {p['nlist']}, B = {p['batch']}, no filter; "
           f"`pallas_kernels/native/ivf_scan_cpu.cc`, `{' '.join(p['cxxflags'][:2])}`; "
           f"{_machine(d)}): ms per batch, interleaved medians", "",
           "| nprobe | k | codes read (MB) | native = twin (values, rows) | native scan | "
           "twin scan | `st.search` (native) | `st.search` (twin) | faiss IVF-SQ8 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        ms = r["ms_per_batch"]
        eq = "yes" if r["values_equal"] and r["rows_equal"] else "no"
        out.append(f"| {r['nprobe']} | {r['k']} | {r['codes_mb']:.0f} | {eq} | "
                   f"{ms['native_scan']:.2f} | {ms['twin_scan']:.2f} | {ms['st_search']:.2f} | "
                   f"{ms['st_search_twin']:.2f} | {ms['faiss_ivf_sq8']:.2f} |")
    return "\n".join(out)


def filter_eval():
    d = _load("filter.json")
    if not d or "st_jax_mask_xla_s" not in d["queries"][0]:
        return ""
    p = d["params"]
    out = [f"**Filter mask** (`bench/filter.py`, N = {p['n']:,}, Bloom M = {p['main_bits']}, "
           f"K = {p['num_hashes']}; {_machine(d)}): ms per exact mask over every item, "
           f"`backend=\"auto\"` (on CPU the native kernel, "
           f"`pallas_kernels/native/filter_mask_cpu.cc`) and the XLA path (interval bounds + "
           f"while-loop verification)", "",
           "| filter | pass rate | items verified | auto (native) | XLA path | numpy forward index |",
           "|---|---|---|---|---|---|"]
    for r in d["queries"]:
        out.append(f"| `{r['filter']}` | {r['pass_rate']:.4%} | {r['uncertain_items']:,} | "
                   f"{r['st_jax_mask_s'] * 1e3:.2f} | {r['st_jax_mask_xla_s'] * 1e3:.2f} | "
                   f"{r['forward_numpy_s'] * 1e3:.1f} |")
    b, c, cp = d["batch"], d["compile_s"], d["codesign_partial"]
    out += ["", f"A batch of {b['batch_size']} per-query programs: {b['mask_s'] * 1e3:.1f} ms "
            f"(XLA path {b['mask_xla_s'] * 1e3:.1f} ms). Only the probed words "
            f"({cp['fraction_of_items']:.1%} of the index): "
            f"{min(cp['mask_s']) * 1e3:.2f}–{max(cp['mask_s']) * 1e3:.2f} ms (XLA path "
            f"{min(cp['mask_xla_s']) * 1e3:.2f}–{max(cp['mask_xla_s']) * 1e3:.2f}). Compiling "
            f"one mask graph: {c['auto']:.2f} s (XLA path {c['xla']:.2f} s)."]
    return "\n".join(out)


def cold_start():
    d = _load("cold_start_cpu.json")
    if not d:
        return ""
    p = d["params"]
    out = [f"**Cold start** (`bench/cold_start.py`: first `st.search` call after "
           f"`jax.clear_caches()` = trace + compile + run, then a warm call; N = {p['n']:,}, "
           f"D = {p['dim']}, B = {p['batch']}, k = {p['k']}, filter `{p['filter']}`; "
           f"{_machine(d)})", "",
           "| index | filter | first call, auto | first call, XLA twins | warm, auto | "
           "warm, XLA twins |", "|---|---|---|---|---|---|"]
    rows = {(r["index"], r["filter"], r["backend"]): r for r in d["results"]}
    for (index, filt, be), r in rows.items():
        if be != "auto":
            continue
        x = rows.get((index, filt, "xla"), {})
        out.append(f"| {index} | {'yes' if filt else 'no'} | {r['first_call_s']:.2f} s | "
                   f"{x.get('first_call_s', float('nan')):.2f} s | "
                   f"{r['warm_call_s'] * 1e3:.2f} ms | "
                   f"{x.get('warm_call_s', float('nan')) * 1e3:.2f} ms |")
    return "\n".join(out)


if __name__ == "__main__":
    for table in (ann(), filter_search(), ivf(), native_scan(), filter_eval(), cold_start(),
                  train(), serve(), server(), shard()):
        if table:
            print(table + "\n")
