#!/usr/bin/env python3
"""A real Prometheus scrapes a real metaloadd and its HTTP API returns what the daemon reported.

  prometheus_test.py METALOADD METALOAD_CLI SOURCE_DIR

Uses Debian's prometheus and promtool; starts everything on loopback ports chosen here and stops
it again; prints "N passed, N failed".
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def sample(text, name, labels=""):
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return None


def main():
    metaloadd, cli, src = sys.argv[1:4]
    sys.path.insert(0, os.path.join(src, "tests/tools"))
    import harness

    check = harness.Checks()

    promtool = shutil.which("promtool")
    prometheus = shutil.which("prometheus")
    if not promtool or not prometheus:
        print("prometheus/promtool missing: run deploy/install-deps.sh", file=sys.stderr)
        return 1
    r = subprocess.run([promtool, "check", "config", os.path.join(src, "deploy/prometheus.yml")],
                       capture_output=True, text=True)
    check("promtool check config deploy/prometheus.yml", r.returncode == 0, r.stdout + r.stderr)

    work = tempfile.mkdtemp(prefix="metaload-prom-")
    procs = []
    try:
        models = os.path.join(work, "models")
        subprocess.run([cli, "synth", "--arch=mlp", "--preset=small", os.path.join(models, "m")],
                       check=True, capture_output=True)
        daemon, kv = harness.start_daemon(metaloadd, work, models,
                                          stderr=open(os.path.join(work, "metaloadd.log"), "w"))
        procs.append(daemon)
        grpc_port, metrics_port = kv["grpc_port"], kv["metrics_port"]
        for model_id in ("first", "second"):
            subprocess.run([cli, "load", "m", "--id=" + model_id, "--quiet",
                            "--address=127.0.0.1:" + grpc_port], check=True, capture_output=True)

        # The repo's config with the target pointed at this daemon and a fast scrape.
        config = open(os.path.join(src, "deploy/prometheus.yml")).read()
        config = config.replace('"metaloadd:9464"', '"127.0.0.1:%s"' % metrics_port)
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
        config_path = os.path.join(work, "prometheus.yml")
        open(config_path, "w").write(config)
        prom_port = free_port()
        prom = subprocess.Popen([prometheus, "--config.file=" + config_path,
                                 "--storage.tsdb.path=" + os.path.join(work, "tsdb"),
                                 "--web.listen-address=127.0.0.1:%d" % prom_port],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prom.log"), "w"))
        procs.append(prom)

        daemon_metrics = get("http://127.0.0.1:%s/metrics" % metrics_port)
        want_count = sample(daemon_metrics, "metaload_load_duration_seconds_count",
                            '{architecture="mlp",device="cpu",outcome="ok"}')
        want_peak = sample(daemon_metrics, "metaload_load_peak_host_bytes", '{model_id="first"}')
        check("daemon reports one load and a peak", want_count == 1.0 and want_peak is not None,
              "count %s peak %s" % (want_count, want_peak))

        def query(q):
            url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (prom_port, urllib.parse.quote(q))
            data = json.loads(get(url))
            return data["data"]["result"]

        got = []
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                got = query("metaload_load_duration_seconds_count")
                if got:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        values = {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in got}
        count = [v for k, v in values.items() if ("outcome", "ok") in k and ("architecture", "mlp") in k]
        check("prometheus scraped metaload_load_duration_seconds_count", count == [want_count], repr(values))
        peaks = query('metaload_load_peak_host_bytes{model_id="first"}')
        check("prometheus has metaload_load_peak_host_bytes", len(peaks) == 1 and
              float(peaks[0]["value"][1]) == want_peak, repr(peaks))
        up = query('up{job="metaload"}')
        check("the scrape target is up", len(up) == 1 and up[0]["value"][1] == "1", repr(up))
    finally:
        harness.stop(procs)
        shutil.rmtree(work, ignore_errors=True)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
