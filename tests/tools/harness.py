"""Shared by the Python end-to-end tests: named checks with a summary, and a metaloadd on ports
the kernel picks (read back from --port_file)."""
import os
import subprocess
import time


class Checks:
    """Records named checks, prints each as it goes, and gives the exit code at the end."""

    def __init__(self):
        self.results = []

    def __call__(self, name, ok, detail=""):
        self.results.append(bool(ok))
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)))

    def summary(self):
        passed = sum(self.results)
        print("%d passed, %d failed" % (passed, len(self.results) - passed))
        return 0 if all(self.results) else 1


def start_daemon(metaloadd, work, model_root, stderr=subprocess.DEVNULL, flags=()):
    """Starts metaloadd on loopback with `flags` added; returns (process, {"grpc_port": ..,
    "metrics_port": ..})."""
    port_file = os.path.join(work, "ports")
    if os.path.exists(port_file):
        os.remove(port_file)
    daemon = subprocess.Popen([metaloadd, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                               "--port_file=" + port_file, "--model_root=" + model_root, *flags],
                              stderr=stderr)
    # Up to 60 s: a daemon starting while the rest of the suite keeps both cores busy (a CI run
    # once saw more than 15 s).
    for _ in range(1200):
        if os.path.exists(port_file) or daemon.poll() is not None:
            break
        time.sleep(0.05)
    if not os.path.exists(port_file):
        state = "exited with %s" % daemon.returncode if daemon.poll() is not None else "still running"
        daemon.kill()
        log = getattr(stderr, "name", None)
        detail = open(log).read()[-2000:] if log and os.path.exists(log) else "(stderr not kept)"
        raise RuntimeError("metaloadd wrote no %s within 60 s (%s); its log:\n%s" % (port_file, state, detail))
    return daemon, dict(line.split("=") for line in open(port_file).read().split())


def stop(procs):
    """SIGTERM, then SIGKILL for whatever has not exited within 15 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
