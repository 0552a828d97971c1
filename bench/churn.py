#!/usr/bin/env python3
"""Churn writer for the churn benchmark: rewrites one EndpointSlice file RATE times a second for
DURATION seconds, cycling between endpoint sets that all point at live upstream addresses, and
toggles an unrelated Ingress (writes, then deletes, its file) once a second. Every write is an
atomic rename, as a ConfigMap volume or `kubectl cp` of a whole file would be. Bounded: it stops
by itself after DURATION seconds. Prints how many slice rewrites and Ingress toggles it did.

  churn.py MANIFESTS_DIR UPSTREAM_PORT DURATION RATE
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_manifests import slice_, write  # noqa: E402

# Upstream nginx listens on all three (bench/run.sh), so every set is fully live.
SETS = [["127.0.0.1", "127.0.0.2"], ["127.0.0.2", "127.0.0.3"], ["127.0.0.3", "127.0.0.1"],
        ["127.0.0.1", "127.0.0.2", "127.0.0.3"]]

UNRELATED = """apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: unrelated
  namespace: bench
spec:
  ingressClassName: portico
  rules:
    - host: unrelated.bench.test
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service: {name: up, port: {name: http}}
"""


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    d, port, duration, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    slice_path = os.path.join(d, "11-up-slice.yaml")
    ing_path = os.path.join(d, "25-unrelated.yaml")
    start = time.monotonic()
    deadline = start + duration
    period = 1.0 / rate
    writes = toggles = 0
    ing_on = False
    next_toggle = start + 1.0
    k = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        write(slice_path, [slice_("bench", "up", SETS[k % len(SETS)], port)])
        writes += 1
        k += 1
        if now >= next_toggle:
            if ing_on:
                os.remove(ing_path)
            else:
                write(ing_path, [UNRELATED])
            ing_on = not ing_on
            toggles += 1
            next_toggle += 1.0
        # Pace against the schedule (not "sleep period"), so the rate holds even if a write is slow.
        target = start + k * period
        time.sleep(max(0.0, min(target - time.monotonic(), deadline - time.monotonic())))
    if ing_on:
        os.remove(ing_path)
    # Leave the original single-endpoint slice behind.
    write(slice_path, [slice_("bench", "up", ["127.0.0.1"], port)])
    print(f"CHURN writes={writes} ingress_toggles={toggles} seconds={duration:g}")


if __name__ == "__main__":
    main()
