"""The printed report of `train_step.py`: header, one table per case, the profile."""
from train_step_profile import format_profile

# Datasheet peaks, dense (no sparsity), FLOP/s: (fp32, tf32 tensor core, bf16 tensor core).
PEAKS = [("H100 PCIe", (51e12, 378e12, 756e12)), ("H100 NVL", (60e12, 417.5e12, 835e12)),
         ("H100", (67e12, 494.7e12, 989.4e12)), ("H200", (67e12, 494.7e12, 989.4e12)),
         ("A100", (19.5e12, 156e12, 312e12)), ("L4", (30.3e12, 60e12, 121e12))]
NAMES = {"minihbt": "minihbt", "torch": "pytorch+transformers"}       # and "baseline REV": minihbt at REV


def peak_flops(device_name, precision):
    for key, peaks in PEAKS:
        if key in device_name:
            return peaks[{"fp32": 0, "tf32": 1, "mixed": 2}[precision]], key
    return None, None


def print_header(record):
    s, m, model = record["settings"], record["machine"], record["model"]
    print(f"train_step.py: {s['shape']}{' (random weights)' if s['shape'] == 'xlmr-base' else ''}, {s['device']}, "
          f"threads={s['threads']} on cores {m['cores_used']} (machine: {m['cores']} cores, {m['cpu']}), {s['steps']} timed steps after one "
          f"warm-up, each side in its own process")
    print(f"real-token FLOPs of a step (forward + backward) = 6 N sum_i n_i + 12 L H sum_i n_i^2 over the step's "
          f"texts, n_i = real tokens of text i; N = {model['non_embedding_parameters'] / 1e6:.1f}M non-embedding "
          f"parameters, L = {model['layers']}, H = {model['hidden']} (padding, embeddings, pooling, loss not counted)")
    mm = record["matmul"]
    if mm:
        import matmul_rate
        print(f"matmul reference: {matmul_rate.describe(mm['before'])}; after the steps "
              f"{mm['after']['flops'] / 1e9:.1f} GFLOP/s; the reference is the higher: {mm['flops'] / 1e9:.1f} GFLOP/s")


def print_case(result, matmul_flops, gpu):
    """One case (and precision): a row per side with its rates, then the ratios; adds the rates to `result`."""
    r = result
    print(f"\n[{r['case']}, {r['precision']}] {r['about']}; {r['triplets']} queries (<= {r['max_query_length']} "
          f"tokens), {r['candidates']} passages (<= {r['max_passage_length']} tokens)")
    print(f"  real tokens {r['query_tokens']} + {r['candidate_tokens']} = {r['real_tokens']} of "
          f"{r['padded_positions']} padded positions ({1 - r['real_tokens'] / r['padded_positions']:.0%} padding); "
          f"real-token work {r['flop'] / 1e12:.3f} TFLOP a step (the padded batch: {r['padded_flop'] / 1e12:.3f})")
    unit, scale = ("ms/step", 1e3) if gpu else ("s/step", 1.0)
    rate_head, frac_head = ("TFLOP/s", "MFU") if gpu else ("GFLOP/s", "of matmul")
    print(f"  {'':22s}{unit:>9s}{'tokens/s':>10s}{rate_head:>9s}{frac_head:>11s}"
          f"{'peak GPU MB' if gpu else 'peak RSS MB':>13s}{'cores busy':>12s}   losses")
    rows = {}
    baselines = [k for k in r["sides"] if k.startswith("baseline")]
    for key, name in list(NAMES.items()) + [(k, "minihbt at " + k[len("baseline "):]) for k in baselines]:
        if key not in r["sides"]:
            continue
        side = r["sides"][key]
        if "skipped" in side:
            print(f"  {name:22s}  {side['skipped']}")
            continue
        side["tokens_per_s"] = r["real_tokens"] / side["seconds"]
        side["flop_rate"] = r["flop"] / side["seconds"]
        if gpu:
            peak, card = peak_flops(side.get("device") or "", r["precision"])
            side["fraction"] = side["flop_rate"] / peak if peak else None
            mem = max(m for m in side["gpu_mb"] if m is not None)
        else:
            side["fraction"] = side["flop_rate"] / matmul_flops if matmul_flops else None
            mem = side["peak_mb"]
        rows[key] = (side["seconds"], mem)
        frac = f"{side['fraction']:.1%}" if side["fraction"] is not None else "n/a"
        print(f"  {name:22s}{side['seconds'] * scale:9.3f}{side['tokens_per_s']:10.0f}"
              f"{side['flop_rate'] / (1e12 if gpu else 1e9):9.1f}{frac:>11s}{mem:13.0f}{side['cores_busy']:12.2f}   "
              f"{[round(x, 6) for x in side['losses']]}")
        if side.get("tokens") is not None and side["tokens"] != r["real_tokens"]:
            print(f"  warning: {name} processed {side['tokens']} real tokens, the count above is {r['real_tokens']}: "
                  f"the two sides do not see the same tokens")
        print(f"  {'':22s}{side['libraries']}")
        if gpu:
            print(f"  {'':22s}device: {side.get('device')}; MFU against the {card or 'unknown card'} datasheet peak "
                  f"for {r['precision']}; allocator size after each step (MB): {[round(m) for m in side['gpu_mb']]}")
    for key in (k for k in baselines if k in rows and "minihbt" in rows):
        (tm, mm), (tb, mb) = rows["minihbt"], rows[key]
        r.setdefault("speedup_vs_baseline", {})[key[len("baseline "):]] = tb / tm
        print(f"  minihbt vs {key[len('baseline '):]}: {tb / tm:.2f}x the real tokens/s (time ratio {tm / tb:.2f}), "
              f"peak memory ratio {mm / mb:.2f}")
    if "minihbt" in rows and "torch" in rows:
        (tm, mm), (tt, mt) = rows["minihbt"], rows["torch"]
        r["time_ratio"], r["memory_ratio"] = tm / tt, mm / mt
        print(f"  time ratio minihbt/pytorch: {tm / tt:.2f} (throughput {tt / tm:.2f}x)   "
              f"peak memory ratio minihbt/pytorch: {mm / mt:.2f}")


def print_profile(info, out):
    about = (f"case {info['case']} ({info['about']}; {info['real_tokens']} real tokens of "
             f"{info['padded_positions']} positions)")
    if "skipped" in out:
        print(f"profile of {about}: {out['skipped']}")
    else:
        print(format_profile(out, about))
