#!/usr/bin/env python3
"""Benchmark (a program, not a test): checkpoint switches through a real metaloadd.

  switch_bench.py METALOADD METALOAD_CLI SOURCE_DIR STUBS_DIR [--dir=DIR] [--rounds=N]
                  [--model=gpt2|sd1|all]

For each model (a GPT-2-medium-shaped checkpoint, 1.4 GB float32; two full-size synthetic SD1
checkpoints stored in float16 as they are shared, loaded with the web UI's dtypes), in
interleaved rounds, page cache warm, every load through the daemon's LoadModel as a client
sees it (wall time of the RPC):

  floor        2 threads pread the checkpoint's bytes into fresh memory (no page touched yet)
  warm floor   the same read into memory faulted beforehand (untimed): a copy out of the cache
  cold         the first load of a freshly started daemon
  after unload a load of the same checkpoint after an unload (the host arena warm)
  switch       LoadModel(replace=true) on one id, A->B and B->A, under a --memory_budget that
               holds one model (the old one makes room; its memory takes the new weights)

Each round starts its own daemon (--arena_idle_release=2s), so the cold row is interleaved too;
at the end of a round everything is unloaded and, after the idle release, the daemon's RSS is
compared with its RSS before its first load. Peak RSS during the switches is the kernel's
high-water mark (reset through /proc/PID/clear_refs before them) above that same baseline.
Prints medians, the ratios against the targets of issue 20 and whether each is met.
"""
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time

CHUNK = 16 << 20


def flag(name, default):
    for a in sys.argv[5:]:
        if a.startswith("--" + name + "="):
            return a.split("=", 1)[1]
    return default


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def checkpoint_files(path):
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def read_floor(files, warm):
    """Seconds for 2 threads to pread `files` into one buffer (fresh, or faulted beforehand)."""
    sizes = [os.path.getsize(f) for f in files]
    buf = mmap.mmap(-1, sum(sizes))
    if warm:
        for i in range(0, len(buf), 4096):
            buf[i] = 1
    view = memoryview(buf)
    jobs, offset = [], 0
    for f, size in zip(files, sizes):
        for b in range(0, size, CHUNK):
            jobs.append((f, b, min(CHUNK, size - b), offset + b))
        offset += size
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    lock, nxt = threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                if nxt[0] >= len(jobs):
                    return
                f, b, n, dst = jobs[nxt[0]]
                nxt[0] += 1
            os.preadv(fds[f], [view[dst:dst + n]], b)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    view.release()
    buf.close()
    return seconds


def status_bytes(pid, field):
    for line in open("/proc/%d/status" % pid):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid):
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    metaloadd, cli, src, stubs = sys.argv[1:5]
    sys.path[:0] = [stubs, os.path.join(src, "client/python"), os.path.join(src, "tests/tools")]
    from metaload_client import Client
    import harness

    data = os.path.join(flag("dir", tempfile.gettempdir()), "switch")
    rounds = int(flag("rounds", "5"))
    which = flag("model", "all")
    models = []
    if which in ("gpt2", "all"):
        models.append(("gpt2-medium", ["--arch=gpt2", "--preset=medium"], "", "float32"))
    if which in ("sd1", "all"):
        models.append(("sd1-full", ["--arch=sd1", "--preset=full", "--dtype=float16"],
                       "model.safetensors", "float16, web UI dtypes"))
    print("switch_bench: %d rounds, each on a fresh metaloadd, %s" % (rounds, time.strftime("%Y-%m-%d")))
    for name, synth, leaf, what in models:
        paths = []
        for seed in ("1", "2"):
            out = os.path.join(data, "%s-%s" % (name, seed))
            if not os.path.exists(os.path.join(out, "config.json" if not leaf else leaf)):
                subprocess.run([cli, "synth", *synth, "--seed=" + seed, out], check=True,
                               stdout=subprocess.DEVNULL)
            paths.append(os.path.join("%s-%s" % (name, seed), leaf) if leaf else "%s-%s" % (name, seed))
        files = checkpoint_files(os.path.join(data, paths[0]))
        file_bytes = sum(os.path.getsize(f) for f in files)
        for p in paths:  # page cache warm for every row
            for f in checkpoint_files(os.path.join(data, p)):
                subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
        rows = {k: [] for k in ("floor", "warm", "cold", "after_unload", "switch")}
        peaks, rss_back, model_bytes, reused = [], [], 0, []
        for r in range(rounds):
            rows["floor"].append(read_floor(files, warm=False))
            rows["warm"].append(read_floor(files, warm=True))
            # Probe once for the model's size, then budget for one model plus a quarter.
            if model_bytes == 0:
                work = tempfile.mkdtemp(prefix="metaload-switch-")
                d, kv = harness.start_daemon(metaloadd, work, data)
                with Client("127.0.0.1:" + kv["grpc_port"], timeout=600) as c:
                    model_bytes = c.load(paths[0], model_id="probe").model.resident_bytes
                harness.stop([d])
            work = tempfile.mkdtemp(prefix="metaload-switch-")
            budget = model_bytes + model_bytes // 4
            daemon, kv = harness.start_daemon(
                metaloadd, work, data,
                flags=["--memory_budget=cpu=%d" % budget, "--arena_idle_release=2s",
                       "--state_dir=" + os.path.join(data, "state")])
            try:
                time.sleep(0.5)
                base = status_bytes(daemon.pid, "VmRSS")
                with Client("127.0.0.1:" + kv["grpc_port"], timeout=600) as c:
                    def timed_load(path, **kw):
                        t = time.perf_counter()
                        resp = c.load(path, model_id="m", **kw)
                        return time.perf_counter() - t, resp
                    s, _ = timed_load(paths[0])
                    rows["cold"].append(s)
                    c.unload("m")
                    s, resp = timed_load(paths[0])
                    rows["after_unload"].append(s)
                    reused.append(resp.stats.arena_reused_bytes / max(1, resp.model.resident_bytes))
                    have_peak = reset_peak(daemon.pid)
                    for p in (paths[1], paths[0]):
                        s, resp = timed_load(p, replace=True)
                        rows["switch"].append(s)
                    if have_peak:
                        peaks.append(status_bytes(daemon.pid, "VmHWM") - base)
                    c.unload("m")
                time.sleep(3.5)  # the idle release (2 s) and the release thread
                rss_back.append(status_bytes(daemon.pid, "VmRSS") / base)
            finally:
                harness.stop([daemon])

        m = {k: median(v) for k, v in rows.items()}
        gib = file_bytes / 2**30
        print("\n%s (%s): file %.2f GiB, model %.2f GiB, budget of one model + 25%%" %
              (name, what, gib, model_bytes / 2**30))
        print("| row | median s | GB/s of the file | x floor | x warm floor |")
        print("| --- | --- | --- | --- | --- |")
        for k, label in (("floor", "floor (fresh memory)"), ("warm", "warm floor (faulted memory)"),
                         ("cold", "cold first load"), ("after_unload", "load after unload"),
                         ("switch", "switch A<->B (replace)")):
            print("| %s | %.3f | %.2f | %.2fx | %.2fx |" %
                  (label, m[k], file_bytes / m[k] / 1e9, m[k] / m["floor"], m[k] / m["warm"]))
        print("arena reuse on the load after unload: %.0f%% of the model" % (100 * median(reused)))
        targets = []
        if name.startswith("gpt2"):
            targets += [("after unload <= 0.5x floor", m["after_unload"] / m["floor"], 0.5),
                        ("after unload <= 1.5x warm floor", m["after_unload"] / m["warm"], 1.5),
                        ("switch <= 0.5x floor", m["switch"] / m["floor"], 0.5),
                        ("switch <= 1.5x warm floor", m["switch"] / m["warm"], 1.5)]
        else:
            targets += [("switch <= 0.5x a cold load", m["switch"] / m["cold"], 0.5)]
        if peaks:
            targets.append(("switch peak RSS <= model + 96 MiB (MiB over the model)",
                            (max(peaks) - model_bytes) / 2**20, 96))
        targets.append(("RSS after unload + idle release within 5% of before (x before)",
                        max(rss_back), 1.05))
        for label, value, limit in targets:
            print("%-64s %8.3f  %s" % (label, value, "met" if value <= limit else "MISSED"))


if __name__ == "__main__":
    main()
