"""Hub kernels stay off unless asked for.

A Hub kernel is compiled code that the `kernels` library downloads from the Hugging Face Hub and runs. Two
parts of the stack fetch them without being asked:

- transformers' `from_pretrained` kernelizes by default (its `use_kernels=None` counts as yes unless the
  environment says `USE_HUB_KERNELS=NO`); on CUDA it then swaps LLaMA's rotary embedding, RMSNorm and activations
  for kernels it downloads at first use, so training on an offline GPU machine fails at its first step with
  "Version 2 of 'kernels-community/rotary' is not available in the local cache";
- bitsandbytes fetches `kernels-community/quantization-bitsandbytes` when it is imported on a CPU with
  AVX512-BF16 (PEFT and TRL import it), and logs a line when it cannot.

So SPHINX models load with `use_kernels=False` unless asked (`SphinxPreTrainedModel.from_pretrained`), and
importing `modeling_sphinx` installs `refuse_on_bitsandbytes_import`, which imports bitsandbytes with its Hub
fetch refused and its notice about that left unprinted (bitsandbytes then uses its own CPU code, as it does
offline). Asking for them: `use_kernels=True` in `load_model` or `from_pretrained`, `use_kernels: true` in a
training recipe, or `USE_HUB_KERNELS=YES` (transformers' own switch) in the environment, which the commands'
`--use-kernels` sets and which alone also lets bitsandbytes fetch its kernel (it does so when imported). What
they download is listed in `docs/gpu.md`.
"""

import importlib.abc
import importlib.util
import logging
import sys
from contextlib import contextmanager

from .modeling_sphinx import hub_kernels_requested_by_environment

logger = logging.getLogger(__name__)


class HubKernelRefused(RuntimeError):
    pass


def _refuse(repo_id, *args, **kwargs):
    raise HubKernelRefused(f"{repo_id}: Hub kernels are off (sphinx-mllm: --use-kernels turns them on)")


@contextmanager
def _hub_fetch_refused(quiet_logger: str):
    """Inside: `kernels.get_kernel` raises instead of downloading, and `quiet_logger` prints nothing below ERROR."""
    try:
        import kernels
    except ImportError:  # transformers before 5.22 does not bring the kernels library
        kernels = None
    fetch = kernels.get_kernel if kernels is not None else None
    quiet = logging.getLogger(quiet_logger)
    level = quiet.level
    if kernels is not None:
        kernels.get_kernel = _refuse
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if kernels is not None:
            kernels.get_kernel = fetch
        quiet.setLevel(level)


class _RefusingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # the package sees its own loader
        with _hub_fetch_refused(module.__name__):
            self.loader.exec_module(module)
        logger.debug("imported %s with its Hub kernel fetch refused", module.__name__)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _BitsandbytesImport(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as usual and runs its import with Hub fetches refused, unless the environment asks for them."""

    name = "bitsandbytes"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or hub_kernels_requested_by_environment():
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RefusingLoader(spec.loader)
                return spec
        return None


def refuse_on_bitsandbytes_import():
    """Install the import guard (once); an already imported bitsandbytes is left as it is."""
    if not any(isinstance(finder, _BitsandbytesImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesImport())
