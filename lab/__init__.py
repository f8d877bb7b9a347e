"""
The lab: what serves scale, speed and experiments, beside the algorithm. train.py calls each of these modules in
one place, and a reader of the algorithm (apa.py, ppo.py, grpo.py, model.py, data.py, train.py) need not open them.
"""
