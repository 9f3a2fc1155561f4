#!/usr/bin/env python3
"""GPU workload for thaw's snapshot benchmarks (runs on the GPU machine).

Fills GPU memory, runs a cuBLAS matmul and replays a captured CUDA graph, keeps fingerprints of
everything, then serves commands until told to exit. After a checkpoint/restore, `verify`
recomputes everything and compares bit-exact with the pre-checkpoint results.

Modes
  pattern  --gib N: N GiB of int32 tensors from a seeded generator (256 MiB chunks); verify
           regenerates each chunk from its seed and compares with torch.equal.
  qwen     Qwen3-8B-shaped: --weights FILE (16.4 GB of bf16 "weights", random bytes) read into
           the GPU through a pinned staging buffer, a KV-cache-like buffer of --kv-gib GiB,
           a CUDA graph over a decoder-layer-sized slice of the weights.

Command channel (CRIU-safe: no fd stays open between commands): the controller writes
CTL/cmd-<seq> (atomic rename) holding one word; the workload polls CTL every 2 ms, runs it and
writes CTL/resp-<seq>.json. Commands: ping (one graph replay + sync: "serving"), verify, exit.
Events (JSON lines with wall-clock timestamps) are appended to CTL/events.jsonl.
"""
import argparse
import hashlib
import json
import os
import sys
import time

T_EXEC = time.time()
# cuBLAS picks deterministic algorithms with a fixed workspace: results must be bit-exact across restore.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
CHUNK = 256 << 20  # bytes


def now():
    return time.time()


def event(ctl, name, **fields):
    rec = {"event": name, "t": now(), "pid": os.getpid(), **fields}
    with open(os.path.join(ctl, "events.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["pattern", "qwen", "cpu"], default="pattern")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--weights", default="")
    # A KV-cache-like buffer (default 2 GiB for qwen, none for pattern) that `kv-release` frees and
    # `kv-reacquire` re-creates, as vLLM's /sleep?level=1 and /wake_up do (issue 6's kv-cache policy).
    ap.add_argument("--kv-gib", type=float, default=None)
    ap.add_argument("--ctl", required=True)
    args = ap.parse_args()
    if args.kv_gib is None:
        args.kv_gib = 2.0 if args.mode == "qwen" else 0.0
    os.makedirs(args.ctl, exist_ok=True)
    if args.mode == "cpu":  # no GPU: exercises the container/CRIU plumbing on any machine
        w = CpuWorkload(args)
        event(args.ctl, "ready", exec=T_EXEC, totalS=round(now() - T_EXEC, 3), gpuBytes=0)
        serve(args.ctl, w)
        return

    import torch  # noqa: E402  (timed: import is most of a cold start)

    t_import = now()
    dev = torch.device("cuda")
    torch.cuda.init()
    torch.empty(1, device=dev)
    torch.cuda.synchronize()
    t_ctx = now()

    w = Workload(torch, dev, args)
    w.load()
    torch.cuda.synchronize()
    t_loaded = now()
    w.compute()
    w.reference = w.fingerprint()
    torch.cuda.synchronize()
    t_ready = now()
    event(
        args.ctl,
        "ready",
        exec=T_EXEC,
        importS=round(t_import - T_EXEC, 3),
        contextS=round(t_ctx - t_import, 3),
        loadS=round(t_loaded - t_ctx, 3),
        computeS=round(t_ready - t_loaded, 3),
        totalS=round(t_ready - T_EXEC, 3),
        gpuBytes=w.gpu_bytes(),
        memAllocated=torch.cuda.memory_allocated(),
        memReserved=torch.cuda.memory_reserved(),
    )
    serve(args.ctl, w)


class Workload:
    def __init__(self, torch, dev, args):
        self.torch = torch
        self.dev = dev
        self.args = args
        self.buffers = []  # (name, tensor, regen or None)
        self.reference = None

    def gpu_bytes(self):
        return sum(t.numel() * t.element_size() for _, t, _ in self.buffers)

    # ---- load ----
    def load(self):
        if self.args.mode == "pattern":
            self._load_pattern(int(self.args.gib * (1 << 30)))
        else:
            self._load_weights(self.args.weights)
        if self.args.kv_gib > 0:
            self._load_pattern(int(self.args.kv_gib * (1 << 30)), name="kv", seed_offset=10_000)

    # ---- KV cache release / re-acquire ----
    def kv_release(self):
        """Frees the KV buffers and returns their memory to the driver, so a checkpoint leaves them out."""
        torch = self.torch
        t0 = now()
        self.buffer_order = {b[0]: i for i, b in enumerate(self.buffers)}
        kept, released = [], 0
        for name, t, seed in self.buffers:
            if name.startswith("kv"):
                released += t.numel() * t.element_size()
                kept.append((name, None, seed, t.numel()))
            else:
                kept.append((name, t, seed, None))
        self.buffers = [(n, t, s) for n, t, s, _ in kept if t is not None]
        self.released = [(n, s, numel) for n, t, s, numel in kept if t is None]
        kept = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return {"ok": True, "releasedBytes": released, "memReserved": torch.cuda.memory_reserved(), "s": round(now() - t0, 3)}

    def kv_reacquire(self):
        """Re-creates the KV buffers (contents regenerated from their seeds so `verify` stays bit-exact)."""
        t0 = now()
        released = getattr(self, "released", [])
        for name, seed, numel in released:
            self.buffers.append((name, self._chunk_from_seed(seed, numel), seed))
        order = getattr(self, "buffer_order", {})
        self.buffers.sort(key=lambda b: order.get(b[0], len(order)))
        self.released = []
        self.torch.cuda.synchronize()
        return {"ok": True, "buffers": len(released), "memReserved": self.torch.cuda.memory_reserved(), "s": round(now() - t0, 3)}

    def _chunk_from_seed(self, seed, n):
        torch = self.torch
        g = torch.Generator(device=self.dev)
        g.manual_seed(seed)
        return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device=self.dev, generator=g)

    def _load_pattern(self, nbytes, name="pattern", seed_offset=0):
        left = nbytes - nbytes % 4  # int32 elements: a remainder under 4 bytes would never shrink
        i = 0
        while left > 0:
            n = min(CHUNK, left) // 4
            seed = self.args.seed * 100_003 + seed_offset + i
            self.buffers.append((f"{name}{i}", self._chunk_from_seed(seed, n), seed))
            left -= n * 4
            i += 1

    def _load_weights(self, path):
        torch = self.torch
        size = os.path.getsize(path)
        staging = [torch.empty(CHUNK, dtype=torch.uint8).pin_memory() for _ in range(2)]
        streams = [torch.cuda.Stream() for _ in range(2)]
        done = [None, None]
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            i = 0
            while off < size:
                n = min(CHUNK, size - off)
                k = i % 2
                if done[k] is not None:
                    done[k].synchronize()
                mv = memoryview(staging[k].numpy())[:n]
                got = 0
                while got < n:
                    r = os.preadv(fd, [mv[got:]], off + got)
                    if r <= 0:
                        raise IOError(f"short read at {off + got}")
                    got += r
                t = torch.empty(n // 2, dtype=torch.bfloat16, device=self.dev)
                with torch.cuda.stream(streams[k]):
                    t.view(torch.uint8).copy_(staging[k][:n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                done[k] = ev
                self.buffers.append((f"w{i}", t, None))
                off += n
                i += 1
            torch.cuda.synchronize()
        finally:
            os.close(fd)
        del staging
        # Cached pinned blocks are shared /dev/zero maps that CRIU would dump as shmem: free them.
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()

    # ---- compute: cuBLAS matmul + a captured graph ----
    def compute(self):
        torch = self.torch
        first = self.buffers[0][1]
        # A decoder-layer-sized slice: 4096 x 4096 bf16 views over the first buffer(s).
        flat = first.view(torch.bfloat16) if first.dtype != torch.bfloat16 else first
        need = 2 * 4096 * 4096
        assert flat.numel() >= need, "first buffer smaller than two 4096x4096 bf16 matrices"
        # Random bits as bf16 include NaN/Inf; scrub to finite values deterministically.
        wts = torch.nan_to_num(flat[:need].view(2, 4096, 4096).clone(), nan=0.5, posinf=1.0, neginf=-1.0).clamp_(-4, 4)
        self.w1, self.w2 = wts[0], wts[1]
        g = torch.Generator(device=self.dev)
        g.manual_seed(self.args.seed)
        self.x = torch.randn(64, 4096, dtype=torch.bfloat16, device=self.dev, generator=g)
        self.mm_out = (self.x @ self.w1).float().cpu().numpy().tobytes()

        self.static_in = self.x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up on a side stream before capture
                self._layer(self.static_in)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self._layer(self.static_in)
        self.graph.replay()
        torch.cuda.synchronize()
        self.graph_out = self.static_out.float().cpu().numpy().tobytes()

    def _layer(self, x):
        torch = self.torch
        h = torch.nn.functional.silu(x @ self.w1)
        h = h @ self.w2
        return torch.nn.functional.rms_norm(h.float(), (4096,)).to(torch.bfloat16)

    # ---- fingerprints ----
    def fingerprint(self):
        """Two int64 sums per buffer (plain and position-weighted): integer sums wrap the same way
        in any order, so they are deterministic, and the weighted one notices moved data."""
        torch = self.torch
        n_max = max(t.numel() * t.element_size() // 4 for _, t, _ in self.buffers)
        pos = (torch.arange(n_max, device=self.dev, dtype=torch.int64) % 65521) + 1
        sums = []
        for name, t, _ in self.buffers:
            x = t.view(torch.int32).view(-1).to(torch.int64)
            sums.append((name, int(x.sum().item()), int((x * pos[: x.numel()]).sum().item())))
            del x
        del pos
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # keep scratch out of the checkpoint
        return {
            "buffers": sums,
            "mm": hashlib.sha256(self.mm_out).hexdigest(),
            "graph": hashlib.sha256(self.graph_out).hexdigest(),
        }

    def verify(self):
        torch = self.torch
        t0 = now()
        # Recompute the matmul and replay the graph, then compare everything bit-exact.
        mm = hashlib.sha256((self.x @ self.w1).float().cpu().numpy().tobytes()).hexdigest()
        self.graph.replay()
        torch.cuda.synchronize()
        gr = hashlib.sha256(self.static_out.float().cpu().numpy().tobytes()).hexdigest()
        fp = self.fingerprint()
        bad = []
        if mm != self.reference["mm"]:
            bad.append("matmul")
        if gr != self.reference["graph"]:
            bad.append("graph")
        for (name, a1, a2), (_, b1, b2) in zip(fp["buffers"], self.reference["buffers"]):
            if (a1, a2) != (b1, b2):
                bad.append(name)
        # Pattern chunks are also regenerated from their seeds and compared element for element.
        regen_checked = 0
        for name, t, seed in self.buffers:
            if seed is not None:
                if not torch.equal(t, self._chunk_from_seed(seed, t.numel())):
                    bad.append(name + "(regen)")
                regen_checked += 1
        torch.cuda.synchronize()
        return {"ok": not bad, "bad": bad[:20], "buffers": len(self.buffers), "regenChecked": regen_checked, "verifyS": round(now() - t0, 3)}

    def ping(self):
        self.graph.replay()
        self.torch.cuda.synchronize()
        return {"ok": True}


class CpuWorkload:
    def __init__(self, args):
        self.data = bytearray(os.urandom(1 << 20)) * max(1, int(args.gib * 1024))
        self.reference = hashlib.sha256(self.data).hexdigest()

    def ping(self):
        return {"ok": True}

    def kv_release(self):
        return {"ok": True, "releasedBytes": 0}

    def kv_reacquire(self):
        return {"ok": True, "buffers": 0}

    def verify(self):
        t0 = now()
        ok = hashlib.sha256(self.data).hexdigest() == self.reference
        return {"ok": ok, "bad": [] if ok else ["data"], "verifyS": round(now() - t0, 3)}


def serve(ctl, w):
    while True:
        try:
            names = sorted(n for n in os.listdir(ctl) if n.startswith("cmd-") and not n.endswith(".tmp"))
        except FileNotFoundError:
            names = []
        if not names:
            time.sleep(0.002)
            continue
        for n in names:
            path = os.path.join(ctl, n)
            try:
                with open(path) as f:
                    cmd = f.read().strip()
            except FileNotFoundError:
                continue
            t0 = now()
            try:
                if cmd == "ping":
                    res = w.ping()
                elif cmd == "verify":
                    res = w.verify()
                elif cmd == "kv-release":
                    res = w.kv_release()
                elif cmd == "kv-reacquire":
                    res = w.kv_reacquire()
                elif cmd == "exit":
                    res = {"ok": True}
                else:
                    res = {"ok": False, "error": f"unknown command {cmd!r}"}
            except Exception as e:  # report, keep serving
                res = {"ok": False, "error": repr(e)}
            res.update({"cmd": cmd, "tReceived": t0, "tDone": now(), "pid": os.getpid()})
            os.unlink(path)
            write_json_atomic(os.path.join(ctl, "resp-" + n[4:] + ".json"), res)
            if cmd == "exit":
                sys.exit(0)


if __name__ == "__main__":
    main()
