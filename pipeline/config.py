"""Config: load, fill defaults and validate against workflow/schemas/, naming the key at fault.

The schema is one file per config section: `config.schema.yaml` holds the top-level keys
(`run`, `results`, `inputs`) and `<section>.schema.yaml` each stage's section, so the description
and the default of every key live next to each other, once. Keys that several training stages
share (optimizer, compute, watchdog, ...) live once in `fragments/<name>.yaml`; a section lists
them under `fragments:` and may override a key's default or description. The Snakefile validates
`config` with `validate_config` before building the DAG; stage code gets only its own slice.
Checks that span keys (which a schema cannot say) run after the schema's, in `SECTION_CHECKS`.
A training key marked `resume_safe: true` may change when a run resumes from its checkpoints: it
says how the run is watched, saved or placed, not where its weights go (`resume_safe_keys`).
"""

from __future__ import annotations

import glob
import gzip
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

WORKFLOW_DIR = Path(__file__).resolve().parent.parent  # the folder holding the Snakefile
SCHEMA_DIR = WORKFLOW_DIR / "workflow" / "schemas"
WET_SUFFIXES = (".warc.wet.gz", ".wet.gz", ".warc.gz", ".gz", ".wet")
URL_SCHEMES = ("http://", "https://")
WARC_SHARD_SUFFIX = ".warc"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def workflow_path(path: str | os.PathLike) -> str:
    """A path a config file names: absolute as given, relative taken from the workflow folder, so
    it means the same file whichever folder Snakemake, or a stage run by hand, runs in."""
    return str(WORKFLOW_DIR / path)


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def section_schema(path: Path) -> dict[str, Any]:
    """A section's schema with its `fragments:` merged in: the section's own keys first (a key a
    fragment has too taking the section's fields over the fragment's), then the fragments' others."""
    schema = _read_yaml(path)
    shared: dict[str, Any] = {}
    for name in schema.pop("fragments", []):
        shared.update(_read_yaml(path.parent / "fragments" / f"{name}.yaml")["properties"])
    own = schema.get("properties", {})
    schema["properties"] = {key: {**shared.get(key, {}), **fields} for key, fields in own.items()} | {
        key: fields for key, fields in shared.items() if key not in own}
    return schema


def resume_safe_keys(section: str) -> frozenset[str]:
    """The keys of a training section that its schema marks `resume_safe`."""
    properties = section_schema(SCHEMA_DIR / f"{section}.schema.yaml")["properties"]
    return frozenset(key for key, fields in properties.items() if fields.get("resume_safe"))


def load_schema(schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    schema = _read_yaml(schema_dir / "config.schema.yaml")
    for section_file in sorted(schema_dir.glob("*.schema.yaml")):
        section = section_file.name.removesuffix(".schema.yaml")
        if section != "config":
            schema["properties"][section] = section_schema(section_file)
    return schema


def _with_defaults(validator_class):
    """A validator that fills in `default` for missing properties before checking them (the
    recipe from the jsonschema FAQ), so a user's config file need only name what it changes."""
    check_properties = validator_class.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = _copy(subschema["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": fill_then_check})


def _copy(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # the offending key is in the message, not in the path
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        return ".".join(parts + extra[:1]) or "<top level>"
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        return ".".join(parts + missing[:1])
    return ".".join(parts) or "<top level>"


def _qualified(prefix: str, key: str) -> str:
    if key == "<top level>" and prefix:
        return prefix.rstrip(".")
    return prefix + key


def _min_over_max(instance: Any, key: str = "") -> list[str]:
    """Every `min_X` above its `max_X` in the same mapping (a schema cannot compare two values)."""
    if not isinstance(instance, dict):
        return []
    lines = []
    for name, value in instance.items():
        top = instance.get("max_" + name.removeprefix("min_")) if name.startswith("min_") else None
        if isinstance(value, (int, float)) and isinstance(top, (int, float)) and value > top:
            lines.append(f"config key '{key}{name}': {value} is above {key}max_{name[4:]} ({top})")
        lines += _min_over_max(value, f"{key}{name}.")
    return lines


def yaml_float(value: float) -> str:
    """A float as YAML text that reads back as a float: outside 1e-4 .. 1e6 as 2.0e+11, since
    YAML 1.1 (PyYAML, so Snakemake) reads an exponent without a dot and a sign (2e11, 6e-4) as a string."""
    if value in (0.0, float("inf"), float("-inf")) or 1e-4 <= abs(value) < 1e6 or value != value:
        return repr(value)
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{int(exponent):+03d}"


def _types(schema: Any) -> set[str]:
    types = schema.get("type", []) if isinstance(schema, dict) else []
    return {types} if isinstance(types, str) else set(types)


def _expected(schema: dict[str, Any]) -> str:
    """One alternative of an anyOf, as a person would say it."""
    if "description" in schema:
        return schema["description"]
    if "enum" in schema or "const" in schema:
        return ", ".join(map(str, schema.get("enum", [schema.get("const")])))
    if "pattern" in schema:
        return f"a string matching {schema['pattern']}"
    return f"a {schema.get('type', 'value')}"


def _message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, said for the person who wrote the file: a number YAML read as a string
    says so, and a value matching none of a key's alternatives lists them."""
    value = error.instance
    alternatives = error.validator_value if error.validator in ("anyOf", "oneOf") else [error.schema]
    types = set().union(*map(_types, alternatives))
    if isinstance(value, str) and types & {"number", "integer"}:
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            written = str(int(number)) if "number" not in types and number.is_integer() else yaml_float(number)
            return (f"{value!r} was read as a string, not a number (YAML reads an exponent without a dot and "
                    f"a sign as text): write {written}")
    if error.validator in ("anyOf", "oneOf"):
        return f"{value!r} is not valid; expected one of: " + "; or ".join(map(_expected, alternatives))
    return error.message


def _validate(instance: Any, schema: dict[str, Any], prefix: str = "") -> None:
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    lines = [f"config key '{_qualified(prefix, _key_path(e))}': {_message(e)}" for e in errors]
    lines = lines or _min_over_max(instance, prefix)
    if lines:
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))


def check_batch(section: str, cfg: dict[str, Any]) -> None:
    """A training section's global batch must split into whole micro batches over its nodes x nproc
    processes (torchrun's process count is checked again when the run starts)."""
    processes = cfg["nproc"] * cfg.get("nodes", 1)
    per_micro = cfg["micro_batch"] * cfg["seq_len"] * processes
    if cfg["global_batch_tokens"] % per_micro:
        raise ConfigError(f"config key '{section}.global_batch_tokens' = {cfg['global_batch_tokens']} is not a "
                          f"multiple of micro_batch x seq_len x processes (nodes x nproc) = {cfg['micro_batch']} "
                          f"x {cfg['seq_len']} x {processes} = {per_micro}")


# section -> checks across its keys, run after the schema's
SECTION_CHECKS = {"pretrain": [check_batch]}


def _check_sections(config: dict[str, Any]) -> None:
    for section, checks in SECTION_CHECKS.items():
        if section in config:
            for check in checks:
                check(section, config[section])


def validate_config(config: dict[str, Any], schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    """Fill defaults into `config` in place and validate it; raise ConfigError naming the key."""
    _validate(config, load_schema(schema_dir))
    _check_sections(config)
    return config


def section_config(section: str, value: dict[str, Any] | None) -> dict[str, Any]:
    """Validate one section's slice (as a stage gets it on its command line), defaults filled."""
    value = _copy(value or {})
    # only this section's schema file: parsing all of them (pure-Python YAML) cost each job ~0.1 s
    _validate(value, section_schema(SCHEMA_DIR / f"{section}.schema.yaml"), prefix=f"{section}.")
    _check_sections({section: value})
    return value


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for key, value in (overrides or {}).items():
        config[key] = value
    return validate_config(config)


def shard_name(path: str) -> str:
    """CC-MAIN-...-00404.warc.wet.gz -> CC-MAIN-...-00404 (safe for file names and wildcards)."""
    name = path.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in WET_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def warc_shard_name(path: str) -> str:
    """CC-MAIN-...-00395.warc.gz -> CC-MAIN-...-00395.warc: a segment's WARC and WET files share
    their stem, and both kinds of shard flow through the same langid..dedup folders."""
    return shard_name(path) + WARC_SHARD_SUFFIX


def _input_shards(key: str, patterns: list[str], base: str | os.PathLike, name_of: Callable[[str], str],
                  example: str, taken: dict[str, str]) -> dict[str, str]:
    shards: dict[str, str] = {}
    for pattern in patterns:
        if pattern.startswith(URL_SCHEMES):
            matches = [pattern]
        else:
            matches = sorted(glob.glob(os.path.join(base, pattern)))
            if not matches:
                where = "" if os.path.isabs(pattern) else f" (a relative path is taken from the workflow folder, {base})"
                raise ConfigError(f"config key '{key}': {pattern!r} matches no file{where}")
        for match in matches:
            if not pattern.startswith(URL_SCHEMES) and not os.path.isfile(match):
                raise ConfigError(f"config key '{key}': {match!r} is not a file (a folder? name "
                                  f"the files, e.g. {os.path.join(pattern, '*' + example)!r})")
            name = name_of(match)
            if not name.removesuffix(WARC_SHARD_SUFFIX).strip("._"):
                raise ConfigError(f"config key '{key}': {match!r} leaves no shard name once "
                                  f"{WET_SUFFIXES} is taken off; rename it")
            if name in taken:
                raise ConfigError(f"config key '{key}': {match!r} makes shard {name!r}, which "
                                  f"{taken[name]!r} (another input) makes too; rename one")
            if name in shards and shards[name] != match:
                raise ConfigError(f"config key '{key}': {shards[name]!r} and {match!r} "
                                  f"both make shard {name!r}; rename one")
            shards[name] = match
    return shards


def wet_shards(patterns: list[str], base: str | os.PathLike = ".") -> dict[str, str]:
    """Expand `inputs.wet` (paths, globs, or http(s) URLs) into {shard name: path or URL}.

    A pattern matching nothing or a folder, a file name that leaves no shard name
    (`.warc.wet.gz`), or two inputs with the same shard name, is a config error."""
    return _input_shards("inputs.wet", patterns, base, shard_name, ".warc.wet.gz", taken={})


def warc_shards(patterns: list[str], base: str | os.PathLike = ".",
                wet: dict[str, str] | None = None) -> dict[str, str]:
    """Expand `inputs.warc` like `wet_shards`; shard names end in `.warc`, and one that a WET
    input (in `wet`) also makes is a config error (a WET file named `x.warc.wet` makes `x.warc`)."""
    return _input_shards("inputs.warc", patterns, base, warc_shard_name, ".warc.gz", taken=wet or {})


def listed_inputs(path: str | os.PathLike, prefix: str = "", base: str | os.PathLike = ".",
                  key: str = "inputs.wet_list") -> list[str]:
    """The files a list file (`inputs.wet_list`, or `inputs.warc_list` as `key`) names: one path or
    URL per line of `path` (gzip when its name ends in .gz, as Common Crawl's wet.paths.gz), `prefix`
    put before each line that is not a URL or an absolute path. Blank lines and `#` comments are
    skipped."""
    path = os.path.join(base, path)
    if not os.path.isfile(path):
        raise ConfigError(f"config key '{key}': {path!r} is not a file")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line if line.startswith(URL_SCHEMES) or os.path.isabs(line) else prefix + line
            for line in lines if line and not line.startswith("#")]


def _batches(key: str, shards: dict[str, str], batch_size: int, taken: dict[str, str] | None,
             suffix: str = "") -> dict[str, list[str]]:
    """Runs of `batch_size` consecutive shards (in `shards`' order) as {batch name: [shard, ...]}.
    A batch is named after its first shard, with `.x<n>` put before `suffix` when it holds n > 1,
    so a batch size of 1 keeps every shard's own name (and bytes). A name also made by another
    batch or in `taken` is a config error naming `key`."""
    names = list(shards)
    batches: dict[str, list[str]] = {}
    for start in range(0, len(names), batch_size):
        run = names[start:start + batch_size]
        name = run[0] if len(run) == 1 else f"{run[0].removesuffix(suffix)}.x{len(run)}{suffix}"
        if name in batches or name in (taken or {}):
            raise ConfigError(f"config key '{key}': batch {name!r} (from {shards[run[0]]!r}) "
                              "has the name of another batch or input; rename that input")
        batches[name] = run
    return batches


def wet_batches(wet: dict[str, str], batch_size: int, taken: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Group WET shards (`wet_shards`' order) into {batch name: [shard, ...]}: runs of `batch_size`
    consecutive shards, each run the unit of one data job, named `<first>` or `<first>.x<n>`.
    A name also made by another batch or by a WARC batch (in `taken`) is a config error."""
    return _batches("inputs.batch_size", wet, batch_size, taken)


def warc_batches(warc: dict[str, str], batch_size: int) -> dict[str, list[str]]:
    """Group WARC shards (`warc_shards`' order) into runs of `batch_size` as `wet_batches` does,
    named `<first stem>.warc` or `<first stem>.x<n>.warc`: every WARC shard name ends in `.warc`,
    and a WET batch of several files ends in `.x<n>`, so the two never meet (a one-file WET shard
    ending in `.warc` is checked by `wet_batches`)."""
    return _batches("inputs.warc_batch_size", warc, batch_size, taken=None, suffix=WARC_SHARD_SUFFIX)


def input_shards(inputs: dict[str, Any], base: str | os.PathLike = ".") -> tuple[dict[str, str], dict[str, str]]:
    """({WET shard: path or URL}, {WARC shard: path or URL}) of the `inputs` section (inputs.wet,
    then inputs.wet_list's files; inputs.warc, then inputs.warc_list's); at least one input file in all."""
    wet = wet_shards(inputs.get("wet", []), base)
    if inputs.get("wet_list"):
        listed = listed_inputs(inputs["wet_list"], inputs.get("wet_list_prefix", ""), base)
        wet |= _input_shards("inputs.wet_list", listed, base, shard_name, ".warc.wet.gz", taken=wet)
    warc = warc_shards(inputs.get("warc", []), base, wet)
    if inputs.get("warc_list"):
        listed = listed_inputs(inputs["warc_list"], inputs.get("warc_list_prefix", ""), base, key="inputs.warc_list")
        warc |= _input_shards("inputs.warc_list", listed, base, warc_shard_name, ".warc.gz", taken={**wet, **warc})
    if not wet and not warc:
        raise ConfigError("config keys 'inputs.wet' and 'inputs.warc': no input files (give at least one)")
    return wet, warc
