"""`sphinx-mllm`: the command table.

Each command is one row of `COMMANDS`: its name, its help, the function that adds its arguments, the function that
runs it, whether it needs the model stack (the Auto-class registration, which imports torch, timm and transformers'
model code: seconds), and an optional check of its arguments that runs before that. `main` registers once for the
commands that need it, so `--help`, `mix` and `push` start fast (the launcher, `sphinx_mllm_cli`, loads the package
without running its `__init__`). A command with subcommands (`demo`) lists them as rows of its own. Adding a command
is adding a row.

`main` is the one error boundary: bad input (a `ValueError`, or a file that is missing, a folder, unreadable) ends
in one line on stderr naming it and exit status 2; any other failure in one line, exit status 1, and a hint that
`--debug` (or `SPHINX_MLLM_DEBUG=1`) shows the traceback; Ctrl-C in exit status 130 without a word. The checks
that need no model (numbers in range, output paths, the model folder, the image) run before anything loads.

Flags are written with dashes (`--max-new-tokens`). `train` passes the rest of its command line to TRL's parser,
which takes dashes and underscores alike (`--max-steps`, `--max_steps`). `demo --ablations` is the old spelling of
`demo ablations`, kept working for a release.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def register_models():
    """Run the package's `__init__` (Auto-class registration) if the launcher deferred it."""
    package = sys.modules[__package__]
    if not hasattr(package, "SphinxConfig"):
        package.__spec__.loader.exec_module(package)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    needs_models: bool = True
    subcommands: tuple["Command", ...] = field(default=())
    check: Callable[[argparse.Namespace], None] | None = None


# ------------------------------------------------------------------------------------------------------ init


def init_arguments(parser):
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--variant", default="sphinx-1k", help="release name, e.g. sphinx, sphinx-1k, sphinx-tiny")
    parser.add_argument("--tiny", action="store_true", help="small widths, the same token geometry")
    parser.add_argument("--tokenizer", help="SentencePiece tokenizer.model (required for full-size models)")
    parser.add_argument("--seed", type=int, default=0)


def check_output(args):
    from .folder.atomic import refuse_non_empty

    refuse_non_empty(args.out)


def run_init(args):
    from .folder.create import init_model

    out = init_model(args.variant, args.out, tiny=args.tiny, tokenizer_model=args.tokenizer, seed=args.seed)
    print(f"wrote a random {'tiny ' if args.tiny else ''}{args.variant} model to {out}")


# ------------------------------------------------------------------------------------- chat, serve, eval: loading


def loading_arguments(parser):
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device-map", default=None, help='e.g. "auto" to spread the model over GPUs')
    parser.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="the LLM in 4-bit NF4 (bitsandbytes), towers and projectors in 16-bit",
    )
    parser.add_argument(
        "--use-kernels",
        action="store_true",
        help="let transformers swap layers for Hub kernels, downloaded from the Hub at first use (off by default)",
    )


def load(args):
    from .inference import load_pretrained

    return load_pretrained(
        args.model,
        dtype=args.dtype,
        device_map=args.device_map,
        load_in_4bit=args.load_in_4bit,
        use_kernels=args.use_kernels,
    )


def check_loading(args):
    """The model names a folder that is one, or a Hub id; `--device-map` names a device this machine has."""
    from .inference import check_device_map, local_model_folder

    local_model_folder(args.model)
    check_device_map(args.device_map)


def positive(value: str) -> int:
    """argparse type of a count that must be at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def chat_arguments(parser):
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--image", required=True, help="image file to ask about")
    parser.add_argument("--prompt", help="one question, answered once (interactive without it)")
    parser.add_argument("--draw", help="write the image with the parsed boxes and points to this file (.png, .jpg)")
    parser.add_argument("--max-new-tokens", type=positive, default=256, help="longest answer, in tokens")
    loading_arguments(parser)


def check_chat(args):
    from .records import open_image

    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: ask something, or leave --prompt out for a conversation")
    open_image(args.image)
    if args.draw:
        check_image_output(args.draw, "--draw")
    check_loading(args)


def check_image_output(path: str, flag: str):
    import PIL.Image

    PIL.Image.init()
    target = Path(path)
    if target.suffix.lower() not in PIL.Image.registered_extensions():
        raise ValueError(f"{flag} {path}: not an image file name; end it in .png or .jpg")
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {str(target.parent)!r} does not exist; create it first")
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('x') else 's'}"


def run_chat(args):
    from .inference import Chat, draw_answer, read_answer
    from .records import open_image

    image = open_image(args.image)
    processor, model = load(args)
    chat = Chat(model, processor, image)
    interactive = args.prompt is None
    if interactive:
        print("Ask about the image; an empty line or Ctrl-D ends the conversation.")
    prompts = [args.prompt]
    while True:
        if interactive:
            try:
                prompt = input("human> ").strip()
            except EOFError:
                print()
                break
            if not prompt:
                break
        elif prompts:
            prompt = prompts.pop()
        else:
            break
        text = chat.ask(prompt, max_new_tokens=args.max_new_tokens)
        print(text)
        if args.draw:
            grounded = read_answer(processor, text, image)
            draw_answer(image, grounded).save(args.draw)
            boxes, points = counted(len(grounded.boxes), "box"), counted(len(grounded.points), "point")
            print(f"drew {boxes} and {points} into {args.draw}")


def serve_arguments(parser):
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=port_number, default=7860)
    parser.add_argument("--auth", help="USER:PASSWORD, Gradio's login (required off loopback unless --public)")
    parser.add_argument("--public", action="store_true", help="serve on a network address without a login")
    loading_arguments(parser)


def port_number(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {number}")
    return number


def check_serve(args):
    login(args)
    check_loading(args)


def login(args) -> tuple[str, str] | None:
    """Gradio's login from `--auth USER:PASSWORD`; refuses to open the model to a network without one, unless
    `--public` says that is meant."""
    import ipaddress

    auth = None
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not (user and colon and password):
            raise ValueError("--auth is USER:PASSWORD (Gradio's login), both non-empty")
        auth = (user, password)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if not loopback and auth is None and not args.public:
        raise ValueError(
            f"--host {args.host} lets anyone who can reach this machine use the model: pass --auth USER:PASSWORD "
            "(Gradio's login), or --public to serve it open on purpose"
        )
    return auth


def run_serve(args):
    auth = login(args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('the web app needs the demo extra: pip install "sphinx-mllm[demo]"') from None
    from .serving.webapp import build_app

    processor, model = load(args)
    app = build_app(model, processor, title=f"SPHINX · {Path(args.model).name}")
    # quiet: Gradio's own lines tell a Python caller to "set `share=True` in `launch()`", which a CLI user cannot
    app.queue().launch(
        server_name=args.host,
        server_port=args.port,
        show_error=True,
        ssr_mode=False,
        auth=auth,
        quiet=True,
        prevent_thread_lock=True,
    )
    print(f"serving {args.model} at http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    app.block_thread()


def eval_arguments(parser):
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument(
        "--task", required=True, help="vqa, vizwiz, multiple_choice, pope, rec, region_caption or detection"
    )
    parser.add_argument("--data", required=True, help="JSONL, JSON or Parquet file, or a datasets folder")
    parser.add_argument("--out", help="output folder (default runs/eval/MODEL-TASK)")
    parser.add_argument("--batch-size", type=positive, default=4, help="questions answered together")
    parser.add_argument("--limit", type=positive, help="only the first N rows")
    parser.add_argument("--max-new-tokens", type=positive, default=64, help="longest answer, in tokens")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")
    parser.add_argument(
        "--prompt-template",
        help="one instruction with a {content} field in place of the task's own (as the model was tuned with)",
    )
    parser.add_argument("--record-in-card", action="store_true", help="add the metrics to the folder's model card")
    parser.add_argument("--dataset-name", help="name for the card's model-index (default: the data file's name)")
    loading_arguments(parser)


def check_eval(args):
    from .evaluation import read_task_rows

    read_task_rows(args.task, args.data)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the predictions and metrics")
    if args.record_in_card and not Path(args.model).is_dir():
        raise ValueError("--record-in-card writes into a local model folder's README.md")
    check_loading(args)


def run_eval(args):
    from .evaluation import evaluate, record_in_card

    processor, model = load(args)
    out = Path(args.out or Path("runs") / "eval" / f"{Path(args.model).name}-{args.task}")
    results = evaluate(
        model,
        processor,
        args.task,
        args.data,
        out,
        batch_size=args.batch_size,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        resume=args.resume,
        prompt_template=args.prompt_template,
    )
    print(json.dumps(results, indent=2))
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    if args.record_in_card:
        card = record_in_card(args.model, args.task, args.dataset_name or Path(args.data).stem, results)
        print(f"recorded the results in {card}")


# ------------------------------------------------------------------------------- convert, mix, train, push


def convert_arguments(parser):
    parser.add_argument(
        "src", help="folder with consolidated.XX-of-NN.model.pth, config.json, meta.json, tokenizer.model"
    )
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--verify", action="store_true", help="reload, compare every tensor, run one forward")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--encoder-sizes", help="JSON file of non-released encoder sizes, in the original's terms")


def run_convert(args):
    from .folder.convert import convert_checkpoint

    out = convert_checkpoint(
        args.src,
        args.out,
        dtype=args.dtype,
        verify=args.verify,
        max_shard_size=args.max_shard_size,
        encoder_sizes=args.encoder_sizes,
    )
    print(f"converted {args.src} to {out}" + (" (verified)" if args.verify else ""))


def mix_arguments(parser):
    parser.add_argument("recipe", help="recipe YAML (model paths relative to it)")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--max-shard-size", default="2GB")


def check_mix(args):
    from .mixing import load_recipe

    load_recipe(args.recipe)
    check_output(args)


def run_mix(args):
    from .mixing import mix

    out = mix(args.recipe, args.out, max_shard_size=args.max_shard_size)
    print(f"mixed {args.recipe} into {out}")


def extract_lora_arguments(parser):
    parser.add_argument("base", help="the base SPHINX model folder")
    parser.add_argument("tuned", help="a fine-tune of it, of the same architecture")
    parser.add_argument("out", help="output folder for the PEFT adapter (must not exist or be empty)")
    parser.add_argument("--rank", type=positive, default=32, help="the adapter's rank per linear layer")


def run_extract_lora(args):
    from .mixing.extract_lora import extract_lora

    summary = extract_lora(args.base, args.tuned, args.out, rank=args.rank)
    for module, layer in summary["layers"].items():
        print(f"{module}: rank {layer['rank']}, kept energy {layer['kept_energy']:.6f}")
    print(
        f"extracted {len(summary['layers'])} layers at rank {args.rank} into {args.out}, kept energy "
        f"{summary['overall_kept_energy']:.6f} overall"
    )
    if summary["carried_modules"]:
        print(f"carried whole (modules_to_save): {', '.join(summary['carried_modules'])}")
    for name, difference in summary["not_carried"].items():
        print(f"left out (PEFT cannot save it): {name}, relative difference {difference:.3g}")


def train_arguments(parser):
    parser.add_argument("config", help="recipe YAML: SphinxTuningArguments and TRL SFTConfig fields")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="e.g. --max-steps 10 --output-dir runs/x")


def check_train(args):
    from .schema import read_yaml_file

    shape = "a training config is a mapping of SphinxTuningArguments and TRL SFTConfig fields"
    read_yaml_file(args.config, "training config", ValueError, shape)


def run_train(args):
    from .records import DataError
    from .training import main as train_main

    try:
        out = train_main(["--config", args.config, *args.overrides])
    except DataError as error:
        raise ValueError(str(error)) from None
    print(f"trained model saved to {out}" if out else "trained (save_final_model is off: no final model folder)")


def push_arguments(parser):
    parser.add_argument("folder")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to commit to (created if missing)")
    parser.add_argument("--commit-message")
    parser.add_argument("--license", help="license id for the card metadata, e.g. llama2")


def run_push(args):
    from .folder.publish import push_folder

    info = push_folder(
        args.folder,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        license=args.license,
    )
    print(f"pushed {args.folder} to {info.commit_url}")


# ------------------------------------------------------------------------------------------------------ demo


def demo_options(parser, inherited: bool = False):
    """The options every demo program takes; a subcommand's copies set only what its own command line gives."""
    default = (lambda value: argparse.SUPPRESS) if inherited else (lambda value: value)
    # the formatter shows a default only where it is set; a subcommand's copy says it in words
    where = "the run folder" + (" (default: runs/demo)" if inherited else "")
    parser.add_argument("--out", default=default("runs/demo"), help=where)
    parser.add_argument("--quick", action="store_true", default=default(False), help="a smaller world, fewer steps")
    parser.add_argument("--force", action="store_true", default=default(False), help="redo every stage")
    parser.add_argument("--seed", type=int, default=default(0))


def demo_arguments(parser):
    demo_options(parser)
    parser.add_argument("--ablations", action="store_true", help=argparse.SUPPRESS)  # the old `demo ablations`


def run_demo(args):
    if args.ablations:
        return run_ablations(args)
    from .miniature.demo import format_report
    from .miniature.demo import run_demo as run

    results = run(args.out, quick=args.quick, force=args.force, seed=args.seed)
    print(format_report(results))
    print(f"the model, with the table in its card: {Path(args.out) / 'best'}; drawn answers: {args.out}/example_*.png")


def run_ablations(args):
    from .miniature.ablations import format_ablations
    from .miniature.ablations import run_ablations as run

    run(args.out, quick=args.quick, force=args.force, seed=args.seed)
    print(format_ablations(json.loads((Path(args.out) / "ablations" / "results.json").read_text())))
    print(f"tables, plots and results: {Path(args.out) / 'ablations'}/report.md, *.png, results.json")


def pretrain_arguments(parser):
    parser.add_argument("target", help="output folder for the parts (must not exist or be empty)")
    demo_options(parser, inherited=True)


def run_pretrain(args):
    from .miniature.pretrain import pretrain

    out = pretrain(args.target, quick=args.quick, seed=args.seed, progress=print)
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"metrics": manifest["metrics"], "at random init": manifest["metrics_at_random_init"]}))
    print(f"wrote the pretrained parts to {out} in {manifest['seconds']:.0f} s")


COMMANDS = (
    Command(
        "init", "write a randomly initialised model with its processor", init_arguments, run_init, check=check_output
    ),
    Command(
        "chat",
        "answer a prompt about an image (interactive without --prompt)",
        chat_arguments,
        run_chat,
        check=check_chat,
    ),
    Command(
        "serve",
        "a web app to chat about images, boxes drawn (the demo extra)",
        serve_arguments,
        run_serve,
        check=check_serve,
    ),
    Command(
        "convert",
        "original LLaMA2-Accessory checkpoint folder → HF folder",
        convert_arguments,
        run_convert,
        check=check_output,
    ),
    Command(
        "mix",
        "mix checkpoints from a mergekit-style YAML recipe",
        mix_arguments,
        run_mix,
        needs_models=False,
        check=check_mix,
    ),
    Command(
        "extract-lora",
        "a PEFT LoRA adapter of the difference between a fine-tune and its base (truncated SVD)",
        extract_lora_arguments,
        run_extract_lora,
        needs_models=False,
        check=check_output,
    ),
    Command(
        "train",
        "multi-task SFT with TRL from a recipe YAML (recipes/sft/); extra --key value pairs override it",
        train_arguments,
        run_train,
        check=check_train,
    ),
    Command("eval", "score a model on one task over local data", eval_arguments, run_eval, check=check_eval),
    Command(
        "demo",
        "SPHINX's recipe in miniature: train, mix, tune, evaluate (offline, CPU)",
        demo_arguments,
        run_demo,
        subcommands=(
            Command(
                "ablations",
                "the paper's four mixes as ablations: weights, tasks, encoders, scales (reuses the main job's stages)",
                lambda parser: demo_options(parser, inherited=True),
                run_ablations,
            ),
            Command("pretrain", "remake the pretrained parts the demo starts from", pretrain_arguments, run_pretrain),
        ),
    ),
    Command(
        "push",
        "upload a model folder to the Hub with a rendered model card",
        push_arguments,
        run_push,
        needs_models=False,
    ),
)


DESCRIPTION = "SPHINX multimodal models: make, convert, mix, fine-tune, evaluate, chat with, serve and publish them."
DEBUG_VARIABLE = "SPHINX_MLLM_DEBUG"
# a missing, unreadable or misplaced file or folder that the user named: bad input, not a failure of the package
USER_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one line, the command named, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, when it has one worth showing."""

    def _get_help_string(self, action):
        help = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in help
        return f"{help} (default: %(default)s)" if shown and action.option_strings else help


def add_commands(parser: argparse.ArgumentParser, commands: tuple[Command, ...], dest: str, required: bool):
    table = parser.add_subparsers(dest=dest, required=required)
    for command in commands:
        sub = table.add_parser(
            command.name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        command.arguments(sub)
        sub.set_defaults(command=command)
        if command.subcommands:
            add_commands(sub, command.subcommands, f"{dest}_{command.name}", required=False)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name):
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    return f"sphinx-mllm {of('sphinx-mllm')} (transformers {of('transformers')}, torch {of('torch')})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sphinx-mllm", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=version())
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of a failure (or set {DEBUG_VARIABLE}=1)"
    )
    add_commands(parser, COMMANDS, "command_name", required=True)
    return parser


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def main(argv=None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
    except SystemExit as stop:  # --help, --version, or a parse error already printed in one line
        return stop.code
    words = " ".join(word for word in (args.command_name, getattr(args, "command_name_demo", None)) if word)
    prefix = f"sphinx-mllm {words}: error:"
    if unknown:
        print(
            f"{prefix} unrecognized arguments: {' '.join(unknown)} (see sphinx-mllm {words} --help)", file=sys.stderr
        )
        return 2
    command = args.command
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    if getattr(args, "use_kernels", False):
        os.environ["USE_HUB_KERNELS"] = "YES"  # transformers' switch, read by bitsandbytes' import guard too
    try:
        if command.check is not None:
            command.check(args)
        if command.needs_models:
            register_models()
        command.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if debug:
            raise
        if isinstance(error, ValueError):
            print(f"{prefix} {one_line(error)}", file=sys.stderr)
            return 2
        if isinstance(error, USER_PATH_ERRORS):
            print(f"{prefix} {error.filename or ''}: {error.strerror or one_line(error)}", file=sys.stderr)
            return 2
        print(
            f"{prefix} internal error, {type(error).__name__}: {one_line(error)} (the traceback: "
            f"sphinx-mllm --debug {args.command_name} ..., or {DEBUG_VARIABLE}=1)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
