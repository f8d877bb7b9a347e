"""
The lab: what serves scale, speed and real checkpoints beside the algorithm, called from train.py alone: the checks
(checks.py), the command line (cli.py), the run folder, resume and the cached pi_init (runs.py), data parallel
(ddp.py), Hugging Face checkpoints, tokenizers and reward models (hf.py), LoRA and bf16 frozen weights (lora.py),
the GPU's CUDA-graph sampler (static_sampler.py) and the exact evaluator (exact.py). The algorithm's files (apa.py,
ppo.py, grpo.py, model.py, data.py, evaluation.py) never import lab/; its modules import them and each other,
never train.py. The experiments that call train.py are in experiments/.
"""
