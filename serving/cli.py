"""`st-jax publish`, `st-jax query` and `st-jax export` (wired into `st-jax` by st_jax.cli).

    st-jax publish runs/ml100k --out bundles/ml100k [--clusters 0 --k0 200]
    st-jax query bundles/ml100k --user 42 --filter 'genres:Comedy AND NOT year:1995' --k 10
    st-jax export bundles/ml100k --platform cpu --out exports/ml100k-cpu [--k 100]
    st-jax serve bundles/ml100k --port 8080 [--host 127.0.0.1 --max-batch 128 --queue 1024]
    st-jax compact bundles/ml100k       # fold journaled item updates into a new version
"""
from __future__ import annotations

import json
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("publish", help="publish a trained model + its catalogue as a "
                              "served bundle", description="Item tower -> IVF/Int8 index + "
                              "filters + embedding cache -> one bundle (written atomically).")
    p.add_argument("model_dir", help="a directory written by `st-jax train`")
    p.add_argument("--out", required=True, help="bundle directory")
    p.add_argument("--clusters", type=int, default=None,
                   help="IVF clusters (default: flat below 200k items, else ~sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF clusters probed per query")
    p.add_argument("--k0", type=int, default=None,
                   help="candidates per task (default: the model's OverArch rerank_top)")
    p.add_argument("--merge", default="union", choices=("union", "intersection"))
    p.add_argument("--bloom-bits", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_publish)

    q = subparsers.add_parser("query", help="recommendations from a bundle",
                              description="Top-k items for users of the bundle's user table.")
    q.add_argument("bundle")
    q.add_argument("--user", type=int, action="append", required=True,
                   help="user id (repeat for several users)")
    q.add_argument("--filter", default=None, help="filter, e.g. 'genres:Comedy AND NOT "
                                                  "year:1995'")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--k0", type=int, default=None)
    q.add_argument("--rank", default="overarch", choices=("overarch", "retrieval"))
    q.add_argument("--include-seen", action="store_true",
                   help="also return items the user already interacted with")
    q.add_argument("--json", action="store_true", help="print JSON")
    _cache_option(q)
    q.set_defaults(func=_query)

    e = subparsers.add_parser("export", help="jax.export artifacts of a bundle's graph",
                              description="Serialised graphs per batch size + weights; run "
                                          "with serving.load_exported (no model code).")
    e.add_argument("bundle")
    e.add_argument("--out", required=True)
    e.add_argument("--platform", default="cpu", choices=("cpu", "cuda"))
    e.add_argument("--batch-sizes", default="1,8,32,128")
    e.add_argument("--k", type=int, default=100, help="largest k callers may ask for")
    e.add_argument("--k0", type=int, default=None)
    e.add_argument("--exclude-max", type=int, default=1024,
                   help="longest per-user exclusion list (seen items) accepted")
    e.set_defaults(func=_export)

    s = subparsers.add_parser("serve", help="HTTP JSON API over a bundle (micro-batched)",
                              description="POST /v1/recommend, POST /v1/items, POST "
                                          "/v1/admin/reload, GET /healthz, GET /metrics "
                                          "(see serving/_server.py).")
    s.add_argument("bundle")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--max-batch", type=int, default=128, help="users per retriever call")
    s.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch waits for more requests")
    s.add_argument("--queue", type=int, default=1024,
                   help="requests that may wait; beyond it the server answers 503")
    s.add_argument("--max-users", type=int, default=1024, help="users per request (413 above)")
    s.add_argument("--max-k", type=int, default=1000, help="largest k accepted")
    s.add_argument("--poll-s", type=float, default=5.0,
                   help="seconds between checks of BUNDLE/CURRENT for a new version (0: off)")
    s.add_argument("--buckets", default=None, help="batch sizes compiled, e.g. 1,8,32,128")
    s.add_argument("--fresh-capacity", type=int, default=None,
                   help="items the fresh index (POST /v1/items) can hold")
    s.add_argument("--warmup-filter", action="append", default=[],
                   help="a filter compiled at load time (repeatable)")
    s.add_argument("--no-durable", dest="durable", action="store_false",
                   help="keep /v1/items updates in memory only (default: journal them in "
                        "the bundle so restarts keep them)")
    s.add_argument("--shard", action="store_true",
                   help="shard the main index over all local devices (jax.devices()); "
                        "results equal the unsharded graph")
    s.add_argument("--auto-compact", type=float, default=0.8,
                   help="compact in the background once this fraction of the fresh index is "
                        "used (0: only POST /v1/admin/compact)")
    s.add_argument("--log-level", default="info")
    _cache_option(s)
    s.set_defaults(func=_serve)

    c = subparsers.add_parser("compact", help="fold a bundle's journaled item updates into a "
                              "new version", description="Loads the live version, replays "
                              "the item updates journaled by a server (POST /v1/items), and "
                              "writes them into a new version atomically; a running server "
                              "hot-swaps to it (polling) and replays later updates.")
    c.add_argument("bundle")
    c.add_argument("--fresh-capacity", type=int, default=4096,
                   help="fresh-index capacity needed to replay the journal")
    c.set_defaults(func=_compact)


def _cache_option(p) -> None:
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache: graphs compiled once are loaded "
                        "by later runs (a restart skips most of the warm-up). Default: "
                        "$JAX_COMPILATION_CACHE_DIR if set, else a folder per kind of CPU "
                        "in st_jax's cache (~/.cache/st_jax/xla-*); 'off' to compile "
                        "everything afresh")


def compilation_cache(arg: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process (the ``--compilation-cache``
    option); returns the folder used, or None when off.

    ``arg`` None: ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX already uses it), else an
    ``xla-<cpu>`` folder of st_jax's cache (:func:`pallas_kernels.native.cache_dir`; one per
    kind of CPU, :func:`~pallas_kernels.native.cpu_tag`: XLA:CPU code is compiled for the
    host CPU); ``"off"``: none. Compilations from 0.1 s on are kept (JAX's default keeps
    only those over 1 s: most of a served graph's filter and bucket variants are under it),
    unless ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise. JAX keys the
    entries by the program, the jax/jaxlib version and the device, so a stale entry is never
    used; it writes them in place, and an entry a kill cut short is reported (a warning) and
    compiled again. The folder may be deleted at any time; it grows with every new graph
    (bound it with ``$JAX_COMPILATION_CACHE_MAX_SIZE``, bytes)."""
    import os

    import jax
    from pallas_kernels.native import cache_dir, cpu_tag

    if arg == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = (arg or os.environ.get("JAX_COMPILATION_CACHE_DIR")
            or str(cache_dir() / f"xla-{cpu_tag()}"))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path


def _publish(args) -> int:
    from serving._bundle import publish
    path = publish(args.model_dir, None, args.out, num_clusters=args.clusters,
                   nprobe=args.nprobe, k0=args.k0, merge=args.merge,
                   bloom_bits=args.bloom_bits, seed=args.seed, progress=True)
    print(path)
    return 0


def _query(args) -> int:
    from serving._retriever import Retriever
    compilation_cache(args.compilation_cache)
    r = Retriever.load(args.bundle, rank=args.rank)
    t = time.perf_counter()
    out = r.recommend(args.user, filter=args.filter, k=args.k, k0=args.k0,
                      exclude_seen=not args.include_seen)
    ms = (time.perf_counter() - t) * 1e3
    titles = r.titles(out.ids)
    if args.json:
        rows = [{"user": u, "items": [
            {"id": int(i), "title": tt, "score": float(s),
             "tasks": dict(zip(out.tasks, map(float, ts)))}
            for i, tt, s, ts in zip(out.ids[b], titles[b], out.scores[b], out.task_scores[b])]}
            for b, u in enumerate(args.user)]
        print(json.dumps(rows, indent=2))
        return 0
    for b, u in enumerate(args.user):
        print(f"user {u}" + (f"  filter: {args.filter}" if args.filter else ""))
        if not out.count[b]:
            print("  (no item passes the filter)")
        for rank, (i, tt, s, ts) in enumerate(zip(out.ids[b], titles[b], out.scores[b],
                                                   out.task_scores[b]), 1):
            preds = "  ".join(f"{n}={v:.3f}" for n, v in zip(out.tasks, ts))
            print(f"  {rank:>2}. {int(i):>7}  {tt[:48]:<48}  score={s:.4f}  {preds}")
    print(f"({ms:.0f} ms including compilation)", file=sys.stderr)
    return 0


def _export(args) -> int:
    from serving._retriever import Retriever
    try:
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    except ValueError:
        print(f"--batch-sizes must be comma-separated ints; got {args.batch_sizes!r}",
              file=sys.stderr)
        return 2
    r = Retriever.load(args.bundle)
    path = r.export(args.out, platform=args.platform, batch_sizes=sizes, k=args.k, k0=args.k0,
                    exclude_max=args.exclude_max)
    print(path)
    return 0


def _serve(args) -> int:
    try:
        from serving._server import ServerConfig, serve
    except ModuleNotFoundError as e:
        print(f"st-jax serve needs {e.name!r}: pip install 'st_jax[serve]' (starlette, "
              "uvicorn)", file=sys.stderr)
        return 2
    kw = {}
    if args.buckets:
        try:
            kw["buckets"] = tuple(int(x) for x in args.buckets.split(","))
        except ValueError:
            print(f"--buckets must be comma-separated ints; got {args.buckets!r}",
                  file=sys.stderr)
            return 2
    if args.fresh_capacity is not None:
        kw["fresh_capacity"] = args.fresh_capacity
    import jax
    compilation_cache(args.compilation_cache)
    if args.shard:
        import numpy as np
        from jax.sharding import Mesh
        kw["mesh"] = Mesh(np.array(jax.devices()), ("items",))
    if jax.default_backend() == "cpu":      # XLA:CPU temporaries: no per-call page faults
        from st_jax import tune_cpu_malloc
        tune_cpu_malloc()
    cfg = ServerConfig(bundle=args.bundle, max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, queue=args.queue,
                       max_users=args.max_users, max_k=args.max_k, poll_s=args.poll_s,
                       retriever_kw=kw, warmup_filters=tuple(args.warmup_filter),
                       durable=args.durable, auto_compact=args.auto_compact)
    serve(cfg, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _compact(args) -> int:
    from serving._bundle import compact
    from serving._retriever import Retriever
    t = time.perf_counter()
    r = Retriever.load(args.bundle, fresh_capacity=args.fresh_capacity, buckets=(1,))
    st = r.fresh_stats()
    path = compact(r)
    print(json.dumps({"version": path, "updates_folded": st["updates"],
                      "journal_seq": st["journal_seq"], "fresh_live": st["live"],
                      "seconds": round(time.perf_counter() - t, 3)}))
    return 0
