"""Prints the README results table for a `lmfast bench` JSON report:
python scripts/results_table.py benchmarks/results/<file>.json"""

import json
import sys

from lmfast.benchmarking import markdown_summary

print(markdown_summary(json.load(open(sys.argv[1]))))
