"""Makes every Hub kernel fetcher of the `kernels` library fail loudly, for `tests/test_hub_kernels.py`.

A child process gets this folder on `PYTHONPATH`. Before anything else imports `kernels`, its functions that
download or load a kernel (`get_kernel` and its siblings, `kernelize`, and the resolver that layer and function
repositories load through) are replaced with one that prints `LOUD_KERNEL_FETCH <what>` to stderr and raises.
transformers and bitsandbytes bind these names when they import them, so they get the loud ones too.
"""

import sys

try:
    import kernels
    from kernels._internals import load
    from kernels._internals.layer import func, layer
except ImportError:
    kernels = None

MARKER = "LOUD_KERNEL_FETCH"


def _loud(name):
    def fetch(*args, **kwargs):
        print(f"{MARKER} {name} {args[:1]}", file=sys.stderr, flush=True)
        raise RuntimeError(f"{MARKER}: {name} was called")

    return fetch


if kernels is not None:
    for name in ("get_kernel", "get_local_kernel", "get_locked_kernel", "load_kernel", "install_kernel", "kernelize"):
        setattr(kernels, name, _loud(name))
    for module in (load, func, layer):
        module.get_kernel_with_resolver = _loud("get_kernel_with_resolver")
