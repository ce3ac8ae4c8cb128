"""The Python side of benchmarks/gpu_check.sh (read that script's header first).

    python benchmarks/gpu_check.py prepare [--from DIR] [--data-from DIR] [--force]
    python benchmarks/gpu_check.py probe   --out DIR [--device cuda|cpu]
    python benchmarks/gpu_check.py stage N --out DIR --work DIR --limit S [--device cuda|cpu] [--smoke]
    python benchmarks/gpu_check.py status  --out DIR N --status S --rc RC --seconds S --limit S
    python benchmarks/gpu_check.py summary --out DIR

prepare  copies what the device machine needs and cannot get (no ../shared there, no
         internet) into git-ignored folders that the run tool's `carry` takes along:
         weights/xlmr-tokenizer/ (XLM-R tokenizer, from an HF directory of
         multilingual-e5-small, else built from ../shared) and data/xquad-r-en-de/.
probe    stage 0: the GPU, driver, CuPy, CUDA, torch versions; exit 3 with the one line
         "gpu_check: no GPU (<reason>)" where CuPy sees no GPU.
stage N  stages 1-5 (see gpu_check.sh), each recording into OUT/gpu_check.json as it goes.
status   records the shell's outcome of a stage (finished, timed out, ...).
summary  prints one line per stage and check (and per part that needs a GPU and did not run:
         NEEDS-GPU, neither passed nor failed), adds all_passed to OUT/gpu_check.json; exit
         0 only if every stage finished and every check passed.
Everything goes into OUT/gpu_check.json as it happens (the run tool returns at most 8
files from $OUT; this run leaves two there: that and gpu_check.log).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = {1: "pytest tests", 2: "fused kernels vs references", 3: "training step vs PyTorch",
          4: "encoding vs sentence-transformers, retrieval vs torch", 5: "CPU vs GPU training steps"}
NO_GPU_EXIT = 3


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is answered with one line (naming it) and exit code 2."""

    def error(self, message):
        fail(f"{self.prog}: {message} (see --help)")


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def no_gpu_reason():
    """None where CuPy sees a GPU, else why not (one line)."""
    try:
        import cupy
    except Exception as e:
        return f"CuPy is not importable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
    return None if n > 0 else "CuPy sees 0 devices"


def versions(device):
    """What this machine has, as a dict (printed by probe)."""
    import numpy
    info = {"python": sys.version.split()[0], "numpy": numpy.__version__}
    if device == "cuda":
        import cupy
        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        info.update({"gpu": props["name"].decode(), "compute_capability": f"{props['major']}.{props['minor']}",
                     "gpu_memory_gib": round(props["totalGlobalMem"] / 2 ** 30, 1), "cupy": cupy.__version__,
                     "cuda_runtime": rt.runtimeGetVersion(), "cuda_driver_api": rt.driverGetVersion()})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"not available ({e})"
    for name in ("torch", "transformers", "sentence_transformers"):
        try:
            module = __import__(name)
            info[name] = module.__version__
        except Exception as e:
            info[name] = f"not importable ({type(e).__name__})"
    if device == "cuda" and not str(info["torch"]).startswith("not"):
        import torch
        info["torch_cuda"] = f"{torch.version.cuda}, available: {torch.cuda.is_available()}"
    info["cpu_count"] = os.cpu_count()
    return info


def probe(args):
    if args.device == "cuda":
        reason = no_gpu_reason()
        if reason:
            print(f"gpu_check: no GPU ({reason})")
            return NO_GPU_EXIT
    from gpu_check_common import update_report     # imports minihbt: after the GPU question is answered
    info = versions(args.device)
    for k, v in info.items():
        print(f"  {k}: {v}")
    update_report(args.out, 0, {"name": "machine", "figures": info, "checks": [], "notes": []})
    return 0


def stage(args):
    from gpu_check_common import StageRecord
    import gpu_check_encode
    import gpu_check_parity
    import gpu_check_step
    import gpu_check_tests
    run = {1: gpu_check_tests.stage1, 2: gpu_check_tests.stage2, 3: gpu_check_step.stage3,
           4: gpu_check_encode.stage4, 5: gpu_check_parity.stage5}[args.n]
    rec = StageRecord(args.out, args.n, STAGES[args.n])
    if args.smoke:
        rec.note("smoke run: tiny sizes, checks of the code paths; its figures are not measurements")
    run(args, rec)
    return 0


def status(args):
    """The shell's outcome of one stage (finished / timed out / failed / skipped), merged in."""
    from gpu_check_common import update_report
    update_report(args.out, args.n, {"name": STAGES[args.n], "status": args.status, "exit_code": args.rc,
                                     "seconds": args.seconds, "limit_s": args.limit})
    return 0


def summary(args):
    """Prints one line per stage, per check and per part that needs a GPU (not run, not failed);
    adds all_passed to OUT/gpu_check.json. Exit 0 only where every stage finished and every check passed."""
    from gpu_check_common import REPORT, write_json
    path = os.path.join(args.out, REPORT)
    if not os.path.exists(path):
        print(f"gpu_check: {path} was not written: no stage recorded anything")
        return 1
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    ok, needs_gpu = True, 0
    for n, st in sorted(report["stages"].items()):
        ok &= st.get("status", "finished") == "finished" and all(c["passed"] for c in st.get("checks", []))
        timing = f", {st['seconds']} s of {st['limit_s']}" if "seconds" in st else ""
        print(f"stage {n} ({st.get('name', '?')}): {st.get('status', 'finished')}{timing}")
        for c in st.get("checks", []):
            print(f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['value']} ({c['tolerance']})")
        for part in st.get("needs_gpu", []):
            print(f"  NEEDS-GPU {part['name']}: {part['reason']}")
            needs_gpu += 1
    report["all_passed"] = bool(ok)
    write_json(path, report)
    not_run = f"; {needs_gpu} NEEDS-GPU, not run" if needs_gpu else ""
    print(f"gpu_check: {'all stages finished, all checks passed' if ok else 'NOT all passed'}{not_run}; "
          f"figures in {path}")
    return 0 if ok else 1


def copy_into(dst, names, src_dir):
    """Copy src_dir/name, for each name present, into the folder dst."""
    from minihbt.files import copy_file
    os.makedirs(dst, exist_ok=True)
    copied = [n for n in names if os.path.exists(os.path.join(src_dir, n))]
    for n in copied:
        copy_file(os.path.join(src_dir, n), os.path.join(dst, n))
    print(f"{os.path.relpath(dst, ROOT)}: {', '.join(copied)} from {src_dir}")


def prepare(args):
    """Settings first (destinations, sources), then the copies; me5 is built from ../shared
    only when no directory with its tokenizer is at hand."""
    from gpu_check_common import DATA_DIR, DATA_FILES, SHARED, TOKENIZER_DIR, TOKENIZER_FILES
    for dst in (TOKENIZER_DIR, DATA_DIR):
        if os.path.exists(dst) and os.listdir(dst) and not args.force:
            fail(f"gpu_check prepare: {os.path.relpath(dst, ROOT)} already exists; pass --force to replace it")
    data_src = args.data_from or os.path.join(SHARED, "data", "xquad-r")
    if not all(os.path.exists(os.path.join(data_src, f"{l}.json")) for l in ("en", "de")):
        fail(f"gpu_check prepare: --data-from {data_src}: en.json and de.json not found there")
    src = args.source or os.path.join(ROOT, "weights", "multilingual-e5-small")
    build = os.path.join(SHARED, "tools", "build_me5_small.py")
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        if args.source:
            fail(f"gpu_check prepare: --from {args.source}: no tokenizer.json there")
        if not os.path.exists(build):
            fail("gpu_check prepare: no weights/multilingual-e5-small and no ../shared to build it from; "
                 "pass --from DIR (an HF directory with the XLM-R tokenizer.json)")
    with tempfile.TemporaryDirectory() as tmp:
        if not os.path.exists(os.path.join(src, "tokenizer.json")):
            src = os.path.join(tmp, "me5")
            subprocess.run([sys.executable, build, src], check=True, capture_output=True)
        copy_into(TOKENIZER_DIR, TOKENIZER_FILES, src)
        copy_into(DATA_DIR, DATA_FILES, data_src)
    print('carry: ["weights/xlmr-tokenizer", "data/xquad-r-en-de"]')
    return 0


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds >= 1, got {text!r}")
    return int(text)


def build_parser():
    ap = OneLineParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{prepare,probe,stage,status,summary}")
    p = sub.add_parser("prepare", help="copy the tokenizer and XQuAD-R en/de into carried folders")
    p.add_argument("--from", dest="source", help="HF directory with tokenizer.json (default: "
                                                 "weights/multilingual-e5-small, else built from ../shared)")
    p.add_argument("--data-from", help="XQuAD-R directory (default ../shared/data/xquad-r)")
    p.add_argument("--force", action="store_true", help="replace existing weights/xlmr-tokenizer, data/xquad-r-en-de")
    for name, helptext in (("probe", "stage 0: versions; exit 3 without a GPU"), ("stage", "run one of stages 1-5"),
                           ("status", "record a stage's outcome"), ("summary", "print the checks; all_passed")):
        p = sub.add_parser(name, help=helptext)
        if name == "status":
            p.add_argument("n", type=int, choices=sorted(STAGES), help="stage number")
            p.add_argument("--status", required=True, help="finished, timed out, failed, skipped: ...")
            for flag in ("--rc", "--seconds", "--limit"):
                p.add_argument(flag, type=int, required=True)
        if name == "stage":
            p.add_argument("n", type=int, choices=sorted(STAGES), help="stage number")
            p.add_argument("--work", required=True, help="scratch directory (models, embeddings)")
            p.add_argument("--limit", type=positive_int, required=True, help="the stage's time limit, seconds")
            p.add_argument("--smoke", action="store_true", help="tiny sizes (a check of the code paths)")
        p.add_argument("--out", required=True, help="output directory")
        if name in ("probe", "stage"):
            p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default cuda")
    e = sub.add_parser("encode-child")                 # stage 4's per-library process, not for direct use
    for flag in ("--lib", "--model", "--texts", "--device", "--precisions", "--emb-out"):
        e.add_argument(flag, required=True)
    e.add_argument("--batch-size", type=int, required=True)
    e.add_argument("--max-length", type=int, required=True)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "stage" and args.device == "cpu" and not args.smoke:
        fail("gpu_check.py stage: --device cpu is only for --smoke (a check of the code paths)")
    if args.command == "encode-child":
        import gpu_check_encode
        return gpu_check_encode.encode_child(args)
    for key in ("out", "work"):
        if getattr(args, key, None):
            os.makedirs(getattr(args, key), exist_ok=True)
    commands = {"prepare": prepare, "probe": probe, "stage": stage, "status": status, "summary": summary}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
