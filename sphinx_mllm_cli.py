"""Entry point of the `sphinx-mllm` command.

`import modeling_sphinx` registers the SPHINX classes with transformers' Auto classes, which imports torch,
torchvision, timm and transformers' model code: seconds of start-up. Most of the command line needs none of
it (`--help`, `mix`, `push`), so this launcher loads the package without running its `__init__`;
`modeling_sphinx.cli.register_models()` runs it for the commands that load models. Only this process is
affected: any other `import modeling_sphinx` registers as usual.
"""

import importlib.util
import sys


def main() -> int:
    if "modeling_sphinx" not in sys.modules:
        spec = importlib.util.find_spec("modeling_sphinx")
        sys.modules["modeling_sphinx"] = importlib.util.module_from_spec(spec)
    from modeling_sphinx.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
