"""Sandbox launcher: `python -I -S sandbox_init.py CONFIG_HEX`, started by actors/tasks/sandbox.py.

Privileged set-up (namespaces, mounts, chroot, dropping to an unprivileged uid) runs here, in a
fresh single-threaded process started for each run, never in the threaded judge process (a
`preexec_fn` there could deadlock on a lock another thread held at fork). Standard library only
and few imports, since each costs start-up time on every run; `-I -S` keeps the judge's
PYTHONPATH and site-packages out. CONFIG_HEX is the run's config as hex-encoded `marshal` data.

With `namespaces` (root with CAP_SYS_ADMIN), the launcher enters new mount, network and pid
namespaces and forks the candidate as pid 1 of the new pid namespace, so when the candidate ends
or is killed the kernel kills everything it started, even processes that left its process group.
The candidate sees only a read-only view of the system directories and the interpreter, a fresh
/proc of its own namespace, a few /dev nodes, and /tmp: a size-limited tmpfs that is its only
writable place. Nothing else exists for it: not the host's /tmp (Ray's sockets), not the code
or the datasets with their expected outputs. The network namespace has only a loopback
device, and that is down.
Without namespaces (root lacking CAP_SYS_ADMIN, e.g. a default Docker container) the candidate
still runs as its own uid, and a seccomp filter refuses sockets other than AF_UNIX.

Either way the candidate runs under uid/gid UID_BASE + the launcher's pid (unique among live
runs, so RLIMIT_NPROC and `kill -1` never reach another run), with no supplementary groups,
no_new_privs, CPU/memory/process/file-size limits and a clean environment.

Protocol on the status fd, one Python dict literal per line (read with ast.literal_eval):
{"pid": host pid of the candidate} right after the fork; then either {"setup_error": message}
or, once the candidate is reaped, {"exit_code": int | None, "signal": int | None, "cpu_s": float}.
With a pid namespace, the kernel lets the candidate be reaped only after every process in its
namespace has gone, so that last line means the whole run is over.
"""
import ctypes
import marshal
import os
import resource
import signal
import sys

UID_BASE = 2_000_000_000
SETUP_FAILED = 125
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
SIGKILL = 9
SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
DEVICES = ("null", "zero", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags: int, data=None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)),
           f"mount {source} on {target}")


def _bind_read_only(path: str, target: str) -> None:
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(path, target, None, MS_BIND)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _mirror(path: str, root: str) -> None:
    """Make `path` appear read-only at the same place under `root` (symlinks stay symlinks)."""
    target = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(path), target)
    elif os.path.exists(path) and not os.path.lexists(target):
        _bind_read_only(path, target)


def build_root(config: dict, uid: int) -> None:
    """The candidate's filesystem: read-only system paths, its own /proc and /dev nodes, a tmpfs /tmp."""
    root = config["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['disk_mb']}m,mode=755")
    for path in SYSTEM_PATHS + (config["python_prefix"],):
        _mirror(path, root)
    for name in DEVICES:
        _bind_read_only(f"/dev/{name}", f"{root}/dev/{name}")
    os.makedirs(f"{root}/proc")
    _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    work = f"{root}/tmp"
    os.makedirs(work)
    with open(config["program"], "rb") as source, open(f"{work}/solution.py", "wb") as copy:
        copy.write(source.read())
    os.chown(work, uid, uid)
    os.chmod(work, 0o700)
    os.chroot(root)
    os.chdir("/tmp")


def refuse_sockets() -> None:
    """seccomp: socket(2) for any family but AF_UNIX, and io_uring_setup(2), fail with EACCES.

    Used where no network namespace can be made. Any other architecture, and the x32 ABI,
    kill the process, so the filter cannot be sidestepped through a second syscall table.
    """
    import struct  # only this fallback needs it; every import costs each run start-up time

    arch, nr_socket = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}[os.uname().machine]
    nr_io_uring_setup, af_unix, eacces = 425, 1, 13
    kill, allow, refuse = 0x80000000, 0x7FFF0000, 0x00050000 | eacces
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    program = [  # (code, jump if true, jump if false, k); jumps count from the next instruction
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill),         # seccomp_data.arch
        (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, kill),   # seccomp_data.nr; x32 ABI
        (jeq, 3, 0, nr_io_uring_setup), (jeq, 0, 3, nr_socket),
        (ld, 0, 0, 16), (jeq, 1, 0, af_unix),                          # args[0]: the address family
        (ret, 0, 0, refuse), (ret, 0, 0, allow),
    ]
    filters = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(filters)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0), "seccomp")


def drop_privileges(config: dict, uid: int) -> None:
    limits = config["limits"]
    cpu_s = int(limits["cpu_s"])
    for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, limits["memory_mb"] << 20),
                         (resource.RLIMIT_NPROC, limits["max_procs"]), (resource.RLIMIT_FSIZE, limits["file_mb"] << 20),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    # after setuid, which clears it: the candidate dies with the launcher, however the launcher ends
    _check(_libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if not config["namespaces"]:
        refuse_sockets()


def become_candidate(config: dict, uid: int, status_fd: int) -> None:
    """In the forked child: build the jail, drop to `uid`, exec the program. Never returns."""
    os.set_inheritable(status_fd, False)  # the candidate must not write status lines
    if config["namespaces"]:
        build_root(config, uid)
        program = "/tmp/solution.py"
    else:
        os.chown(config["work"], uid, uid)
        os.chdir(config["work"])
        program = config["program"]
    drop_privileges(config, uid)
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/tmp" if config["namespaces"] else config["work"],
                   "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    os.execve(config["python"], [config["python"], "-I", "-S", "-B", program], environment)


def report(status_fd: int, message: dict) -> None:
    os.write(status_fd, (repr(message) + "\n").encode())


def launch(config: dict) -> int:
    status_fd = config["status_fd"]
    # backstops should the judge die: the launcher goes with it, or at the latest after the wall limit
    _check(_libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig")
    signal.alarm(int(config["limits"]["wall_s"]) + 2)
    if config["namespaces"]:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
    uid = UID_BASE + os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            become_candidate(config, uid, status_fd)
        except BaseException as err:  # set-up failed: tell the judge, which fails loudly
            report(status_fd, {"setup_error": f"{type(err).__name__}: {err}"})
        os._exit(SETUP_FAILED)
    report(status_fd, {"pid": pid})
    _, status, usage = os.wait4(pid, 0)
    report(status_fd, {"exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                       "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                       "cpu_s": usage.ru_utime + usage.ru_stime})
    return 0


def probe() -> int:
    """Exit 0 if this process may create the namespaces a run uses (asked once per sandbox)."""
    return 0 if _libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET) == 0 else 1


def kill_uid(uid: int) -> int:
    """Kill every process of `uid` (runs without a pid namespace can leave their group)."""
    os.setgid(uid)
    os.setuid(uid)
    os.kill(-1, SIGKILL)  # as `uid`: every process of that uid, except this one
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--probe":
        sys.exit(probe())
    if sys.argv[1] == "--kill-uid":
        sys.exit(kill_uid(int(sys.argv[2])))
    sys.exit(launch(marshal.loads(bytes.fromhex(sys.argv[1]))))
