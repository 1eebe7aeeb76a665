"""`sphinx-mllm` command line: init, chat, convert, mix, train, eval, push.

Heavy imports happen inside the commands that need them, so `--help`, `mix` and `push` start fast (see
`sphinx_mllm_cli`, the command's entry point).
"""

import argparse
import json
import os
import sys
from pathlib import Path


def register_models():
    """Run the package's `__init__` (Auto-class registration) if the launcher deferred it."""
    package = sys.modules[__package__]
    if not hasattr(package, "SphinxConfig"):
        package.__spec__.loader.exec_module(package)


def _cmd_init(args):
    register_models()
    from .folder.create import init_model

    out = init_model(args.variant, args.out, tiny=args.tiny, tokenizer_model=args.tokenizer, seed=args.seed)
    print(f"wrote a random {'tiny ' if args.tiny else ''}{args.variant} model to {out}")


def _cmd_convert(args):
    register_models()
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


def _cmd_mix(args):
    from .mixing import mix

    out = mix(args.recipe, args.out, max_shard_size=args.max_shard_size)
    print(f"mixed {args.recipe} into {out}")


def _cmd_train(args):
    register_models()
    from .records import DataError
    from .training.sft import main as train_main

    if not Path(args.config).is_file():
        raise ValueError(f"training config {args.config!r} does not exist")
    try:
        out = train_main(["--config", args.config, *args.overrides])
    except DataError as error:
        raise ValueError(str(error)) from None
    print(f"trained model saved to {out}" if out else "trained (save_final_model is off: no final model folder)")


def _cmd_eval(args):
    register_models()
    from .evaluation.runner import evaluate, record_in_card

    processor, model = _load(args)
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
        if not Path(args.model).is_dir():
            raise ValueError("--record-in-card writes into a local model folder's README.md")
        card = record_in_card(args.model, args.task, args.dataset_name or Path(args.data).stem, results)
        print(f"recorded the results in {card}")


def _cmd_demo(args):
    register_models()
    if args.action == "pretrain":
        from .miniature.pretrain import pretrain

        if args.target is None:
            raise ValueError("demo pretrain needs the output folder: sphinx-mllm demo pretrain OUT")
        out = pretrain(args.target, quick=args.quick, seed=args.seed)
        manifest = json.loads((out / "manifest.json").read_text())
        print(json.dumps({"metrics": manifest["metrics"], "at random init": manifest["metrics_at_random_init"]}))
        print(f"wrote the pretrained parts to {out} in {manifest['seconds']:.0f} s")
        return
    if args.ablations:
        from .miniature.ablations import format_ablations, run_ablations

        run_ablations(args.out, quick=args.quick, force=args.force, seed=args.seed)
        print(format_ablations(json.loads((Path(args.out) / "ablations" / "results.json").read_text())))
        print(f"tables, plots and results: {Path(args.out) / 'ablations'}/report.md, *.png, results.json")
        return
    from .miniature.demo import format_report, run_demo

    results = run_demo(args.out, quick=args.quick, force=args.force, seed=args.seed)
    print(format_report(results))
    print(
        f"best model, with the table in its card: {Path(args.out) / 'best'}; drawn answers: {args.out}/example_*.png"
    )


def _cmd_push(args):
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


def _load(args):
    from .inference import load_pretrained

    return load_pretrained(
        args.model,
        dtype=args.dtype,
        device_map=args.device_map,
        load_in_4bit=args.load_in_4bit,
        use_kernels=args.use_kernels,
    )


def _cmd_chat(args):
    register_models()
    from .inference import Chat, draw_answer, read_answer
    from .records import open_image

    image = open_image(args.image)  # fails early, with the file named, on a bad image
    processor, model = _load(args)
    chat = Chat(model, processor, image)
    prompts = [args.prompt] if args.prompt is not None else None
    while True:
        if prompts is None:
            try:
                prompt = input("human> ").strip()
            except EOFError:
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
            print(f"drew {len(grounded.boxes)} boxes and {len(grounded.points)} points into {args.draw}")


def _add_loading_arguments(parser: argparse.ArgumentParser):
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


def _login(args) -> tuple[str, str] | None:
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


def _cmd_serve(args):
    auth = _login(args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('the web app needs the demo extra: pip install "sphinx-mllm[demo]"') from None
    register_models()
    from .serving.webapp import build_app

    processor, model = _load(args)
    app = build_app(model, processor, title=f"SPHINX · {Path(args.model).name}")
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False, auth=auth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sphinx-mllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="write a randomly initialised model with its processor")
    init.add_argument("out", help="output folder (must not exist or be empty)")
    init.add_argument("--variant", default="sphinx-1k", help="release name, e.g. sphinx, sphinx-1k, sphinx-tiny")
    init.add_argument("--tiny", action="store_true", help="small widths, the same token geometry")
    init.add_argument("--tokenizer", help="SentencePiece tokenizer.model (required for full-size models)")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_cmd_init)

    chat = commands.add_parser("chat", help="answer a prompt about an image (interactive without --prompt)")
    chat.add_argument("model", help="model folder or Hub id")
    chat.add_argument("--image", required=True)
    chat.add_argument("--prompt")
    chat.add_argument("--draw", help="write the image with the parsed boxes and points to this PNG")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    _add_loading_arguments(chat)
    chat.set_defaults(func=_cmd_chat)

    serve = commands.add_parser("serve", help="a web app to chat about images, boxes drawn (the demo extra)")
    serve.add_argument("model", help="model folder or Hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--auth", help="USER:PASSWORD, Gradio's login (required off loopback unless --public)")
    serve.add_argument("--public", action="store_true", help="serve on a network address without a login")
    _add_loading_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    convert = commands.add_parser("convert", help="original LLaMA2-Accessory checkpoint folder → HF folder")
    convert.add_argument(
        "src", help="folder with consolidated.XX-of-NN.model.pth, config.json, meta.json, tokenizer.model"
    )
    convert.add_argument("out", help="output folder (must not exist or be empty)")
    convert.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    convert.add_argument("--verify", action="store_true", help="reload, compare every tensor, run one forward")
    convert.add_argument("--max-shard-size", default="5GB")
    convert.add_argument("--encoder-sizes", help="JSON of non-released encoder sizes, in the original's terms")
    convert.set_defaults(func=_cmd_convert)

    mix = commands.add_parser("mix", help="mix checkpoints from a mergekit-style YAML recipe")
    mix.add_argument("recipe", help="recipe YAML (model paths relative to it)")
    mix.add_argument("out", help="output folder (must not exist or be empty)")
    mix.add_argument("--max-shard-size", default="2GB")
    mix.set_defaults(func=_cmd_mix)

    train = commands.add_parser(
        "train",
        help="multi-task SFT with TRL from a recipe YAML (recipes/sft/); extra --key value pairs override it",
    )
    train.add_argument("config", help="recipe YAML: SphinxTuningArguments and TRL SFTConfig fields")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="e.g. --max_steps 10 --output_dir runs/x")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="score a model on one task over local data")
    evaluate.add_argument("model", help="model folder or Hub id")
    evaluate.add_argument(
        "--task", required=True, help="vqa, vizwiz, multiple_choice, pope, rec, region_caption or detection"
    )
    evaluate.add_argument("--data", required=True, help="JSONL, JSON or Parquet file, or a datasets folder")
    evaluate.add_argument("--out", help="output folder (default runs/eval/MODEL-TASK)")
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--limit", type=int, help="only the first N rows")
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")
    evaluate.add_argument(
        "--prompt-template",
        help="one instruction with a {content} field in place of the task's own (as the model was tuned with)",
    )
    evaluate.add_argument("--record-in-card", action="store_true", help="add the metrics to the folder's model card")
    evaluate.add_argument("--dataset-name", help="name for the card's model-index (default: the data file's name)")
    _add_loading_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    demo = commands.add_parser(
        "demo",
        help="SPHINX's recipe in miniature: train, mix, tune, evaluate (offline, CPU); "
        "`demo pretrain OUT` remakes its pretrained parts",
    )
    demo.add_argument("action", nargs="?", choices=["pretrain"], help="pretrain: make the pretrained parts")
    demo.add_argument("target", nargs="?", help="with pretrain: the output folder (must not exist or be empty)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a smaller world and fewer steps (for tests)")
    demo.add_argument("--force", action="store_true", help="redo every stage instead of reusing finished ones")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--ablations",
        action="store_true",
        help="the paper's task-mix and visual-embedding-mix ablations (reuses the main job's stages in --out)",
    )
    demo.set_defaults(func=_cmd_demo)

    push = commands.add_parser("push", help="upload a model folder to the Hub with a rendered model card")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to commit to (created if missing)")
    push.add_argument("--commit-message")
    push.add_argument("--license", help="license id for the card metadata, e.g. llama2")
    push.set_defaults(func=_cmd_push)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "use_kernels", False):
        os.environ["USE_HUB_KERNELS"] = "YES"  # transformers' switch, read by bitsandbytes' import guard too
    try:
        args.func(args)
    except ValueError as error:
        print(f"sphinx-mllm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
