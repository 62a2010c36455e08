"""``blissful_metadata.py FILE...``: print the generation metadata embedded in PNG, MP4, MKV or latent files."""

from __future__ import annotations

import argparse
import json

from blissful_tuner.metadata import read_metadata
from musubi_tuner.utils.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    """The reader's command line."""
    parser = argparse.ArgumentParser(description="Print the bt_* generation metadata of PNG, MP4, MKV or .safetensors files")
    parser.add_argument("files", nargs="+", help="files to read")
    parser.add_argument("--all", action="store_true", help="print every tag, not only bt_* keys")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per file, keyed by path)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """Read each file and print its metadata (``key: value`` lines, or JSON with ``--json``)."""
    args = build_parser().parse_args(argv)
    results = {path: read_metadata(path, bt_only=not args.all) for path in args.files}
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return
    for path, md in results.items():
        if len(results) > 1:
            print(f"== {path}")
        if not md:
            print("(no metadata)")
        for key in sorted(md):
            value = md[key].replace("\n", "\\n")
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
