"""`python -m export onnx | coreml | validate` (export/cli.py)."""

import sys

from export.cli import main

if __name__ == "__main__":
    sys.exit(main())
