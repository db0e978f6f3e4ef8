"""Prints the README results tables for a `lmfast bench` JSON report (ops and model rows):
python scripts/results_table.py benchmarks/results/<file>.json"""

import sys

from lmfast import bench_report

print(bench_report.markdown(bench_report.load(sys.argv[1])))
