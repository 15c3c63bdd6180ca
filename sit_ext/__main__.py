"""`python -m sit_ext info`: what was built and whether CUDA is usable."""

import argparse

from ._build import build_info, format_build_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sit_ext")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="report the build and the device")
    parser.parse_args(argv)
    print(format_build_info(build_info()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
