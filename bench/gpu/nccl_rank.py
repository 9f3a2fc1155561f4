"""One rank of bench/gpu/nccl-probe.sh: can a process group with NCCL communicators survive a CUDA
checkpoint/restore of every rank? Each rank all-reduces, holds MIB MiB of weights, says ready,
waits while the driver checkpoints and restores it, then all-reduces again and compares. REINIT=1:
the process group is destroyed before the checkpoint and formed again after the restore.

    python3 nccl_rank.py RANK WORLD INIT_FILE CONTROL_DIR
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

rank, world, init_file, ctl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
mib = int(os.environ.get("MIB", "1024"))
torch.cuda.set_device(rank)
t0 = time.time()
dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
expect = world * (world + 1) / 2


def all_reduce_ok() -> bool:
    x = torch.full((64 << 18,), float(rank + 1), device="cuda")  # 64 MiB of fp32
    dist.all_reduce(x)
    torch.cuda.synchronize()
    return bool((x == expect).all())


ok_before = all_reduce_ok()
g = torch.Generator(device="cuda").manual_seed(rank)
weights = torch.randn(mib << 18, device="cuda", generator=g)
checksum = float(weights.double().sum())
torch.cuda.synchronize()
reinit = os.environ.get("REINIT") == "1"
if reinit:
    # What a pre-checkpoint hook would have the app do: no NCCL communicator (and none of its peer
    # memory) across the checkpoint; a post-restore hook forms the group again.
    dist.destroy_process_group()
    torch.cuda.synchronize()
with open(f"{ctl}/ready.{rank}", "w") as f:
    json.dump({"pid": os.getpid(), "init_s": round(time.time() - t0, 2), "ok_before": ok_before}, f)
while not os.path.exists(f"{ctl}/go"):
    time.sleep(0.02)
t1 = time.time()
err = None
try:
    if reinit:
        dist.init_process_group("nccl", init_method=f"file://{init_file}.2", rank=rank, world_size=world)
    ok_after = all_reduce_ok()
except Exception as e:  # noqa: BLE001 (reported, not raised: the probe wants every rank's answer)
    ok_after, err = False, repr(e)
same = float(weights.double().sum()) == checksum
busbw = None
if ok_after:
    # All-reduce bus bandwidth after the restore (256 MiB, 5 rounds): what the transport costs.
    x = torch.ones(64 << 20, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    t2 = time.time()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    busbw = round(x.numel() * 4 * 2 * (world - 1) / world / ((time.time() - t2) / 5) / 1e9, 1)
print(json.dumps({"rank": rank, "ok_before": ok_before, "ok_after": ok_after, "weights_same": same, "after_s": round(time.time() - t1, 3), "busbw_gbs": busbw, "error": err}), flush=True)
try:
    dist.destroy_process_group()
except Exception:  # noqa: BLE001
    pass
