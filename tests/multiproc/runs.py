"""Run by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo):
several `baldro` commands in a row in the same processes (one launch instead of one per run).
Argument: a JSON file holding a list of argument lists for `baldro.cli.main`."""

import json
import sys

from baldro.cli import main

for argv in json.loads(open(sys.argv[1]).read()):
    rc = main(argv)
    if rc != 0:
        sys.exit(rc)
