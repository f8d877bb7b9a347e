"""
The lab: what serves scale, speed and experiments, beside the algorithm: modules that the algorithm's files call
(the checks, the run folder, data parallel, Hugging Face checkpoints, LoRA, the GPU sampler, the exact evaluator),
and the scripts compare.py and bench.py. A reader of the algorithm (apa.py, ppo.py, grpo.py,
model.py, data.py, train.py) need not open them.
"""
