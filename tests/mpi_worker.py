"""One rank of tests/test_comm.py's MPI runs, launched as `mpirun -np N python tests/mpi_worker.py SCENARIO OUT`.

collectives  every collective of minihbt.comm on the data of `rank_data(rank)`; each rank saves
             what it got to OUT/rank<r>.npz and OUT/rank<r>.json, and the test compares them with
             NumPy (the same data, regenerated in the test process)
abort        rank 1 raises inside abort_on_error while the others wait in a barrier: the whole
             mpirun must stop, non-zero, with rank 1's one line
single       under `mpirun -np 1`: from_environment must give SingleProcess
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's minihbt

from minihbt import comm  # noqa: E402

ROW_COUNTS = (3, 0, 5, 2)          # rows of rank r: ROW_COUNTS[r % 4] (one rank sends none)
H = 4


def rank_data(rank):
    """What rank `rank` contributes: arrays of per-rank row counts, values to sum, sparse rows."""
    rng = np.random.default_rng(1000 + rank)
    n = ROW_COUNTS[rank % len(ROW_COUNTS)]
    ids = np.sort(rng.choice(50, size=n, replace=False)).astype(np.int64)
    # magnitudes spread over decades, so that the order of the additions shows in the bits
    spread = lambda dtype: (rng.standard_normal((7, 5)) * 10.0 ** rng.integers(-4, 5, (7, 5))).astype(dtype)  # noqa: E731
    return {"rows": rng.standard_normal((n, H)).astype(np.float32), "ids": ids,
            "values": rng.standard_normal((n, H)).astype(np.float64),
            "sum32": spread(np.float32), "sum64": spread(np.float64)}


def collectives(c, out):
    mine = rank_data(c.rank)
    got = {"allgather": c.allgather(mine["rows"]),
           "sum32": c.allreduce_sum(mine["sum32"]), "sum64": c.allreduce_sum(mine["sum64"]),
           "sum32_native": c.allreduce_sum(mine["sum32"], exact=False)}
    inplace = mine["sum64"].copy()
    got["sum64_inplace"] = c.allreduce_sum(inplace, inplace=True)
    rows = c.allgather_rows(mine["ids"], mine["values"])
    got.update(rows_ids=rows.ids, rows_values=rows.values)
    info = {"type": type(c).__name__, "rank": c.rank, "size": c.size, "is_root": c.is_root,
            "inplace_is_input": got["sum64_inplace"] is inplace, "rows_counts": rows.counts,
            "bytes_sent": rows.bytes_sent, "bytes_received": rows.bytes_received,
            "bcast": repr(c.bcast_object({"from": c.rank, "uid": b"\x01\x02"} if c.is_root else None))}
    settings = {"lr": 1e-4, "batch": 8, "model": "tiny", "tags": ["a", "b"]}
    c.agree(settings if c.rank != 1 else dict(reversed(settings.items())))        # the same, in another order
    info["agree_equal"] = "passed"
    try:
        c.agree({"lr": 1e-4, "batch": 8, "seed": 10 + (c.rank == 1), "model": "tiny", "dropout": c.rank})
        info["agree_different"] = "no error"
    except comm.SettingsMismatch as e:
        info["agree_different"] = str(e)
    try:
        c.allgather(np.zeros((2, 3 + c.rank), np.float32))
        info["shape_mismatch"] = "no error"
    except comm.CommError as e:
        info["shape_mismatch"] = str(e)
    c.barrier()
    np.savez(os.path.join(out, f"rank{c.rank}.npz"), **got)
    with open(os.path.join(out, f"rank{c.rank}.json"), "w") as f:
        json.dump(info, f)


def abort(c, out):
    with c.abort_on_error():
        c.barrier()
        if c.rank == 1:
            raise ValueError("boom on purpose\nand a second line")
        c.barrier()                        # the others wait here for rank 1, which never comes
    with open(os.path.join(out, f"rank{c.rank}-finished"), "w") as f:
        f.write("a rank went past the barrier: abort did not stop it")


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    c = comm.from_environment("cpu")
    if scenario == "single":
        with open(os.path.join(out, "single.json"), "w") as f:
            json.dump({"type": type(c).__name__, "size": c.size, "launched": comm.launched_by_mpi()}, f)
        return
    {"collectives": collectives, "abort": abort}[scenario](c, out)


if __name__ == "__main__":
    main()
