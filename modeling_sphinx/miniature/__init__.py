"""The miniature: `sphinx-mllm demo`, SPHINX's recipe at a size that runs in minutes on two CPU cores.

- `world`: the generated scenes, in a real-like and a synthetic domain, and their captions;
- `pretrain`: the pretrained parts the demo starts from (shipped in `pretrained/`), and how they are remade;
- `recipe`: the stages both programs run (budget, data, stage 1 and its continuation, the weight mix, stage 2,
  scoring, report words);
- `demo`: the main job, SPHINX's schedule on one line of models;
- `ablations`: the paper's four mixes (weights, tasks, visual embeddings, scales), every arm on the same budget.

Uses the package's public tools like any user program; no tool imports the miniature.
"""
