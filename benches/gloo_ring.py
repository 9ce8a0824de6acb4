#!/usr/bin/env python3
"""torch.distributed's gloo collectives (f32 sum) timed as `concord bench` times its own, so that
benches/measure.sh and benches/collectives.sh can set the two side by side in the same run.

N processes on 127.0.0.1 (GLOO_SOCKET_IFNAME=lo). Per iteration: barrier, the collective, and
the iteration's time is the slowest rank's. Prints one line per size:
    gloo PEERS BYTES BUSBW_GBPS MEDIAN_US            (all_reduce)
    gloo-COLL PEERS BYTES BUSBW_GBPS MEDIAN_US       (--coll COLL, any other)
with nccl-tests' conventions: BYTES is the whole buffer (an all-gather's output, a
reduce-scatter's input), busbw = BYTES / median times 2 (N - 1) / N for all_reduce, (N - 1) / N
for all_gather and reduce_scatter, 1 for broadcast and reduce (GB = 1e9 B).

Usage: gloo_ring.py --peers N --bytes 64M [--coll all_reduce] [--iters 8] [--warmup 2]
(needs torch)

Across hosts (benches/links.sh), each rank is started on its own host instead:
    gloo_ring.py --peers N --bytes 64M --rank R --store HOST:PORT --ifname IF
"""
import argparse
import os
import socket
import statistics
import sys
import time


def parse_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def rank_main(rank, args, store):
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = args.ifname
    dist.init_process_group(
        "gloo", init_method=f"tcp://{store}", rank=rank, world_size=args.peers
    )
    peers = args.peers
    n = parse_bytes(args.bytes) // 4 // peers * peers
    slot = n // peers
    coll = args.coll
    whole = torch.ones(n, dtype=torch.float32)
    part = torch.ones(slot, dtype=torch.float32)
    if coll == "all_reduce":
        run, factor = (lambda: dist.all_reduce(whole)), 2 * (peers - 1) / peers
    elif coll == "broadcast":
        run, factor = (lambda: dist.broadcast(whole, src=0)), 1.0
    elif coll == "reduce":
        run, factor = (lambda: dist.reduce(whole, dst=0)), 1.0
    elif coll == "all_gather":
        run, factor = (lambda: dist.all_gather_into_tensor(whole, part)), (peers - 1) / peers
    else:
        run, factor = (lambda: dist.reduce_scatter_tensor(part, whole)), (peers - 1) / peers
    took = torch.zeros(1, dtype=torch.float64)
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        run()
        took[0] = time.perf_counter() - t0
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(took.item())
    if rank == 0:
        med = statistics.median(times)
        bus = n * 4 / med * factor / 1e9
        name = "gloo" if coll == "all_reduce" else f"gloo-{coll}"
        print(f"{name} {peers} {n * 4} {bus:.3f} {med * 1e6:.0f}", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--bytes", required=True)
    p.add_argument("--coll", default="all_reduce",
                   choices=["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter"])
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", help="HOST:PORT of rank 0's store (with --rank)")
    p.add_argument("--ifname", default="lo", help="interface gloo uses (default lo)")
    args = p.parse_args()
    if args.rank is not None:
        if not args.store:
            sys.exit("gloo_ring.py: --rank needs --store HOST:PORT")
        rank_main(args.rank, args, args.store)
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("gloo_ring.py needs torch (pip install torch)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import subprocess

    base = [sys.executable, __file__, "--peers", str(args.peers), "--bytes", args.bytes,
            "--coll", args.coll,
            "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--store", f"127.0.0.1:{port}"]
    procs = [subprocess.Popen(base + ["--rank", str(r)]) for r in range(args.peers)]
    try:
        codes = [pr.wait(timeout=600) for pr in procs]
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    if any(codes):
        sys.exit(f"gloo ranks exited with {codes}")


if __name__ == "__main__":
    main()
