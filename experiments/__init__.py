"""
The experiments: scripts that call train.py from above it. compare.py runs every algorithm over seeds, learning
rates and the places for the KL, and writes the tables and plots of docs/experiments.md; bench.py measures the
samplers, the seconds per iteration, TFLOP/s and memory. Nothing in train.py or lab/ imports them.
"""
