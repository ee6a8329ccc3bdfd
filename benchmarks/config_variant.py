"""A throw-away copy of the model repository with some config.pbtxt fields changed, to measure a tuning idea
without touching model_repository/ (every file but the edited configs is a symlink to the original).

    python -m benchmarks.config_variant /tmp/repo-threads1 \\
        --merge 'face_detector:parameters { key: "intra_op_thread_count" value { string_value: "1" } }' \\
        --merge 'mask_classifier:parameters { key: "intra_op_thread_count" value { string_value: "1" } }'
    python -m benchmarks --model-repository /tmp/repo-threads1

`--merge MODEL:TEXT` merges protobuf text into the model's config (singular fields are replaced, map
entries set, repeated fields appended); `--clear MODEL:FIELD` empties a field first (e.g.
`face_detector:instance_group` before merging a new `instance_group { count: 2 kind: KIND_CPU }`).
Clears are applied before merges. The variant records what was changed in VARIANT.txt.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from google.protobuf import text_format

from ensemble.reference import DEFAULT_REPOSITORY
from ensemble.triton.config import CONFIG_FILE, load_config, save_config
from ensemble.triton.staging import mirror_tree


def _split(spec: str) -> tuple[str, str]:
    model, sep, rest = spec.partition(":")
    if not sep or not model or not rest:
        raise ValueError(f"{spec!r}: expected MODEL:TEXT")
    return model.strip(), rest.strip()


def make_variant(dest: Path, *, merges: Sequence[str] = (), clears: Sequence[str] = (),
                 source: Path = DEFAULT_REPOSITORY) -> Path:
    """Mirror `source` into `dest` (replacing it) with the edits applied; returns `dest`."""
    source, dest = Path(source).resolve(), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    mirror_tree(source, dest)
    edits: dict[str, list[tuple[str, str]]] = {}
    for kind, specs in (("clear", clears), ("merge", merges)):
        for spec in specs:
            model, text = _split(spec)
            if not (source / model / CONFIG_FILE).is_file():
                raise ValueError(f"{spec!r}: no model {model!r} in {source}")
            edits.setdefault(model, []).append((kind, text))
    for model, changes in edits.items():
        config = load_config(source / model)
        for kind, text in sorted(changes, key=lambda change: change[0] != "clear"):
            if kind == "clear":
                config.ClearField(text)
            else:
                text_format.Merge(text, config)
        (dest / model / CONFIG_FILE).unlink()
        save_config(config, dest / model / CONFIG_FILE)
    (dest / "VARIANT.txt").write_text("".join(f"--clear {spec}\n" for spec in clears)
                                      + "".join(f"--merge {spec}\n" for spec in merges))
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.config_variant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--merge", action="append", default=[], metavar="MODEL:TEXT")
    parser.add_argument("--clear", action="append", default=[], metavar="MODEL:FIELD")
    parser.add_argument("--source", type=Path, default=DEFAULT_REPOSITORY)
    args = parser.parse_args(argv)
    try:
        dest = make_variant(args.dest, merges=args.merge, clears=args.clear, source=args.source)
    except (ValueError, text_format.ParseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
