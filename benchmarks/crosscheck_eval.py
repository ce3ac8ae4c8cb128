"""An independent evaluation pipeline to check evaluate.py against: sentence-transformers
encoding + scikit-learn average precision, with its own data reading and ranking code.

    python benchmarks/crosscheck_eval.py --model DIR --data ../shared/data/xquad-r \\
        --minihbt results/xquad-r_multilingual-e5-small.json [--out crosscheck.json]

Needs torch, sentence-transformers and scikit-learn. Prints both pipelines' macro figures
side by side with their differences. Definitions as in the HBT/LAReQA protocol: AP over the
full candidate list (sklearn average_precision_score), R@1 / R@10 as the fraction of
relevant candidates in the top k, bias = max - min rank of the parallel relevant
candidates in the pooled ranking (ranks from a stable descending sort).
"""
import argparse
import json
import os

import numpy as np


def read(data_dir, langs):
    cands, cand_lang, queries, gold = [], [], {}, {}
    for lang in langs:
        with open(os.path.join(data_dir, f"{lang}.json"), encoding="utf-8") as f:
            doc = json.load(f)
        queries[lang] = []
        for art in doc["data"]:
            for p in art["paragraphs"]:
                base = len(cands)
                cands += p["sentences"]
                cand_lang += [lang] * len(p["sentences"])
                for qa in p["qas"]:
                    a = qa["answers"][0]["answer_start"]
                    k = next(i for i, (b, e) in enumerate(p["sentence_breaks"]) if b <= a < e)
                    queries[lang].append((qa["id"], qa["question"]))
                    gold[(qa["id"], lang)] = base + k
    return cands, np.array(cand_lang), queries, gold


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--minihbt", help="evaluate.py's results JSON to compare with")
    ap.add_argument("--languages", default="ar,de,el,en,es,hi,ru,th,tr,vi,zh")
    ap.add_argument("--out", help="write this pipeline's figures here")
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer
    from sklearn.metrics import average_precision_score

    langs = args.languages.split(",")
    cands, cand_lang, queries, gold = read(args.data, langs)
    st = SentenceTransformer(args.model, device="cpu")
    enc = lambda texts: st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=True)
    C = enc(["passage: " + c for c in cands])
    Q = {l: enc(["query: " + q for _, q in queries[l]]) for l in langs}

    def ap_r(scores, relevant, ks):
        y = np.zeros(len(scores), dtype=int)
        y[relevant] = 1
        order = np.argsort(-scores, kind="stable")
        ranks = np.flatnonzero(y[order])
        return average_precision_score(y, scores), {k: (ranks < k).mean() for k in ks}, ranks

    mono, cross, multi, bias = {}, {}, {}, {}
    for x in langs:
        for y in langs:
            idx = np.flatnonzero(cand_lang == y)
            pos = {g: i for i, g in enumerate(idx)}
            S = Q[x] @ C[idx].T
            aps, r1 = [], []
            for qi, (qid, _) in enumerate(queries[x]):
                if (qid, y) not in gold:
                    continue
                a, r, _ = ap_r(S[qi], [pos[gold[(qid, y)]]], (1,))
                aps.append(a)
                r1.append(r[1])
            if aps:
                (mono.__setitem__(x, (np.mean(aps), np.mean(r1))) if x == y else
                 cross.__setitem__(f"{x}-{y}", (np.mean(aps), np.mean(r1))))
        S = Q[x] @ C.T
        aps, r10, dist = [], [], []
        for qi, (qid, _) in enumerate(queries[x]):
            rel = [gold[(qid, l)] for l in langs if (qid, l) in gold]
            a, r, ranks = ap_r(S[qi], rel, (10,))
            aps.append(a)
            r10.append(r[10])
            dist.append(ranks.max() - ranks.min())
        multi[x] = (np.mean(aps), np.mean(r10))
        bias[x] = float(np.mean(dist))
    mine = {"mono": {"map": np.mean([v[0] for v in mono.values()]), "r@1": np.mean([v[1] for v in mono.values()])},
            "cross": {"map": np.mean([v[0] for v in cross.values()]), "r@1": np.mean([v[1] for v in cross.values()])},
            "multi": {"map": np.mean([v[0] for v in multi.values()]), "r@10": np.mean([v[1] for v in multi.values()])},
            "bias": {"rank_distance": float(np.mean(list(bias.values())))}}
    rows = [("mono", "map"), ("mono", "r@1"), ("cross", "map"), ("cross", "r@1"), ("multi", "map"),
            ("multi", "r@10"), ("bias", "rank_distance")]
    other = None
    if args.minihbt:
        with open(args.minihbt, encoding="utf-8") as f:
            other = json.load(f)
    print(f"{'setting':8s}{'metric':15s}{'crosscheck':>12s}" + (f"{'minihbt':>12s}{'diff':>12s}" if other else ""))
    for s, m in rows:
        line = f"{s:8s}{m:15s}{mine[s][m]:12.4f}"
        if other:
            line += f"{other[s][m]:12.4f}{other[s][m] - mine[s][m]:12.2e}"
        print(line)
    if other:
        per = max(abs(other["mono"]["per_language"][l]["map"] - mono[l][0]) for l in langs)
        print(f"largest per-language Mo. mAP difference: {per:.2e}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"macro": mine, "mono": mono, "cross": cross, "multi": multi, "bias": bias}, f, indent=1,
                      default=float)


if __name__ == "__main__":
    main()
