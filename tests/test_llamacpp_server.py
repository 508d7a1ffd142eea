"""The embedded llama.cpp server does not outlive its driver, and its log is private."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

DRIVER = textwrap.dedent("""
    import sys, time
    from ray_e5.generate.llamacpp import LlamaCppServer
    with LlamaCppServer(startup_s=300) as server:
        print(server.pid, server.log_path, flush=True)
        time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_server_dies_with_a_sigkilled_driver_and_logs_privately():
    psutil = pytest.importorskip("psutil", reason="psutil (the dev extra) lists the processes")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        line = driver.stdout.readline().split()
        assert len(line) == 2, driver.stderr.read()[-3000:]
        pid, log_path = int(line[0]), line[1]
        assert psutil.pid_exists(pid) and psutil.Process(pid).ppid() == driver.pid
        mode = stat.S_IMODE(os.stat(log_path).st_mode)
        assert mode & 0o077 == 0, oct(mode)  # only its owner reads it
        assert f"ray-e5-llamacpp-{driver.pid}.log" not in log_path  # not a name another user could predict
        driver.send_signal(signal.SIGKILL)  # no clean-up runs in the driver
        driver.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
            time.sleep(0.2)
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
        assert not alive, f"the llama.cpp server (pid {pid}) outlived its SIGKILLed driver"
    finally:
        if driver.poll() is None:
            driver.kill()
