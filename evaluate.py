"""Evaluate a retriever on XQuAD-R / MLQA-R: exact retrieval, mAP, recall and language bias.

    python evaluate.py --model weights/multilingual-e5-small --data ../shared/data/xquad-r

Encodes every question (as `query: ...`) and every candidate sentence (as `passage: ...`)
with minihbt.encode, ranks all candidates exactly (Q @ C^T), and reports the paper's
settings: Mo. (X against X), Cr. (X against Y, every ordered pair), Mul. (X against the
pooled candidates of all languages), with per-language and per-pair figures, macro means
and the language bias (rank distance) of the Mul. ranking. Definitions: minihbt/metrics.py
and the "definitions" key of the JSON.

Embeddings are cached on disk (--cache), keyed by the model files, the data files and the
encoding options, so re-running the metrics is instant.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def file_digest(path, full=True):
    """sha256 of a file's bytes (full=True) or of its name, size and mtime (cheap, for big weights)."""
    h = hashlib.sha256()
    if full:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(model, rs, args):
    import minihbt
    from minihbt.weights import checkpoint_files

    parts = {"minihbt": minihbt.__version__, "config": file_digest(os.path.join(model.path, "config.json")),
             "tokenizer": file_digest(os.path.join(model.path, "tokenizer.json")),
             "weights": [file_digest(p, full=False) for p in checkpoint_files(model.path)],
             "data": [file_digest(p) for p in rs.files], "pooling": model.pooling,
             "dtype": np.dtype(model.dtype).name, "max_length": args.max_length, "candidates": args.candidates,
             "prefixes": [args.query_prefix, args.passage_prefix]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def encode_all(model, rs, args):
    """Query embeddings per language and candidate embeddings, from the cache when present."""
    import minihbt

    path = None
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
        path = os.path.join(args.cache, f"{rs.name}-{cache_key(model, rs, args)}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                print(f"embeddings from cache {path}", file=sys.stderr)
                args.cached = True
                return {l: z["q_" + l] for l in rs.languages}, z["candidates"]
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, progress=True)
    queries = {}
    for lang in rs.languages:
        texts = [q for _, q in rs.queries[lang]]
        queries[lang] = minihbt.encode(model, texts, kind="query", prefix=True if args.query_prefix is None else args.query_prefix, **kw)
    pairs = rs.cand_context if args.candidates == "pair" else None
    cands = minihbt.encode(model, rs.cand_text, kind="passage", prefix=True if args.passage_prefix is None else args.passage_prefix,
                           pairs=pairs, **kw)
    if path:
        tmp = path + ".tmp.npz"
        np.savez(tmp, candidates=cands, **{"q_" + l: e for l, e in queries.items()})
        os.replace(tmp, path)
    return queries, cands


def summary_table(res):
    rows = [("Mo.", "map", res["mono"]["map"]), ("Mo.", "r@1", res["mono"]["r@1"]),
            ("Cr.", "map", res["cross"]["map"]), ("Cr.", "r@1", res["cross"]["r@1"]),
            ("Mul.", "map", res["multi"]["map"]), ("Mul.", "r@10", res["multi"]["r@10"])]
    lines = [f"{res['dataset']}: {len(res['languages'])} languages, "
             f"{sum(res['counts']['queries'].values())} queries, {res['counts']['pooled_candidates']} candidates",
             f"{'setting':8s}{'metric':8s}{'value':>8s}"]
    lines += [f"{s:8s}{m:8s}{v:8.3f}" for s, m, v in rows]
    lines.append(f"{'Mul.':8s}{'bias':8s}{res['bias']['rank_distance']:8.1f}   (mean rank distance, lower is better)")
    return "\n".join(lines)


def markdown_report(res, args):
    L = res["languages"]
    out = [f"# {res['dataset']}: {args.model}", "",
           f"Candidates: {args.candidates}; {res['counts']['pooled_candidates']} pooled. "
           f"Dropped questions (answer in no sentence): {sum(res['counts']['dropped_no_sentence'].values())}.", "",
           "| | Mo. mAP | Mo. R@1 | Cr. mAP | Cr. R@1 | Mul. mAP | Mul. R@10 | bias |", "|---|---|---|---|---|---|---|---|"]
    for lang in L:
        cr = [v for k, v in res["cross"]["per_pair"].items() if k.startswith(lang + "-")]
        m, u = res["mono"]["per_language"][lang], res["multi"]["per_language"][lang]
        out.append(f"| {lang} | {m['map']:.3f} | {m['r@1']:.3f} | {np.mean([c['map'] for c in cr]):.3f} | "
                   f"{np.mean([c['r@1'] for c in cr]):.3f} | {u['map']:.3f} | {u['r@10']:.3f} | "
                   f"{res['bias']['per_language'][lang]:.1f} |")
    out.append(f"| **mean** | {res['mono']['map']:.3f} | {res['mono']['r@1']:.3f} | {res['cross']['map']:.3f} | "
               f"{res['cross']['r@1']:.3f} | {res['multi']['map']:.3f} | {res['multi']['r@10']:.3f} | "
               f"{res['bias']['rank_distance']:.1f} |")
    out += ["", "Cr. mAP per pair (rows: query language, columns: candidate language; diagonal: Mo.)", "",
            "| q \\ c | " + " | ".join(L) + " |", "|---" * (len(L) + 1) + "|"]
    for x in L:
        cells = []
        for y in L:
            v = res["mono"]["per_language"][x] if x == y else res["cross"]["per_pair"].get(f"{x}-{y}")
            cells.append(f"{v['map']:.3f}" if v else "–")
        out.append(f"| {x} | " + " | ".join(cells) + " |")
    out += ["", "Definitions:", ""] + [f"- {k}: {v}" for k, v in res["definitions"].items()]
    return "\n".join(out) + "\n"


def heatmap(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no heatmap", file=sys.stderr)
        return False
    L = res["languages"]
    mat = np.full((len(L), len(L)), np.nan)
    for i, x in enumerate(L):
        for j, y in enumerate(L):
            v = res["mono"]["per_language"][x] if x == y else res["cross"]["per_pair"].get(f"{x}-{y}")
            if v:
                mat[i, j] = v["map"]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(L), 0.8 + 0.6 * len(L)))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(L)), L)
    ax.set_yticks(range(len(L)), L)
    ax.set_xlabel("candidate language")
    ax.set_ylabel("query language")
    for i in range(len(L)):
        for j in range(len(L)):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.6 else "black")
    ax.set_title(f"{res['dataset']}: mAP")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    ap.add_argument("--data", required=True, help="LAReQA directory with {lang}.json files (xquad-r or mlqa-r)")
    ap.add_argument("--languages", help="comma-separated subset, e.g. ar,de,en (default: every {lang}.json in --data)")
    ap.add_argument("--out", help="write the results JSON here (default: none)")
    ap.add_argument("--report", help="write a Markdown report here; a heatmap PNG goes beside it when matplotlib is "
                                     "installed (default: none)")
    ap.add_argument("--candidates", choices=["sentence", "pair"], default="sentence",
                    help="encode a candidate as its sentence alone (default) or as the (sentence, paragraph) pair, "
                         "as LAReQA does")
    ap.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default 64)")
    ap.add_argument("--max-length", type=int, default=None,
                    help="max tokens per text (default: the model's maximum, 512 for XLM-R and BERT checkpoints)")
    ap.add_argument("--query-prefix", default=None, help="prefix for questions (default: the model's 'query: ')")
    ap.add_argument("--passage-prefix", default=None, help="prefix for candidates (default: the model's 'passage: ')")
    ap.add_argument("--pooling", choices=["mean", "cls", "pooler"], default=None,
                    help="pooling (default: the checkpoint's sentence-transformers config, else mean)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (NumPy, default) or cuda (CuPy)")
    ap.add_argument("--center-languages", action="store_true",
                    help="training-free debiasing: subtract each language's mean query (candidate) embedding from its "
                         "queries (candidates), then re-normalise; no labels used (default off)")
    ap.add_argument("--cache", default=os.path.join(os.getcwd(), ".minihbt-cache"),
                    help="directory for cached embeddings (default ./.minihbt-cache); '' to disable")
    args = ap.parse_args(argv)

    import minihbt
    from minihbt.data import DataError, load_lareqa
    from minihbt.evaluation import evaluate

    try:
        rs = load_lareqa(args.data, languages=args.languages.split(",") if args.languages else None)
        model = minihbt.load_model(args.model, device=args.device, pooling=args.pooling)
    except (DataError, minihbt.CheckpointError, minihbt.ConfigError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: {e}")
    t0 = time.perf_counter()
    queries, cands = encode_all(model, rs, args)
    if args.center_languages:                               # post-hoc: the cache keeps the raw embeddings
        from minihbt.evaluation import center_languages
        queries, cands = center_languages(queries, cands, rs.cand_lang)
    t1 = time.perf_counter()
    res = evaluate(rs, queries, cands, progress=True)
    res["center_languages"] = args.center_languages
    t2 = time.perf_counter()
    res["model"] = os.path.abspath(args.model)
    res["candidate_encoding"] = args.candidates
    res["seconds"] = {"encode": round(t1 - t0, 2), "retrieve_and_metrics": round(t2 - t1, 2),
                      "embeddings_from_cache": bool(getattr(args, "cached", False))}
    print(summary_table(res))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(markdown_report(res, args))
        heatmap(res, os.path.splitext(args.report)[0] + ".png")
    return res


if __name__ == "__main__":
    main()
