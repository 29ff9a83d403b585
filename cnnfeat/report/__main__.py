"""``python -m cnnfeat.report``: the same as ``cnnfeat-report``."""

from cnnfeat.report.cli import main

main()
