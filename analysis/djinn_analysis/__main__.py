"""``python -m djinn_analysis --input URI [--output URI] [--endpoint-url URL]``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .load import AnalysisError
from .report import analyze


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m djinn_analysis",
                                description="Table 2, Figure 6, claims and CSV from djinn-bench results.")
    p.add_argument("--input", required=True, help="local directory or s3://bucket/prefix holding results/")
    p.add_argument("--output", help="where analysis/ is written (default: the input)")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, moto); default AWS_ENDPOINT_URL_S3 or AWS")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    try:
        written = analyze(args.input, args.output, args.endpoint_url)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for name, where in written.items():
        print(f"{name}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
