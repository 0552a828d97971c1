#!/usr/bin/env python3
"""Manifests directories for the load and RSS benchmarks (portico's file provider input).

  gen_manifests.py load  DIR CERT KEY UPSTREAM_PORT   # one catch-all Ingress -> local upstream
  gen_manifests.py scale DIR N                        # N Ingresses, 5 paths, 10 endpoints each

`load`: IngressClass, Service `up` (port name http), its EndpointSlice on 127.0.0.1:PORT, a
host-less Ingress `/` Prefix -> up:http, and the TLS Secret `bench/bench-tls` that portico serves
as --default-certificate (the same certificate nginx and HAProxy serve).
`scale`: the same shape as benches/common/mod.rs (two Ingresses per host, every fifth host a
wildcard, one Service and one 10-endpoint EndpointSlice per Ingress), 100 objects per file.
"""
import base64
import os
import sys

CLASS = """apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: portico
spec:
  controller: portico.dev/ingress-controller
"""


def service(ns, name):
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  ports:
    - name: http
      port: 80
"""


def slice_(ns, svc, addrs, port, suffix="1"):
    eps = "".join(
        f"  - addresses: [\"{a}\"]\n    conditions: {{ready: true}}\n" for a in addrs
    )
    return f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {svc}-{suffix}
  namespace: {ns}
  labels:
    kubernetes.io/service-name: {svc}
addressType: IPv4
ports:
  - name: http
    port: {port}
    protocol: TCP
endpoints:
{eps}"""


def write(path, docs):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write("---\n".join(docs))
    os.replace(tmp, path)  # atomic: the watcher never sees half a file


def load(d, cert, key, port):
    os.makedirs(d, exist_ok=True)
    crt = base64.b64encode(open(cert, "rb").read()).decode()
    k = base64.b64encode(open(key, "rb").read()).decode()
    secret = f"""apiVersion: v1
kind: Secret
metadata:
  name: bench-tls
  namespace: bench
type: kubernetes.io/tls
data:
  tls.crt: {crt}
  tls.key: {k}
"""
    ingress = """apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: bench
  namespace: bench
spec:
  ingressClassName: portico
  rules:
    - http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service: {name: up, port: {name: http}}
"""
    write(os.path.join(d, "00-class.yaml"), [CLASS])
    write(os.path.join(d, "10-up.yaml"), [service("bench", "up")])
    write(os.path.join(d, "11-up-slice.yaml"), [slice_("bench", "up", ["127.0.0.1"], port)])
    write(os.path.join(d, "20-ingress.yaml"), [ingress])
    write(os.path.join(d, "30-secret.yaml"), [secret])


def scale(d, n):
    os.makedirs(d, exist_ok=True)
    write(os.path.join(d, "00-class.yaml"), [CLASS])
    per_file = 100
    for start in range(0, n, per_file):
        docs = []
        for i in range(start, min(n, start + per_file)):
            ns = f"ns{i % 100}"
            h = i // 2
            host = f"*.w{h}.bench.test" if h % 5 == 4 else f"h{h}.bench.test"
            svc = f"svc{i}"
            paths = [("Exact", f"/e{i}"), ("Prefix", f"/p{i}/api"), ("Prefix", f"/p{i}/static"),
                     ("Prefix", f"/p{i}/app/v1"), ("ImplementationSpecific", f"/p{i}/x")]
            plines = "".join(
                f"          - path: {p}\n            pathType: {t}\n"
                f"            backend:\n              service: {{name: {svc}, port: {{name: http}}}}\n"
                for t, p in paths
            )
            docs.append(f"""apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: ing{i}
  namespace: {ns}
spec:
  ingressClassName: portico
  rules:
    - host: "{host}"
      http:
        paths:
{plines}""")
            docs.append(service(ns, svc))
            addrs = []
            for e in range(10):
                m = (i * 10 + e) % (1 << 24)
                addrs.append(f"10.{m >> 16}.{(m >> 8) & 0xff}.{m & 0xff}")
            docs.append(slice_(ns, svc, addrs, 8080))
        write(os.path.join(d, f"scale-{start // per_file:04d}.yaml"), docs)


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) == 4 and sys.argv[1] == "scale":
        scale(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
