"""Child side of `fedtune.eval.sandbox`: limit itself, install an audit hook, run one program.

Run as `python -I sandbox_child.py PROGRAM WORKDIR MEMORY_BYTES CPU_SECONDS FILE_BYTES` with a
one-line nonce on stdin. Standard library only, and fedtune is never imported here. The hook is
defence in depth against accidents, not a security boundary: code written to defeat it
(monkeypatching the modules it relies on, interpreter introspection) can; a container or VM is
the boundary. On success the nonce is written as the last line of stdout, so a program that
exits early (`os._exit(0)`) does not count as passing.
"""

from __future__ import annotations

import os
import resource
import sys
import traceback

REFUSED_EXIT = 86
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_ALWAYS_REFUSED = frozenset({
    "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.link", "os.symlink",
    "resource.setrlimit", "resource.prlimit",
})
_REFUSED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "winreg.")
# ctypes may be imported (numpy does; its import opens the running program with dlopen(None)),
# but loading other libraries or calling foreign functions through it is refused.
_REFUSED_IMPORTS = frozenset({"_posixsubprocess", "_xxsubinterpreters"})
# event -> (index of a path argument, index of the dir_fd it is relative to, or None), ...
_PATH_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.truncate": ((0, None),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
}


def set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
    """Address space, CPU time, file size, processes, open files and core dumps, where supported."""
    wanted = {
        "RLIMIT_AS": memory_bytes, "RLIMIT_CPU": cpu_seconds, "RLIMIT_FSIZE": file_bytes,
        "RLIMIT_NPROC": 0, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0,
    }
    for name, value in wanted.items():
        limit = getattr(resource, name, None)
        if limit is None:
            continue
        try:
            _, hard = resource.getrlimit(limit)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            # CPU: SIGXCPU at the soft limit, SIGKILL one second later.
            resource.setrlimit(limit, (value, value + 1 if name == "RLIMIT_CPU" else value))
        except (ValueError, OSError):
            pass


def install_guard(workdir: str) -> None:
    """Refuse writes and file changes outside `workdir`, new processes, signals, sockets, ctypes."""
    root = os.path.realpath(workdir)
    realpath, join, getcwd, readlink, fsdecode, isdir, write, exit_now = (
        os.path.realpath, os.path.join, os.getcwd, os.readlink, os.fsdecode, os.path.isdir,
        os.write, os._exit)

    def inside(path: object, dir_fd: object = None) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            relative_to_fd = isinstance(dir_fd, int) and dir_fd >= 0  # -1: none given
            base = readlink(f"/proc/self/fd/{dir_fd}") if relative_to_fd else getcwd()
            full = realpath(join(base, fsdecode(path)))
        except Exception:
            return False
        return full == root or full.startswith(root + os.sep) or full == os.devnull

    def refuse(event: str, detail: object) -> None:
        message = f"fedtune sandbox refused {event}: {detail!r}"[:500]
        write(2, f"\n{message}\n".encode(errors="replace"))
        exit_now(REFUSED_EXIT)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not inside(path):
                refuse("writing outside its directory", path)
            # os.open of an outside directory would give a dir_fd that later opens write through
            if mode is None and not inside(path) and isdir(path):
                refuse("os.open of a directory outside its directory", path)
        elif event in _PATH_EVENTS:
            for index, fd_index in _PATH_EVENTS[event]:
                dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                if not inside(args[index], dir_fd):
                    refuse(event + " outside its directory", args[index])
        elif event == "ctypes.dlopen" and args[0] is None:
            pass
        elif event in _ALWAYS_REFUSED or event.startswith(_REFUSED_PREFIXES):
            refuse(event, args[:2] if args else ())
        elif event == "import" and args[0] in _REFUSED_IMPORTS:
            refuse("import", args[0])

    for name in _REFUSED_IMPORTS:
        sys.modules.pop(name, None)
    sys.addaudithook(hook)


def main() -> None:
    program, workdir, memory, cpu, file_bytes = sys.argv[1:6]
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    with open(program, encoding="utf-8") as handle:
        code = compile(handle.read(), program, "exec")
    os.chdir(workdir)
    set_limits(int(memory), int(cpu), int(file_bytes))
    install_guard(workdir)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except SystemExit as exc:
        sys.stderr.write(f"\nthe program exited (SystemExit {exc.code!r}) before its tests finished\n")
        sys.stderr.flush()
        os._exit(1)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, f"\n{nonce}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main()
