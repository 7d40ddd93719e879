#!/usr/bin/env python3
"""Deployment files checked without a Docker engine: compose config, Prometheus config, the
Grafana dashboard's PromQL against a live daemon's metrics, the Dockerfile and the Kubernetes
manifests (parse, probe and port consistency).

  deploy_test.py METALOADD METALOAD_CLI SOURCE_DIR      prints "N passed, N failed"
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import yaml


def main():
    metaloadd, cli, src = sys.argv[1:4]
    deploy = os.path.join(src, "deploy")
    sys.path.insert(0, os.path.join(src, "tests/tools"))
    import harness

    check = harness.Checks()

    r = subprocess.run(["docker-compose", "-f", os.path.join(deploy, "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True)
    check("docker-compose config -q", r.returncode == 0, r.stderr)
    compose = yaml.safe_load(open(os.path.join(deploy, "docker-compose.yml")))
    ports = compose["services"]["metaloadd"]["ports"]
    check("compose publishes 50051 and 9464 on loopback only",
          sorted(ports) == ["127.0.0.1:50051:50051", "127.0.0.1:9464:9464"] and
          all(p.startswith("127.0.0.1:") for s in compose["services"].values() for p in s.get("ports", [])), ports)

    r = subprocess.run(["promtool", "check", "config", os.path.join(deploy, "prometheus.yml")],
                       capture_output=True, text=True)
    check("promtool check config", r.returncode == 0, r.stdout + r.stderr)

    dockerfile = open(os.path.join(src, "Dockerfile")).read()
    check("Dockerfile installs exactly deploy/packages.txt via deploy/install-deps.sh",
          "COPY deploy/install-deps.sh deploy/packages.txt deploy/" in dockerfile and
          "RUN ./deploy/install-deps.sh" in dockerfile and "apt-get install" not in dockerfile.split("AS runtime")[0])
    entry = re.search(r'ENTRYPOINT \[(.*)\]', dockerfile).group(1)
    check("Dockerfile entrypoint listens on 0.0.0.0:50051 / :9464 with /models",
          all(f in entry for f in ['"--listen=0.0.0.0:50051"', '"--metrics_listen=0.0.0.0:9464"', '"--model_root=/models"']), entry)
    check("Dockerfile runs as non-root, exposes both ports, health-checks with metaload health",
          "USER metaload" in dockerfile and "EXPOSE 50051 9464" in dockerfile and
          '"metaload", "health"' in dockerfile)

    docs = []
    for name in sorted(os.listdir(os.path.join(deploy, "k8s"))):
        docs += [d for d in yaml.safe_load_all(open(os.path.join(deploy, "k8s", name))) if d]
    kinds = sorted(d["kind"] for d in docs)
    check("k8s manifests parse: Deployment and Service", kinds == ["Deployment", "Service"], kinds)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    listen = next(a for a in container["args"] if a.startswith("--listen="))
    grpc_port = int(listen.rsplit(":", 1)[1])
    metrics_port = int(next(a for a in container["args"] if a.startswith("--metrics_listen=")).rsplit(":", 1)[1])
    check("k8s probes use the gRPC health service on the listen port",
          container["readinessProbe"]["grpc"]["port"] == grpc_port and
          container["livenessProbe"]["grpc"]["port"] == grpc_port, (listen, container["readinessProbe"]))
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    check("k8s scrape annotation matches the metrics port",
          int(annotations["prometheus.io/port"]) == metrics_port and annotations["prometheus.io/scrape"] == "true")
    check("k8s requests a GPU", "nvidia.com/gpu" in container["resources"]["limits"])

    dashboard = json.load(open(os.path.join(deploy, "grafana/dashboards/metaload.json")))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = sorted({n for e in exprs for n in re.findall(r"\bmetaload_[a-z0-9_]+", e)})
    check("dashboard has panels with PromQL", len(exprs) >= 8 and names, exprs)

    work = tempfile.mkdtemp(prefix="metaload-deploy-")
    daemon = None
    try:
        subprocess.run([cli, "synth", "--arch=mlp", os.path.join(work, "m")], check=True, capture_output=True)
        daemon, kv = harness.start_daemon(metaloadd, work, work)
        address = "--address=127.0.0.1:" + kv["grpc_port"]
        subprocess.run([cli, "load", "m", "--quiet", address], check=True, capture_output=True)
        subprocess.run([cli, "infer", "m", "--input=input=FP32:1x16:" + ",".join(["1"] * 16), address],
                       check=True, capture_output=True)
        scraped = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % kv["metrics_port"], timeout=5).read().decode()
        exported = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines() if line and not line.startswith("#")}
        missing = [n for n in names if n not in exported]
        check("every metric the dashboard queries is exported by the daemon (%d names)" % len(names),
              not missing, missing)
    finally:
        if daemon:
            harness.stop([daemon])
        shutil.rmtree(work, ignore_errors=True)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
