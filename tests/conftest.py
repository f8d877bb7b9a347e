"""Lets the tests in this folder import the top-level modules (train, data, apa, ppo) from any working directory."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
