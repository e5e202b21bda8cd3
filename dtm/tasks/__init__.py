"""Zero-shot task accuracy with EleutherAI lm-evaluation-harness.

`lm_eval_model.DtmLM` is an lm-eval model (`--model dtm`) backed by dtm's Flax Llama
(any `load_model` source, optionally compressed); `offline` points lm-eval's own task
configs at local copies of their datasets.
"""
