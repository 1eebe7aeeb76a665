"""Answering requests: the web app of `sphinx-mllm serve` (`webapp`) and the OpenAI-compatible request a served
folder expects (`client`).

May import `inference`, `records` and `processing`; never training, evaluation or the miniature.
"""
