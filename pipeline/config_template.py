"""config-template: write config.yaml from the schemas, each key's description as its comment.

    python -m pipeline config-template --output config.yaml

The schemas (workflow/schemas/) hold every key's default and description once; config.yaml is
this command's output, so the two cannot drift (tests/test_config.py checks the committed file is
what the command writes). A description short enough goes on its key's line, a longer one above it.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import atomic_write_text
from pipeline.config import SCHEMA_DIR, load_schema, validate_config, yaml_float

WIDTH = 110  # columns of the file
COMMENT_COLUMN = 32  # where a comment on a key's line starts, when the key and its value leave room

# the sections in the order their stages run (a new schema file must be placed here)
SECTIONS = ["fetch", "ingest", "url_filter", "extract", "langid", "quality", "dedup", "decontaminate", "pii",
            "tokenizer", "pretrain", "sft", "grpo", "tasks", "eval", "inference", "scaling"]

HEADER = """\
# wetstone's configuration: the default run, on the bundled CommonCrawl sample with everything
# CPU-sized. Generated from workflow/schemas/ (every key's default and description) by
#     python -m pipeline config-template --output config.yaml
# so change a default or a description there, not here. To change a run, write only the keys you
# change into a file of your own and add `--configfile my.yaml` (after the targets): Snakemake
# merges it over this file, key by key. Relative paths, in any config file, are taken from the
# workflow folder (the one holding the Snakefile), except `results`, which is taken from the folder
# Snakemake runs in. Each `python -m pipeline <stage>` gets its section as --config JSON.
"""


def scalar(value: Any) -> str:
    """One value as YAML text, flow style, that reads back as the same value (floats: yaml_float)."""
    if isinstance(value, float):
        return yaml_float(value)
    if isinstance(value, (list, dict)):
        items = [scalar(v) for v in value] if isinstance(value, list) else [f"{k}: {scalar(v)}" for k, v in value.items()]
        return ("[{}]" if isinstance(value, list) else "{{{}}}").format(", ".join(items))
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").removesuffix("\n")


def comment(text: str, indent: int) -> list[str]:
    return [" " * indent + "# " + line for line in textwrap.wrap(text, WIDTH - indent - 2, break_on_hyphens=False)]


def entry(key: str, value: Any, schema: dict[str, Any], indent: int) -> list[str]:
    """The lines of `key: value` with its description: on the line when it fits, else above it;
    a mapping with a schema of its keys, or a list of mappings too long for one line, in blocks."""
    pad, described = " " * indent, " ".join(schema.get("description", "").split())
    properties = schema.get("properties") or schema.get("items", {}).get("properties") or {}
    flat = scalar(value)
    block = bool(value) and isinstance(value, (dict, list)) and (
        isinstance(value, dict) and "properties" in schema or len(f"{pad}{key}: {flat}") > WIDTH)
    head = f"{pad}{key}:" if block else f"{pad}{key}: {flat}"
    line = f"{head:<{COMMENT_COLUMN - 1}} # {described}"
    lines = [line] if described and len(line) <= WIDTH else comment(described, indent) + [head]
    if isinstance(value, dict) and block:
        for name, item in value.items():
            lines += entry(name, item, properties.get(name, {}), indent + 2)
    elif block:
        for item in value:
            if isinstance(item, dict) and len(f"{pad}  - {scalar(item)}") > WIDTH:
                first, *rest = [line for name, v in item.items() for line in entry(name, v, properties.get(name, {}),
                                                                                     indent + 4)]
                # `- name: x` on one line; a comment first, `-` alone above it
                lines += [f"{pad}  - {first[indent + 4:]}"] if not first.lstrip().startswith("#") else [f"{pad}  -", first]
                lines += rest
            else:
                lines.append(f"{pad}  - {scalar(item)}")
    return lines


def render(schema_dir: Path = SCHEMA_DIR) -> str:
    """config.yaml's text: the header, then every top-level key and section with its defaults."""
    schema = load_schema(schema_dir)
    sections = [name for name in schema["properties"] if (schema_dir / f"{name}.schema.yaml").is_file()]
    unplaced = sorted(set(sections) - set(SECTIONS))
    if unplaced:
        raise ValueError(f"{', '.join(unplaced)}: a schema file with no place in pipeline/config_template.py SECTIONS")
    defaults = validate_config({})
    order = [name for name in schema["properties"] if name not in SECTIONS] + SECTIONS
    blocks = [HEADER]
    for name in order:
        blocks.append("\n".join(entry(name, defaults[name], schema["properties"][name], 0)) + "\n")
    return "\n".join(blocks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, help="the file to write (atomically); default: stdout")


def run(args: argparse.Namespace) -> int:
    text = render()
    if args.output:
        atomic_write_text(args.output, text)
    else:
        print(text, end="")
    return 0
