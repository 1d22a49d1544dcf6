"""The use cases behind the CLI commands: each joins data, models, diffusion and tracking.

One module per command (`train`, `explain`, `evaluate`, `inspect`, `demo`); each takes a typed
request (or keyword arguments), does the work and returns a typed outcome. The CLI parses and prints.
"""
