"""Answer one image question with the LLM sharded by transformers' own tensor parallelism.

    torchrun --nproc-per-node 2 recipes/tensor_parallel/tp_generate.py MODEL --image photo.jpg --question "What is it?"

`from_pretrained(MODEL, distributed_config=DistributedConfig(tp_plan="auto"))` (transformers before 5.24:
`tp_plan="auto"`) shards every LLM layer (attention heads and MLP columns, the token
embedding by vocabulary, the LM head gathered) over the processes; the vision encoders and projectors are
small beside the LLM and are replicated. Each process runs the same greedy decode; the first prints the answer.
On GPUs each process takes the GPU of its `LOCAL_RANK`; on CPU (gloo) it runs as is, which is what the test
suite does (`--dump FILE` saves the first step's logits and the answer's ids for its comparison).
"""

import argparse
import os

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, DistributedConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="SPHINX model folder or Hub id")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dump", help="save {'logits', 'ids'} of each process to DUMP.rank<N> (tests)")
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, distributed_config=DistributedConfig(tp_plan="auto"), dtype=args.dtype, trust_remote_code=True
    ).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(args.image).convert("RGB")
    inputs = processor(text=prompt, images=image, return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
    if args.dump:
        layer = model.model.language_model.layers[0].self_attn.q_proj.weight
        local = layer.to_local() if hasattr(layer, "to_local") else layer
        dumped = {"logits": logits.cpu(), "ids": ids.cpu(), "tp_size": model.tp_size, "q_proj": tuple(local.shape)}
        torch.save(dumped, f"{args.dump}.rank{os.environ.get('RANK', '0')}")
    if int(os.environ.get("RANK", "0")) == 0:
        answer = processor.decode(ids, skip_special_tokens=True)
        grounded = processor.post_process_generation(answer, image)
        print(grounded.text, *(f"box {[round(v, 1) for v in box]}" for box in grounded.boxes), sep="\n")


if __name__ == "__main__":
    main()
