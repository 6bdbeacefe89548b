"""`make demo`: the whole SilverTorch run — train -> publish -> serve -> export.

1. trains the multi-task two-tower + Mixture-of-Logits OverArch + Value Model on
   MovieLens-100K (a few CPU minutes; resumes from `--out` checkpoints; falls back to the
   synthetic catalogue, saying so, when MovieLens is not installed);
2. publishes the model and its catalogue as one bundle (Int8 index, Bloom/exact filters,
   bf16 embedding cache);
3. serves filtered recommendations for a few users with titles, from one jitted graph;
4. measures latency per batch and Recall@K on the held-out test items through the served graph,
   with and without the OverArch, and writes a plot;
5. exports the graph with `jax.export` and checks the artifact gives the same answers.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _load_or_train(args):
    import training
    from training._data import DatasetNotAvailableError
    cfg = training.tiny_config(progress=True) if args.tiny else training.TrainConfig(
        progress=True)
    if args.dataset == "movielens-100k":
        try:
            training.load_movielens_100k()
            cfg = cfg.replace(data=training.DataConfig("movielens-100k"))
        except DatasetNotAvailableError as e:
            print(f"!! MovieLens-100K is not available ({e}).\n!! Falling back to the "
                  "synthetic catalogue (planted tastes); run `make demo` for the real data.")
    else:
        cfg = cfg.replace(data=training.DataConfig("synthetic", cfg.data.synthetic
                                                   or training.SyntheticConfig()))
    out = os.path.join(args.out, "model")
    cfg = cfg.replace(out_dir=out, evaluate_at_end=False)
    try:
        model = training.load(out)
        print(f"[train] using the trained model in {out} (delete it to retrain)")
    except training.ModelNotFoundError:
        print(f"[train] {cfg.data.name}: two towers {cfg.steps} steps, OverArch "
              f"({cfg.overarch.kind}) {cfg.overarch.steps} steps -> {out}")
        t = time.perf_counter()
        model = training.train(cfg)
        print(f"[train] done in {time.perf_counter() - t:.0f} s")
    return model


def recall_through_graph(retriever, dataset, ks=(5, 10, 20, 50), split: str = "test"):
    """Recall@K of the held-out items of `split`, served by `retriever` with the users'
    earlier items excluded (each user has one held-out item: Recall@K = HR@K)."""
    held = dataset.split(split)
    seen = dataset.seen(split)
    users = held.user
    feats = {f: np.asarray(v)[users] for f, v in dataset.user_features.items()}
    exclude = [dataset.item_ids[seen.indices[seen.indptr[u]:seen.indptr[u + 1]]] for u in users]
    out = retriever(feats, k=max(ks), exclude=exclude)
    hit = out.ids == dataset.item_ids[held.item][:, None]
    return {k: float(hit[:, :k].any(axis=1).mean()) for k in ks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="movielens-100k", choices=("movielens-100k",
                                                                     "synthetic"))
    ap.add_argument("--out", default="runs/demo", help="model, bundle, export and plot")
    ap.add_argument("--tiny", action="store_true", help="seconds-long config (smoke test)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--filter", default=None,
                    help="filter for the showcase (default: a genre AND NOT a year)")
    args = ap.parse_args(argv)

    import jax

    import serving
    dev = jax.devices()[0]
    print(f"st_jax demo on {dev.platform} ({dev.device_kind})")
    model = _load_or_train(args)
    ds = model.dataset

    bundle = os.path.join(args.out, "bundle")
    t = time.perf_counter()
    serving.publish(model, None, bundle, progress=True)
    r = serving.Retriever.load(bundle)
    m = r.data.manifest
    print(f"[serve] bundle {r.path}: {m['index']['num_items']:,} items, "
          f"{'IVF' if m['index']['num_clusters'] else 'flat'} Int8 index, "
          f"{m['index']['bytes_per_item']:.0f} bytes/item, k0={r.default_k0} per task, "
          f"tasks {', '.join(r.tasks)}, Value Model '{m['model']['value_formula']}'")

    # --- showcase: filtered recommendations with titles -------------------------------------
    attrs = ds.item_attributes()
    genres = sorted({g for gs in attrs["genres"] for g in gs})
    genre = "Comedy" if "Comedy" in genres else genres[0]
    year = 1995 if args.dataset == "movielens-100k" and "Comedy" in genres else \
        int(np.median([y for y in attrs["year"] if y]))
    filt = args.filter or f"genres:{genre} AND NOT year:{year}"
    users = ds.user_ids[:3]
    out = r.recommend(users, filter=filt, k=args.k)
    titles = r.titles(out.ids)
    by_id = ds.item_attributes_by_id()
    for b, u in enumerate(users):
        print(f"\nuser {u}: top {args.k} for '{filt}' (seen items excluded)")
        for rank, (i, tt, s, ts) in enumerate(zip(out.ids[b], titles[b], out.scores[b],
                                                   out.task_scores[b]), 1):
            a = by_id[int(i)]
            preds = " ".join(f"{n}={v:.2f}" for n, v in zip(out.tasks, ts))
            print(f"  {rank:>2}. {tt[:40]:<40} {a['year']}  {'|'.join(a['genres'])[:28]:<28} "
                  f"value={s:.3f} {preds}")

    # --- latency per batch ------------------------------------------------------------------
    from st_jax._timing import median_seconds
    lat = {}
    for b in (1, 32, 128):
        uid = ds.user_ids[np.arange(b) % ds.num_users]
        lat[b] = median_seconds(lambda: r.recommend(uid, filter=filt, k=args.k).ids)
    print("\n[latency] whole graph (user tower -> filtered Int8 top-k0 per task -> merge -> "
          "OverArch -> Value Model), median per batch:")
    for b, s in lat.items():
        print(f"  batch {b:>4}: {s * 1e3:7.1f} ms  ({b / s:,.0f} users/s)")

    # --- quality through the served graph ---------------------------------------------------
    ks = (5, 10, 20, 50)
    rec_oa = recall_through_graph(r, ds, ks)
    rec_tt = recall_through_graph(r.with_options(rank="retrieval"), ds, ks)
    pop = ds.item_popularity()
    held, seen = ds.test, ds.seen("test")
    mask = seen.dense_mask(held.user, ds.num_items)
    pop_rank = np.argsort(-np.where(mask, -np.inf, pop[None, :]), axis=1)[:, :max(ks)]
    hit = pop_rank == held.item[:, None]
    rec_pop = {k: float(hit[:, :k].any(axis=1).mean()) for k in ks}
    print(f"\n[quality] Recall@K on the {len(held)} test items (train/valid items excluded):")
    print(f"  {'K':>4} {'popularity':>11} {'two-tower':>10} {'+ OverArch':>11} {'gain':>7}")
    for k in ks:
        gain = rec_oa[k] / rec_tt[k] - 1 if rec_tt[k] else float("nan")
        print(f"  {k:>4} {rec_pop[k]:>11.4f} {rec_tt[k]:>10.4f} {rec_oa[k]:>11.4f} "
              f"{gain:>+7.1%}")
    plot = os.path.join(args.out, "demo_recall.png")
    _plot(plot, ks, rec_pop, rec_tt, rec_oa, lat, ds.name)
    print(f"  plot: {plot}")

    # --- export and run without the model code ------------------------------------------------
    art = os.path.join(args.out, "export-cpu")
    t = time.perf_counter()
    r.export(art, platform="cpu", batch_sizes=(1, 8), k=args.k, exclude_max=1024)
    ex = serving.load_exported(art)
    same = np.array_equal(ex.recommend(users, filter=filt, k=args.k).ids, out.ids)
    print(f"\n[export] jax.export artifacts in {art} ({time.perf_counter() - t:.0f} s); "
          f"exported graph gives the same top-{args.k}: {same}")
    summary = {"dataset": ds.name, "device": dev.device_kind, "recall_overarch": rec_oa,
               "recall_two_tower": rec_tt, "recall_popularity": rec_pop,
               "latency_ms": {b: s * 1e3 for b, s in lat.items()}, "export_equal": same}
    with open(os.path.join(args.out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if not same:
        raise SystemExit("exported graph disagrees with the in-process graph")


def _plot(path, ks, pop, tt, oa, lat, name):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("  (matplotlib not installed: no plot)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for lab, d in (("popularity", pop), ("two-tower", tt), ("two-tower + OverArch", oa)):
        a.plot(ks, [d[k] for k in ks], marker="o", label=lab)
    a.set_xlabel("K")
    a.set_ylabel("Recall@K (test)")
    a.set_title(f"{name}: served graph")
    a.legend()
    bs = sorted(lat)
    b.bar([str(x) for x in bs], [lat[x] * 1e3 for x in bs])
    b.set_xlabel("batch size")
    b.set_ylabel("ms per batch (median)")
    b.set_title("whole-graph latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
