"""Workload defaults of `attnserve bench serve|sweep`, shared by the flags (cli.py) and the modules that apply them
(runner.py, datasets.py), which cli.py imports only when a command runs."""

DEFAULT_NUM_PROMPTS = 1000  # vLLM's default, so results compare
DEFAULT_DURATION_PROMPTS = 100  # distinct prompts cycled through when --duration is given
# vLLM's random-dataset defaults, lowered when the server's max_model_len is smaller (datasets.fit_lengths).
DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128
