"""The shipped artifacts, built the way users build them and cached under .venv-artifacts/ by a digest of
their inputs (a clean checkout builds each once; a change to the code, pyproject.toml, the Makefile or the
template builds it again):

- `sam build` of template.yaml (the layer through its BuildMethod: makefile target, the functions through the
  python3.12 workflow), for this machine's architecture (LAYER_PLATFORM) instead of the template's arm64;
- a clean Python 3.12 venv holding only boto3, the Lambda runtime's stand-in: the layer is put on its path;
- a plain `pip install` of a clean copy of the package, no extras, in a venv of the machine's python.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AIKIT_ARTIFACT_CACHE", ROOT / ".venv-artifacts"))
SAM = ROOT / ".venv-sam" / "bin" / "sam"
DRIVER = Path(__file__).resolve().parent / "lambda_driver.py"
HOST_PLATFORM = {"x86_64": "manylinux2014_x86_64", "aarch64": "manylinux2014_aarch64"}[platform.machine()]
FUNCTIONS = ("ApiFunction", "WebhookFunction", "FlushFunction", "MigrateFunction")
BUILD_TIMEOUT = 1500


def python312() -> Path:
    """The interpreter the layer's bytecode and the runtime venv need (Lambda's python3.12)."""
    pyenv_root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("pyenv") else ""
    candidates = sorted(Path(pyenv_root).glob("versions/3.12*/bin/python3.12")) if pyenv_root else []
    found = shutil.which("python3.12")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise RuntimeError("python3.12 is needed to build the layer (pyenv install 3.12, or put it on PATH)")


def _package_files() -> list[Path]:
    files = [ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "Makefile", ROOT / "template.yaml"]
    for top in ("shared", "functions"):
        files += [p for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and ".egg-info" not in str(p) and p.suffix != ".pyc"]
    return sorted(files)


def digest(*extra: str) -> str:
    h = hashlib.sha256()
    for path in _package_files():
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
        h.update(b"x" if os.access(path, os.X_OK) else b"-")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """CACHE/<kind>-<key>, built once by build(dir); older builds of the same kind are removed."""
    target = CACHE / f"{kind}-{key}"
    with _locked():
        if (target / ".complete").exists():
            return target
        for old in CACHE.glob(f"{kind}-*"):
            shutil.rmtree(old, ignore_errors=True)
        build(target)
        (target / ".complete").touch()
    return target


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


# ---------------------------------------------------------------------------------------------- sam build


def sam_build() -> Path:
    """The `sam build` output directory: <it>/AikitLayer/python, <it>/ApiFunction/app.py, ..."""
    py312 = python312()

    def build(target: Path) -> None:
        run(["bash", str(ROOT / "infra" / "sam-venv.sh")])
        env = {**os.environ, "PATH": f"{py312.parent}{os.pathsep}{os.environ['PATH']}", "SAM_CLI_TELEMETRY": "0",
               "LAYER_PLATFORM": HOST_PLATFORM, "LAYER_PYTHON": str(py312)}
        run([str(SAM), "build", "--template-file", str(ROOT / "template.yaml"), "--build-dir",
             str(target / "build")], cwd=ROOT, env=env)

    return cached("sam", digest(HOST_PLATFORM, str(py312)), build) / "build"


# ---------------------------------------------------------------------------------------------- venvs


def runtime_venv() -> Path:
    """A clean python3.12 venv with only boto3 (what the Lambda runtime adds to the layer), at the version the
    project's own tests use."""
    py312 = python312()
    boto3 = importlib.metadata.version("boto3")

    def build(target: Path) -> None:
        run([str(py312), "-m", "venv", str(target)])
        run([str(target / "bin" / "python"), "-m", "pip", "install", "-q", f"boto3=={boto3}"])

    return cached("runtime", hashlib.sha256(f"{py312}|{boto3}".encode()).hexdigest()[:16], build)


def plain_install() -> Path:
    """A venv of the machine's python with `pip install <a clean copy of the package>` and no extras."""

    def build(target: Path) -> None:
        source = target / "src"
        source.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        shutil.copytree(ROOT / "shared", source / "shared",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        run([sys.executable, "-m", "venv", str(target / "venv")])
        run([str(target / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", str(source)])

    return cached("plain", digest(sys.version), build) / "venv"


# ---------------------------------------------------------------------------------------------- invoking


@dataclass
class Invocation:
    result: Any
    foreign: list[str]
    stdout: str
    stderr: str

    def emf_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith('{"_aws"')]


def lambda_env(function_dir: Path, name: str, **settings: str) -> dict[str, str]:
    """What Lambda puts in a function's environment (the parts aikit reads), plus `settings`."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(function_dir),
        "LAMBDA_TASK_ROOT": str(function_dir), "AWS_LAMBDA_FUNCTION_NAME": name, "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "POWERTOOLS_SERVICE_NAME": "aikit", "POWERTOOLS_METRICS_NAMESPACE": "aikit",
        "POWERTOOLS_TRACE_DISABLED": "true", "FLUSH_INTERVAL_SECONDS": "0",
        # /var/task and /opt are read-only on Lambda: nothing may count on writing bytecode there.
        "PYTHONDONTWRITEBYTECODE": "1", **settings,
    }


def invoke(build_dir: Path, venv: Path, function: str, event: dict[str, Any], env: dict[str, str],
           remaining_ms: int = 60_000) -> Invocation:
    """Imports build_dir/<function>/app.py in a fresh interpreter of `venv` with only the built layer on its path
    (as /opt/python is on Lambda), calls its handler once, returns what it returned."""
    function_dir = build_dir / function
    full_env = {**env, "PYTHONPATH": str(build_dir / "AikitLayer" / "python"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([str(venv / "bin" / "python"), "-s", str(DRIVER), str(remaining_ms)],
                          input=json.dumps(event), capture_output=True, text=True, cwd=function_dir, env=full_env,
                          timeout=180)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DRIVER_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"{function} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    data = json.loads(lines[-1].removeprefix("DRIVER_RESULT "))
    return Invocation(data["result"], data["foreign"], proc.stdout, proc.stderr)
