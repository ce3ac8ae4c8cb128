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

One language (--languages en) gives Mo. only: Cr., Mul. and the bias compare languages and
are reported as not applicable. Every setting is checked before the model or the data is
loaded; a bad one is answered with one line naming the flag (exit status 2), an error while
working with one line (exit status 1; MINIHBT_DEBUG=1 shows the traceback).
"""
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

import minihbt
from minihbt import cli, data
from minihbt.cli import AT_LEAST_1, Range, setting
from minihbt.comm import CommError, from_environment
from minihbt.config import ConfigError, ModelConfig
from minihbt.evaluation import center_languages, evaluate, not_applicable, number, summary_table
from minihbt.files import atomic_path, sha256_file, source_digest, stat_digest, write_json, write_text
from minihbt.weights import checkpoint_files

PROG = "evaluate.py"
DEFAULT_MAX_LENGTH = 512


@dataclass
class EvalSettings:
    """Every setting of an evaluation, a flag each; each default is written once, here."""
    model: str = setting(None, "Hugging Face model directory (config.json, safetensors, tokenizer.json)",
                         required=True)
    data: str = setting(None, "LAReQA directory with {lang}.json files (xquad-r or mlqa-r)", required=True)
    languages: Optional[str] = setting(None, "comma-separated subset, e.g. ar,de,en, or one language for Mo. only",
                                       default_text="every {lang}.json in --data")
    out: Optional[str] = setting(None, "write the results JSON here", default_text="none")
    report: Optional[str] = setting(None, "write a Markdown report here; a heatmap PNG goes beside it when "
                                          "matplotlib is installed", default_text="none")
    candidates: str = setting("sentence", "encode a candidate as its sentence alone or as the (sentence, "
                                          "paragraph) pair, as LAReQA does", choices=("sentence", "pair"))
    batch_size: int = setting(64, "encoding batch size", accepted=AT_LEAST_1)
    max_length: Optional[int] = setting(None, "max tokens per text, at most the model's positions", accepted=Range(2),
                                        default_text=f"{DEFAULT_MAX_LENGTH}, or the model's limit if lower")
    query_prefix: Optional[str] = setting(None, "prefix for questions", default_text="the model's 'query: '")
    passage_prefix: Optional[str] = setting(None, "prefix for candidates", default_text="the model's 'passage: '")
    pooling: Optional[str] = setting(None, "pooling", choices=("mean", "cls", "pooler"),
                                     default_text="the checkpoint's sentence-transformers config, else mean")
    device: str = setting("cpu", "cpu (NumPy) or cuda (CuPy)", choices=("cpu", "cuda"))
    center_languages: bool = setting(False, "training-free debiasing: subtract each language's mean query "
                                            "(candidate) embedding from its queries (candidates), then re-normalise; "
                                            "no labels used")
    sample: Optional[int] = setting(None, "a quick look: only the first N parallel question groups, ranked among "
                                          "the sentences of their paragraphs (a smaller ranking: the figures, marked "
                                          "as a sample, are not the whole set's)", accepted=AT_LEAST_1, metavar="N")
    cache: str = setting(".minihbt-cache", "directory for cached embeddings; '' to disable")


def check_args(argv):
    """(settings, languages, comm): every setting checked before anything is loaded, one line per
    problem, exit status 2; `languages`: --languages as a de-duplicated list of languages present
    in --data (None: all of them); `comm`: the ranks of this launch."""
    problems = cli.Problems()
    s, _ = cli.parse_settings(PROG, __doc__, EvalSettings, argv, problems)
    comm = ranks(s.device)
    languages = None
    if cli.check_input_dir("--model", s.model, problems) and s.max_length is not None:
        try:
            problem = ModelConfig.from_file(os.path.join(s.model, "config.json")).length_problem(s.max_length)
        except ConfigError:
            problem = None                             # the loader says what is wrong with config.json
        if problem:
            problems.bad_value("--max-length", s.max_length, problem)
    if cli.check_input_dir("--data", s.data, problems):
        present = sorted(f[:-5] for f in os.listdir(s.data) if f.endswith(".json"))
        if not present:
            problems.add(f"--data {s.data}: no {{lang}}.json files in it (expected e.g. data/xquad-r)")
        elif s.languages is not None:
            languages = cli.parse_list("--languages", s.languages, problems)
            missing = [lang for lang in languages if lang not in present]
            if missing:
                problems.add(f"--languages {','.join(missing)}: no {'.json, '.join(missing)}.json in {s.data}; "
                             f"expected names from {','.join(present)}")
    if s.report and os.path.splitext(s.report)[1].lower() == ".png":
        problems.add(f"--report {s.report}: the heatmap goes to a .png beside the report; name the report .md")
    if s.out and s.report and os.path.abspath(s.out) == os.path.abspath(s.report):
        problems.add(f"--out and --report are both {s.out}; expected two different files")
    cli.check_device("--device", s.device, problems)
    problems.stop_if_any()
    for flag, path in (("--out", s.out), ("--report", s.report)):
        if path:
            cli.check_output_file(flag, path, problems)
    if s.cache:
        cli.make_folder("--cache", s.cache, problems)
    problems.stop_if_any()
    return s, languages, comm


def fit_max_length(model, s):
    """--max-length, or the default lowered to the model's limit where that is shorter (a length
    the user gave was checked against the model's config.json in check_args)."""
    if s.max_length is None:
        if model.max_length < DEFAULT_MAX_LENGTH:
            print(f"--max-length: the model has {model.max_length} positions; using {model.max_length}",
                  file=sys.stderr)
        return min(DEFAULT_MAX_LENGTH, model.max_length)
    return s.max_length


def cache_key(model, rs, s):
    parts = {"minihbt": minihbt.__version__, "code": source_digest(), "device": model.device, "config": sha256_file(os.path.join(model.path, "config.json")),
             "tokenizer": sha256_file(os.path.join(model.path, "tokenizer.json")),
             "weights": [stat_digest(p) for p in checkpoint_files(model.path)],
             "data": [sha256_file(p) for p in rs.files], "pooling": model.pooling,
             "dtype": np.dtype(model.dtype).name, "max_length": s.max_length, "candidates": s.candidates,
             "prefixes": [s.query_prefix, s.passage_prefix], "sample": s.sample}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def encode_shard(model, texts, comm, pairs=None, **kw):
    """minihbt.encode of `texts`, split over the ranks of `comm` (rank r encodes the r-th of N
    contiguous slices) and gathered in order on every rank."""
    lo, hi = comm.rank * len(texts) // comm.size, (comm.rank + 1) * len(texts) // comm.size
    part = minihbt.encode(model, texts[lo:hi], pairs=pairs[lo:hi] if pairs is not None else None, **kw)
    return comm.allgather(part) if comm.size > 1 else part


def encode_all(model, rs, s, comm):
    """(query embeddings per language, candidate embeddings, whether from the cache), from the cache when present;
    over several ranks each encodes its share of every list (rank 0 writes the cache)."""
    path = None
    if s.cache:
        path = os.path.join(s.cache, f"{rs.name}-{cache_key(model, rs, s)}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                print(f"embeddings from cache {path}", file=sys.stderr)
                return {l: z["q_" + l] for l in rs.languages}, z["candidates"], True
    kw = dict(batch_size=s.batch_size, max_length=s.max_length, progress=comm.is_root)
    queries = {}
    for lang in rs.languages:
        texts = [q for _, q in rs.queries[lang]]
        queries[lang] = encode_shard(model, texts, comm, kind="query",
                                     prefix=True if s.query_prefix is None else s.query_prefix, **kw)
    pairs = rs.cand_context if s.candidates == "pair" else None
    cands = encode_shard(model, rs.cand_text, comm, kind="passage", pairs=pairs,
                         prefix=True if s.passage_prefix is None else s.passage_prefix, **kw)
    if path and comm.is_root:
        with atomic_path(path) as tmp:
            np.savez(tmp, candidates=cands, **{"q_" + l: e for l, e in queries.items()})
    return queries, cands, False


def pair_map(res, x, y):
    """The mAP of queries in x against candidates in y (Mo. where x == y); None if not computed."""
    figures = res["mono"]["per_language"][x] if x == y else res["cross"]["per_pair"].get(f"{x}-{y}")
    return figures["map"] if figures else None


def markdown_report(res, s):
    L = res["languages"]
    out = [f"# {res['dataset']}: {s.model}", ""] + ([f"**{res['sample']}**", ""] if "sample" in res else []) + [
           f"Candidates: {s.candidates}; {res['counts']['pooled_candidates']} pooled. "
           f"Dropped questions (answer in no sentence): {sum(res['counts']['dropped_no_sentence'].values())}.", "",
           "| | Mo. mAP | Mo. R@1 | Cr. mAP | Cr. R@1 | Mul. mAP | Mul. R@10 | bias |", "|---|---|---|---|---|---|---|---|"]
    for lang in L:
        cr = [v for k, v in res["cross"]["per_pair"].items() if k.startswith(lang + "-")]
        m, u = res["mono"]["per_language"][lang], res["multi"]["per_language"].get(lang, {})
        cr_map, cr_r1 = (np.mean([c[k] for c in cr]) if cr else None for k in ("map", "r@1"))
        out.append(f"| {lang} | {m['map']:.3f} | {m['r@1']:.3f} | {number(cr_map, '.3f')} | {number(cr_r1, '.3f')} | "
                   f"{number(u.get('map'), '.3f')} | {number(u.get('r@10'), '.3f')} | "
                   f"{number(res['bias']['per_language'].get(lang), '.1f')} |")
    out.append(f"| **mean** | {res['mono']['map']:.3f} | {res['mono']['r@1']:.3f} | "
               f"{number(res['cross']['map'], '.3f')} | {number(res['cross']['r@1'], '.3f')} | "
               f"{number(res['multi']['map'], '.3f')} | {number(res['multi']['r@10'], '.3f')} | "
               f"{number(res['bias']['rank_distance'], '.1f')} |")
    if not_applicable(res):
        out += ["", "One language: Cr., Mul. and bias compare languages and do not apply (n/a)."]
    out += ["", "Cr. mAP per pair (rows: query language, columns: candidate language; diagonal: Mo.)", "",
            "| q \\ c | " + " | ".join(L) + " |", "|---" * (len(L) + 1) + "|"]
    for x in L:
        maps = [pair_map(res, x, y) for y in L]
        out.append(f"| {x} | " + " | ".join("–" if m is None else f"{m:.3f}" for m in maps) + " |")
    out += ["", "Definitions:", ""] + [f"- {k}: {v}" for k, v in res["definitions"].items()]
    return "\n".join(out) + "\n"


def heatmap(res, path):
    try:                                        # matplotlib is optional: without it, no heatmap
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no heatmap", file=sys.stderr)
        return False
    L = res["languages"]
    mat = np.array([[pair_map(res, x, y) for y in L] for x in L], dtype=float)      # None: nan
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def write_outputs(res, s):
    """The results JSON (--out), the Markdown report and its heatmap (--report), each atomically."""
    if s.out:
        write_json(s.out, res, indent=1)
    if s.report:
        write_text(s.report, markdown_report(res, s))
        heatmap(res, os.path.splitext(s.report)[0] + ".png")


def ranks(device):
    """The ranks of this launch (mpirun -np N: the texts are encoded in N shards); only rank 0
    prints problems and results."""
    try:
        comm = from_environment(device)
    except CommError as e:
        raise cli.Stop(2, f"mpirun: {e}") from None
    cli.show_errors(comm.is_root)
    return comm


@cli.program(PROG)
def main(argv=None):
    s, languages, comm = check_args(argv)
    rs = data.load_lareqa(s.data, languages=languages)
    if s.sample is not None:
        rs, groups = data.first_groups(rs, s.sample)
        sample_note = (f"SAMPLE (--sample {s.sample}): the first {min(s.sample, groups)} of {groups} "
                       f"parallel question groups, {len(rs.cand_text)} candidates; not the whole set's figures")
    model = minihbt.load_model(s.model, device=s.device, pooling=s.pooling)
    s.max_length = fit_max_length(model, s)
    t0 = time.perf_counter()
    queries, cands, cached = encode_all(model, rs, s, comm)
    if not comm.is_root:                                    # mpirun: rank 0 computes the metrics, once
        return None
    if s.center_languages:                               # post hoc: the cache keeps the raw embeddings
        queries, cands = center_languages(queries, cands, rs.cand_lang)
    t1 = time.perf_counter()
    res = evaluate(rs, queries, cands, progress=True)
    res["center_languages"] = s.center_languages
    t2 = time.perf_counter()
    res["not_applicable"] = not_applicable(res)
    res["model"] = os.path.abspath(s.model)
    res["candidate_encoding"] = s.candidates
    res["seconds"] = {"encode": round(t1 - t0, 2), "retrieve_and_metrics": round(t2 - t1, 2),
                      "embeddings_from_cache": cached}
    if s.sample is not None:
        res["sample"] = sample_note
        print(sample_note)
    print(summary_table(res))
    write_outputs(res, s)
    return res


if __name__ == "__main__":
    main()
