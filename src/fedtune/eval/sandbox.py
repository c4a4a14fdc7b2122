"""Run untrusted generated Python in a separate, limited process; never in fedtune's own process.

Defence in depth, NOT a security boundary. Each program runs in a fresh `python -I` process in
its own session, in a new temporary directory, with a minimal environment, stdin read once and
closed, resource limits (address space, CPU time, file size, processes, open files) and a
wall-clock timeout that kills its whole process group. An audit hook in the child
(`sandbox_child.py`) refuses writes and file changes outside that directory, new processes,
signals, sockets and ctypes, ending the program at once. Code written on purpose to defeat the
hook can; run model-generated code from untrusted sources inside a container or VM. Known gaps:
reading files is allowed, and Linux does not apply RLIMIT_NPROC to root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from fedtune.eval.sandbox_child import REFUSED_EXIT

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
MAX_FILE_BYTES = 16 * 2**20  # largest file (stdout included) a program may write
_TAIL_BYTES = 4096
_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded (output or a file too large)",
    signal.SIGKILL: "killed (SIGKILL; the CPU or memory limit?)",
}


def _minimal_env(workdir: str) -> dict[str, str]:
    """No inherited variables (tokens, proxies); HOME is left unset so `~` stays outside `workdir`."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": workdir,
            "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        return handle.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _reason(returncode: int, output: str, nonce: str, output_bytes: int) -> tuple[bool, str]:
    if returncode == 0 and output.rstrip().endswith(nonce):
        return True, "passed"
    if output_bytes >= MAX_FILE_BYTES:
        return False, f"failed: output over the {MAX_FILE_BYTES // 2**20} MiB limit"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return False, f"killed by signal {-returncode}"
        return False, _SIGNAL_REASONS.get(sig, f"killed by {sig.name}")
    if returncode == 0:
        return False, "exited before its tests finished"
    if returncode == REFUSED_EXIT:
        return False, f"refused: {_last_line(output)}"
    return False, f"failed: {_last_line(output)}"


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """Run `code` in a separate limited Python process; (passed, reason). It passes if it finishes
    without an error within `timeout` seconds; reasons: "passed", "timed out after 3s",
    "failed: AssertionError", "refused: fedtune sandbox refused os.system: ...", ...
    """
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="fedtune-run-", ignore_cleanup_errors=True) as root:
        workdir = Path(root, "work")
        workdir.mkdir()
        program = Path(root, "program.py")
        program.write_text(code, encoding="utf-8")
        output = Path(root, "output.txt")
        cpu_seconds = max(1, int(timeout + 0.999)) + 1
        command = [sys.executable, "-I", str(CHILD_SCRIPT), str(program), str(workdir),
                   str(memory_mb * 2**20), str(cpu_seconds), str(MAX_FILE_BYTES)]
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT,
                cwd=workdir, env=_minimal_env(str(workdir)), start_new_session=True,
                close_fds=True,
            )
            try:
                proc.communicate(input=f"{nonce}\n".encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                return False, f"timed out after {timeout:g}s"
            finally:
                _kill_group(proc)  # anything it left behind in its session
        return _reason(proc.returncode, _tail(output), nonce, output.stat().st_size)
