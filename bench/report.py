#!/usr/bin/env python3
"""Helpers of bench/run.sh: process accounting, load-generator output parsing, result tables.

  report.py procstat PID                    -> "TICKS RSS_KIB HWM_KIB" summed over PID + children
  report.py record OUT.jsonl K=V... -- LOADGEN_OUTPUT [H2LOAD_LOG]
                                            -> parse wrk/h2load output, append one JSON run line
  report.py table RUNS.jsonl                -> markdown: medians per scenario/proxy, ratios to nginx
  report.py churn RUNS.jsonl                -> markdown: steady vs churn for portico
  report.py micro CRITERION_OUTPUT          -> markdown: criterion means + route-match percentiles

Only the standard library. Units in the JSON lines: rps, ms (p50/p99), µs (CPU per request),
KiB (RSS).
"""
import json
import os
import re
import statistics
import sys


# ------------------------------------------------------------------------------------------
# /proc accounting
# ------------------------------------------------------------------------------------------

def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid):
    """PID and its descendants (nginx: master + worker), bounded depth."""
    seen, todo = [], [pid]
    while todo and len(seen) < 64:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def procstat(pid):
    ticks = uticks = rss = hwm = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                # comm may contain spaces: fields after the last ')' are fixed.
                rest = f.read().rsplit(")", 1)[1].split()
            ticks += int(rest[11]) + int(rest[12])  # utime + stime (fields 14, 15)
            uticks += int(rest[11])
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            pass
    return ticks, rss, hwm, uticks


# ------------------------------------------------------------------------------------------
# load generator output
# ------------------------------------------------------------------------------------------

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk_dur(s):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", s)
    return float(m.group(1)) * UNIT_MS[m.group(2)] if m else None


def parse_wrk(text):
    r = {"tool": "wrk"}
    m = re.search(r"(\d+) requests in ([0-9.]+)(\w+)", text)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    r["rps"] = float(m.group(1)) if m else 0.0
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        r[key] = wrk_dur(m.group(1)) if m else None
    failed = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        failed += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        failed += int(m.group(1))
    r["failed"] = failed
    return r


def parse_h2load(text, log_path):
    r = {"tool": "h2load"}
    m = re.search(r"finished in ([0-9.]+)s, ([0-9.]+) req/s", text)
    r["rps"] = float(m.group(2)) if m else 0.0
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    r["requests"] = int(m.group(4)) if m else 0
    r["failed"] = (int(m.group(5)) + int(m.group(6)) + int(m.group(7))) if m else 0
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        r["failed"] += int(m.group(3)) + int(m.group(4))
    # h2load prints no percentiles; its --log-file has one line per request:
    # start (µs since epoch) \t status \t µs until the response ended.
    lat = []
    try:
        with open(log_path) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    lat.append(int(parts[2]) / 1000.0)
    except OSError:
        pass
    lat.sort()
    if lat:
        r["p50_ms"] = lat[int((len(lat) - 1) * 0.50)]
        r["p99_ms"] = lat[int((len(lat) - 1) * 0.99)]
    else:
        r["p50_ms"] = r["p99_ms"] = None
    return r


def parse_ab(text, csv_path):
    """ApacheBench output plus its `-e` CSV (percentile,milliseconds from 0 to 100)."""
    r = {"tool": "ab"}
    m = re.search(r"Requests per second:\s+([0-9.]+)", text)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Complete requests:\s+(\d+)", text)
    complete = int(m.group(1)) if m else 0
    failed = 0
    for pat in (r"Failed requests:\s+(\d+)", r"Non-2xx responses:\s+(\d+)"):
        m = re.search(pat, text)
        failed += int(m.group(1)) if m else 0
    r["requests"] = max(complete - failed, 0)
    r["failed"] = failed
    pct = {}
    try:
        with open(csv_path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) == 2 and parts[0].isdigit():
                    pct[int(parts[0])] = float(parts[1])
    except OSError:
        pass
    r["p50_ms"] = pct.get(50)
    r["p99_ms"] = pct.get(99)
    return r


def record(args):
    out = args[0]
    sep = args.index("--")
    fields = dict(a.split("=", 1) for a in args[1:sep])
    files = args[sep + 1:]
    text = open(files[0]).read()
    if "ApacheBench" in text:
        r = parse_ab(text, files[1] if len(files) > 1 else "")
    elif len(files) > 1:
        r = parse_h2load(text, files[1])
    else:
        r = parse_wrk(text)
    for k, v in fields.items():
        try:
            r[k] = int(v)
        except ValueError:
            r[k] = v
    clk = os.sysconf("SC_CLK_TCK")
    if "cpu0" in r and "cpu1" in r:
        cpu_s = (r["cpu1"] - r["cpu0"]) / clk
        r["cpu_s"] = cpu_s
        r["cpu_us_per_req"] = cpu_s * 1e6 / r["requests"] if r["requests"] else None
        if "ucpu0" in r and "ucpu1" in r and r["requests"]:
            # user-space share: the part a proxy's own code decides (the kernel's TCP work per
            # request is about the same for all three).
            r["user_us_per_req"] = (r["ucpu1"] - r["ucpu0"]) / clk * 1e6 / r["requests"]
    else:
        r["cpu_us_per_req"] = None  # churn runs: not measured
    with open(out, "a") as f:
        f.write(json.dumps(r) + "\n")
    p50 = r["p50_ms"] if r["p50_ms"] is not None else float("nan")
    p99 = r["p99_ms"] if r["p99_ms"] is not None else float("nan")
    cpu = r["cpu_us_per_req"] if r["cpu_us_per_req"] is not None else float("nan")
    print(f"  {r.get('proxy', '?'):8} {r.get('scenario', '?'):16} rep {r.get('rep', '?')}: "
          f"{r['rps']:9.0f} req/s  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  "
          f"{cpu:7.1f} µs/req  hwm {r.get('hwm_kib', 0) / 1024:6.1f} MiB  failed {r['failed']}"
          .replace("nan µs/req  hwm    0.0 MiB", "– µs/req  hwm     – MiB"))


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------

SCENARIOS = [
    ("h1_small", "HTTP/1.1 keep-alive, small body"),
    ("h1_16k", "HTTP/1.1 keep-alive, 16 KiB body"),
    ("h1_newconn", "HTTP/1.1, new TCP connection per request"),
    ("https_keepalive", "HTTPS (HTTP/1.1) keep-alive"),
    ("tls_handshake", "full TLS handshake per request"),
    ("tls_resume", "TLS 1.3 resumption per request"),
    ("h2_tls", "h2 over TLS, multiplexed"),
]
# portico-b: a second portico build in an A/B run (bench/run.sh BENCH_PORTICO_B_BIN).
PROXIES = ["portico", "portico-b", "nginx", "haproxy"]


def load_runs(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=1):
    return "–" if v is None else f"{v:,.{nd}f}"


def ratio(a, b):
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}×"


def table(path):
    runs = [r for r in load_runs(path) if r.get("kind", "load") == "load"]
    reps = len({r["rep"] for r in runs}) if runs else 0
    print(f"Medians of {reps} repetition(s). Ratios are each proxy ÷ nginx.\n")
    print("| scenario | proxy | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MiB | idle RSS MiB "
          "| failed | req/s vs nginx | CPU vs nginx | p99 vs nginx | of CPU: user µs/req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sc, title in SCENARIOS:
        by = {p: [r for r in runs if r["scenario"] == sc and r["proxy"] == p] for p in PROXIES}
        if not any(by.values()):
            continue
        m = {p: {k: med(by[p], k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req",
                                            "hwm_kib", "idle_kib", "user_us_per_req")} for p in PROXIES}
        for p in PROXIES:
            if not by[p]:
                continue
            x, n = m[p], m["nginx"]
            failed = sum(r["failed"] for r in by[p])
            print(f"| {title} | {p} | {fmt(x['rps'], 0)} | {fmt(x['p50_ms'], 3)} | "
                  f"{fmt(x['p99_ms'], 3)} | {fmt(x['cpu_us_per_req'])} | "
                  f"{fmt(x['hwm_kib'] and x['hwm_kib'] / 1024)} | "
                  f"{fmt(x['idle_kib'] and x['idle_kib'] / 1024)} | {failed} | "
                  f"{ratio(x['rps'], n['rps'])} | {ratio(x['cpu_us_per_req'], n['cpu_us_per_req'])} | "
                  f"{ratio(x['p99_ms'], n['p99_ms'])} | {fmt(x['user_us_per_req'])} |")


def churn(path):
    runs = [r for r in load_runs(path) if r.get("kind") == "churn"]
    steady = [r for r in runs if r["phase"] == "steady"]
    control = [r for r in runs if r["phase"] == "control"]
    churned = [r for r in runs if r["phase"] == "churn"]
    print("| phase | req/s | p50 ms | p99 ms | failed (non-2xx + socket errors) | slice rewrites | "
          "Ingress toggles | snapshot builds | proxy CPU µs/req | of it user |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in (("steady", steady), ("control (writes portico does not watch)", control),
                     ("churn", churned)):
        if not rs:
            continue
        print(f"| {name} | {fmt(med(rs, 'rps'), 0)} | {fmt(med(rs, 'p50_ms'), 3)} | "
              f"{fmt(med(rs, 'p99_ms'), 3)} | {sum(r['failed'] for r in rs)} | "
              f"{sum(r.get('writes', 0) for r in rs)} | {sum(r.get('toggles', 0) for r in rs)} | "
              f"{sum(r.get('builds', 0) for r in rs)} | {fmt(med(rs, 'cpu_us_per_req'))} | "
              f"{fmt(med(rs, 'user_us_per_req'))} |")
    s, c = med(steady, "p99_ms"), med(churned, "p99_ms")
    print(f"\np99 shift under churn: {ratio(c, s)} of steady state.")
    if control:
        k = med(control, "p99_ms")
        print(f"p99 shift under churn: {ratio(c, k)} of the control phase (the writer's own cost "
              f"on the load core: {ratio(k, s)} of steady state).")
    by = {(r["phase"], r["rep"]): r["p99_ms"] for r in runs}
    phases = [p for p in ("steady", "control", "churn") if any(k[0] == p for k in by)]
    per = [" → ".join(fmt(by.get((p, n)), 2) for p in phases if (p, n) in by)
           for n in sorted({r["rep"] for r in runs})]
    print(f"\nPer repetition p99 ms ({' → '.join(phases)}): " + "; ".join(per) + ".")


def micro(path):
    text = open(path).read()
    print("| benchmark | mean (criterion) |")
    print("|---|---:|")
    # criterion's text output: "<id>\n   time:   [low mean high]" (id may be on the same line).
    for m in re.finditer(r"^(\S+)\s*\n?\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", text, re.M):
        print(f"| `{m.group(1)}` | {m.group(2)} {m.group(3)} |")
    pct = re.findall(r"ROUTE_PCT kind=(\S+) p50_ns=(\S+) p99_ns=(\S+) p999_ns=(\S+) max_ns=(\S+)",
                     text)
    if pct:
        print("\n| route match | p50 ns | p99 ns | p99.9 ns | max ns |")
        print("|---|---:|---:|---:|---:|")
        for k, p50, p99, p999, mx in pct:
            print(f"| {k} | {p50} | {p99} | {p999} | {mx} |")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "procstat":
        print(*procstat(int(args[0])))
    elif cmd == "record":
        record(args)
    elif cmd == "table":
        table(args[0])
    elif cmd == "churn":
        churn(args[0])
    elif cmd == "micro":
        micro(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
