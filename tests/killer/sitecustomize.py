"""Kills the Python process that loads it at a chosen point, for the interruption tests (`tests/test_kill.py`).

A child process gets this folder on `PYTHONPATH` and `SPHINX_KILL=module:Class.method:count:when`; the
`count`-th call of that function SIGKILLs the process, `before` it runs or `after` it returns. SIGKILL cannot be
caught, so nothing of the program's own cleanup runs: what is left is what a power cut or the OOM killer leaves.
"""

import functools
import importlib
import os
import signal

spec = os.environ.get("SPHINX_KILL")
if spec:
    module_name, attribute, count, when = spec.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = {"n": 0}

    @functools.wraps(original)
    def killing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(count) and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls["n"] == int(count) and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, killing)
