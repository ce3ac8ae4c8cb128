"""Download checkpoints and evaluation data, verified and resumable.

    python -m minihbt.download NAME... [--dir DIR] [--from LOCAL_DIR] [--force] [--quiet]

NAME is a model (a short alias from MODELS, or any Hugging Face repo id ``owner/name``) or
a dataset from DATASETS (xquad-r, mlqa-r, mlqa). Models go to ``weights/<alias-or-repo-name>``,
datasets to ``data/<name>``, unless ``--dir`` says otherwise.

Every file is written to ``FILE.part`` and renamed into place only once it is complete and
its SHA-256 matches (datasets are pinned to a commit and a checksum; Hugging Face models
have no pinned checksum here, only the transfer's length is checked). A wrong checksum
deletes the download and raises, naming file, URL, expected and actual hash. An interrupted
transfer leaves ``FILE.part``; the next run resumes it with an HTTP Range request (and
starts over if the server ignores the range). Files already present with the right
checksum are skipped; ``--force`` downloads them again.

``--from DIR`` copies from a local mirror instead of the network, with the same checks.
Python API: ``fetch``, ``download_model``, ``download_dataset``; every failure is a
``DownloadError`` with a message meant for people.
"""
import json
import os
import re
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import List, Optional

from .cli import Problems, build_settings, make_folder, parser, program, setting
from .sources import (DATASETS, ENV_GITHUB, ENV_HF, GITHUB_RAW, HF_ENDPOINT, MODELS, OPTIONAL_MODEL_FILES,
                      REQUIRED_MODEL_FILES, TIMEOUT, WEIGHTS_FILE, WEIGHTS_INDEX)
from .transfer import DownloadError, copy_file, fetch

PROG = "python -m minihbt.download"


def resolve_model(name):
    """(repo id, default directory name) for an alias or an owner/name repo id."""
    if name in MODELS:
        return MODELS[name], name
    for alias, repo in MODELS.items():
        if name.lower() == repo.lower():
            return repo, alias
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name, name.split("/")[1]
    raise DownloadError(f"unknown name {name!r}: models are {', '.join(MODELS)} or any Hugging Face "
                        f"repo id owner/name; datasets are {', '.join(DATASETS)}.")


def _shard_names(index_path):
    try:
        with open(index_path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DownloadError(f"{index_path} is not a safetensors index ({e!r}); delete it and retry.")
    for s in shards:
        if os.path.isabs(s) or ".." in s.replace("\\", "/").split("/"):
            raise DownloadError(f"{index_path} names a shard outside the model directory: {s!r}")
    return shards


def download_model(name, out_dir=None, endpoint=None, mirror=None, progress=True, force=False,
                   revision="main", timeout=TIMEOUT):
    """Fetch a model's Hugging Face files into out_dir (default weights/<alias-or-repo-name>).

    endpoint replaces https://huggingface.co (default: $MINIHBT_HF_ENDPOINT, then $HF_ENDPOINT);
    mirror is a local Hugging Face model directory to copy from instead. Returns out_dir.
    """
    repo, short = resolve_model(name)
    out_dir = os.fspath(out_dir) if out_dir else os.path.join("weights", short)
    endpoint = (endpoint or os.environ.get(ENV_HF) or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")

    def get(fname, required):
        dest = os.path.join(out_dir, *fname.split("/"))
        if mirror is not None:
            src = os.path.join(os.fspath(mirror), *fname.split("/"))
            if not os.path.isfile(src):
                if required:
                    raise DownloadError(f"{fname} is missing from the local model directory "
                                        f"{mirror} ({src} not found).")
                return False
            copy_file(src, dest, None, progress, force)
            return True
        url = f"{endpoint}/{urllib.parse.quote(repo)}/resolve/{urllib.parse.quote(revision, safe='')}/" \
              f"{urllib.parse.quote(fname)}"
        try:
            fetch(url, dest, None, progress, force, timeout)
        except DownloadError as e:
            if e.status == 404 and not required:
                return False
            if e.status == 404:
                raise DownloadError(f"{repo} has no required file {fname}: {e}", url=url, status=404) from None
            raise
        return True

    for fname in REQUIRED_MODEL_FILES:
        get(fname, True)
    if get(WEIGHTS_INDEX, False):
        for shard in _shard_names(os.path.join(out_dir, WEIGHTS_INDEX)):
            get(shard, True)
    else:
        try:
            get(WEIGHTS_FILE, True)
        except DownloadError as e:
            raise DownloadError(f"{e}\nNeither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} was found; minihbt "
                                f"reads safetensors only (not pytorch_model.bin).", e.url, e.status) from None
    for fname in OPTIONAL_MODEL_FILES:
        get(fname, False)
    return out_dir


# ---------------------------------------------------------------- datasets

def download_dataset(name, out_dir=None, base_url=None, mirror=None, progress=True, force=False,
                     timeout=TIMEOUT):
    """Fetch a pinned dataset into out_dir (default data/<name>), every file checked by sha256.

    base_url replaces https://raw.githubusercontent.com (default: $MINIHBT_GITHUB_RAW); mirror is
    a folder laid out like ../shared/data (mirror/<name>/<file>) to copy from. Returns out_dir.
    """
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}.")
    spec = DATASETS[name]
    out_dir = os.fspath(out_dir) if out_dir else os.path.join("data", name)
    base = (base_url or os.environ.get(ENV_GITHUB) or GITHUB_RAW).rstrip("/")
    for rel, sha in spec["files"].items():
        dest = os.path.join(out_dir, *rel.split("/"))
        if mirror is not None:
            src = os.path.join(os.fspath(mirror), name, *rel.split("/"))
            if not os.path.isfile(src):
                raise DownloadError(f"{name}: {rel} not found in the local mirror {mirror} (looked for "
                                    f"{src}); --from expects a folder laid out like ../shared/data, "
                                    f"with {name}/{rel} inside.")
            copy_file(src, dest, sha, progress, force)
        else:
            url = f"{base}/{spec['repo']}/{spec['commit']}/{urllib.parse.quote(spec['prefix'] + rel)}"
            fetch(url, dest, sha, progress, force, timeout)
    return out_dir


# ---------------------------------------------------------------- command line

def _epilog():
    models = "\n".join(f"  {a:<24}{r}" for a, r in MODELS.items())
    data = "\n".join(f"  {n:<24}{len(s['files'])} files from github.com/{s['repo']} @ {s['commit'][:10]}"
                     for n, s in DATASETS.items())
    return f"""\
models (alias -> Hugging Face repo; any other owner/name repo id works too):
{models}
  files: {', '.join(REQUIRED_MODEL_FILES)}, and {WEIGHTS_FILE}
         (or {WEIGHTS_INDEX} and every shard it names);
         if the repo has them: {', '.join(OPTIONAL_MODEL_FILES[:3])},
         {', '.join(OPTIONAL_MODEL_FILES[3:])}

datasets (pinned commit, every file checked against its sha256):
{data}

where files go: models to weights/<alias-or-repo-name>, datasets to data/<name> (or --dir).

--from DIR, a local mirror instead of the network (files are copied, never linked):
  dataset: DIR laid out like ../shared/data, i.e. DIR/xquad-r/ar.json, DIR/mlqa-r/ar.json,
           DIR/mlqa/MLQA_V1/dev/dev-context-ar-question-ar.json
  model:   DIR is a Hugging Face model directory (config.json, tokenizer.json, model.safetensors),
           e.g. one built by: python ../shared/tools/build_me5_small.py DIR

environment:
  {ENV_HF}   replaces {HF_ENDPOINT} (else HF_ENDPOINT is used if set)
  {ENV_GITHUB}    replaces {GITHUB_RAW}
  http_proxy / https_proxy are honoured.

An interrupted download leaves FILE.part; running the same command again resumes it.

examples:
  python -m minihbt.download multilingual-e5-small xquad-r mlqa-r
  python -m minihbt.download xquad-r mlqa-r mlqa --from ../shared/data
  python -m minihbt.download intfloat/multilingual-e5-base --dir weights/me5-base
"""


@dataclass
class DownloadSettings:
    names: List[str] = setting(None, "model alias, owner/name repo id, or dataset", positional=True, repeat=True,
                               metavar="NAME")
    dir: Optional[str] = setting(None, "output directory (only with a single NAME)")
    force: bool = setting(False, "download again files already present")
    quiet: bool = setting(False, "no progress bars or messages")


def check_args(argv):
    """(settings, --from, names), every argument checked before anything is fetched: bad ones
    end the program (cli.Stop, exit status 2) with one line per problem."""
    problems = Problems()
    ap = parser(PROG, "Download models (Hugging Face) and evaluation datasets (pinned GitHub commits), verified, "
                      "atomic and resumable.", DownloadSettings, epilog=_epilog())
    ap.add_argument("--from", dest="mirror", metavar="LOCAL_DIR",       # a Python keyword: no field of that name
                    help="copy from this local mirror instead of the network (see below)")
    namespace = vars(ap.parse_args(argv))
    mirror = namespace.pop("mirror", None)
    args = build_settings(DownloadSettings, namespace, {}, problems)
    names = list(dict.fromkeys(args.names or []))       # a name given twice is fetched once
    models = [n for n in names if n not in DATASETS]
    for n in models:
        try:
            resolve_model(n)
        except DownloadError as e:
            problems.add(f"NAME {n!r}: {e}")
    if args.dir and len(names) > 1:
        problems.add(f"--dir {args.dir}: takes a single NAME; run once per model or dataset.")
    if mirror:
        if not os.path.isdir(mirror):
            problems.add(f"--from {mirror}: no such directory.")
        elif len(models) > 1:
            problems.add("--from with a model is one model directory; give one model per run.")
        for n in names:
            if n in DATASETS and os.path.isdir(mirror) and not os.path.isdir(os.path.join(mirror, n)):
                problems.add(f"--from {mirror}: no {n}/ folder in it; expected a folder laid out like "
                             f"../shared/data, with {n}/ inside.")
        if models and os.path.isdir(mirror) and not os.path.isfile(os.path.join(mirror, "config.json")):
            problems.add(f"--from {mirror}: no config.json in it; for a model, --from is a Hugging Face "
                         "model directory.")
    if not problems.lines and args.dir:
        make_folder("--dir", args.dir, problems)
    problems.stop_if_any()
    return args, mirror, names


@program(PROG)
def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 error, 130 interrupted); bad
    arguments raise cli.Stop (exit status 2)."""
    args, mirror, names = check_args(argv)
    try:
        for n in names:
            download = download_dataset if n in DATASETS else download_model
            out = download(n, args.dir, mirror=mirror, progress=not args.quiet, force=args.force)
            print(f"{n}: {out}")
    except (DownloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
