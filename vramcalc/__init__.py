"""vramcalc: GPU memory, time and cost of LLM fine-tuning, checked against real runs."""

__version__ = "0.1.0"
