"""Config: defaults fill in, and every bad key or value fails naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from pipeline.config import ConfigError, load_config, section_config, validate_config, wet_shards
from pipeline.config_template import render, scalar


def test_default_config_is_valid_and_complete():
    config = load_config(ROOT / "config.yaml")
    assert config["langid"]["languages"] == ["en"] and config["dedup"]["bands"] * config["dedup"]["rows"] == 112


def test_missing_sections_take_schema_defaults():
    config = validate_config({"run": "x"})
    assert config["ingest"]["max_doc_bytes"] == 1_000_000 and config["langid"]["min_score"] == 0.65


@pytest.mark.parametrize("config, key", [
    ({"langid": {"min_scor": 0.5}}, "langid.min_scor"),
    ({"langid": {"min_score": 1.5}}, "langid.min_score"),
    ({"dedup": {"bands": "14"}}, "dedup.bands"),
    ({"run": "has space"}, "run"),
    ({"inputs": {"wet": "x.warc.wet.gz"}}, "inputs.wet"),  # a list; [] is fine when inputs.warc names files
    ({"colour": "blue"}, "colour"),
])
def test_bad_key_or_value_names_the_key(config, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate_config(config)


def test_section_slice_is_validated_with_its_prefix():
    with pytest.raises(ConfigError, match="config key 'ingest.max_doc_bytes'"):
        section_config("ingest", {"max_doc_bytes": 0})


def test_wet_globs_expand_and_a_pattern_matching_nothing_fails(tmp_path):
    for name in ["b.warc.wet.gz", "a.warc.wet.gz"]:
        (tmp_path / name).write_bytes(b"")
    assert list(wet_shards(["*.warc.wet.gz"], base=tmp_path)) == ["a", "b"]
    assert wet_shards(["https://data.commoncrawl.org/x/CC-1.warc.wet.gz"]) == {
        "CC-1": "https://data.commoncrawl.org/x/CC-1.warc.wet.gz"}
    with pytest.raises(ConfigError, match="inputs.wet.*nothing.gz"):
        wet_shards(["nothing.gz"], base=tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.warc.wet.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match="both make shard 'a'"):
        wet_shards(["*.gz", "sub/*.gz"], base=tmp_path)


def test_snakemake_refuses_a_bad_configfile_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"quality": {"no_such_group": {}}}))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(bad)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "config key 'quality.no_such_group'" in result.stdout + result.stderr


@pytest.mark.parametrize("preset", sorted((ROOT / "workflow" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_are_valid(preset):
    def merge(base, update):  # Snakemake's --configfile merges nested keys the same way
        return {k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                for k, v in {**base, **update}.items()}

    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate_config(merge(default, yaml.safe_load(preset.read_text())))


def test_a_folder_or_a_nameless_file_in_inputs_wet_is_a_config_error(tmp_path):
    (tmp_path / "crawl").mkdir()
    with pytest.raises(ConfigError, match="inputs.wet.*is not a file"):
        wet_shards(["crawl"], base=tmp_path)
    (tmp_path / ".warc.wet.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match="inputs.wet.*leaves no shard name"):
        wet_shards([".warc.wet.gz"], base=tmp_path)


@pytest.mark.parametrize("quality, key", [
    ({"gopher_repetition": {"dup_line_frac": 1.5}}, "quality.gopher_repetition.dup_line_frac"),
    ({"fineweb": {"short_line_thr": 2}}, "quality.fineweb.short_line_thr"),
    ({"gopher_quality": {"min_doc_words": 500, "max_doc_words": 100}}, "quality.gopher_quality.min_doc_words"),
    ({"gopher_quality": {"min_avg_word_length": 11}}, "quality.gopher_quality.min_avg_word_length"),
])
def test_quality_fractions_stay_under_one_and_minimums_under_maximums(quality, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate_config({"quality": quality})
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        section_config("quality", quality)


def test_config_yaml_is_the_schemas_rendered():
    """Every default and description lives once, in the schemas: config.yaml is what
    `python -m pipeline config-template` writes from them, byte for byte."""
    assert (ROOT / "config.yaml").read_text(encoding="utf-8") == render(), \
        "config.yaml differs from workflow/schemas/: run python -m pipeline config-template --output config.yaml"


def test_the_rendered_config_reads_back_as_the_schema_defaults():
    """Every value the template writes (2.0e+11, inf, [+], <|endoftext|>, '') is read back by YAML as
    the schema's default, and every comment is the key's description."""
    text = render()
    assert yaml.safe_load(text) == validate_config({})
    assert "# Peak learning rate (after warmup). Small models take larger rates (GPT-2 124M about 6e-4)." in text
    assert scalar(2e11) == "2.0e+11" and yaml.safe_load(scalar(989e12)) == 989e12 and scalar(1e-3) == "0.001"


def test_a_schema_file_without_a_place_in_the_template_is_named(tmp_path):
    import shutil
    schemas = shutil.copytree(ROOT / "workflow" / "schemas", tmp_path / "schemas")
    (schemas / "extra.schema.yaml").write_text(yaml.safe_dump({"type": "object", "default": {}, "properties": {}}))
    with pytest.raises(ValueError, match="extra: a schema file with no place"):
        render(schemas)


@pytest.mark.parametrize("text, message", [
    ("pretrain:\n  lr: 6e-4\n",
     "config key 'pretrain.lr': '6e-4' was read as a string, not a number (YAML reads an exponent without a dot "
     "and a sign as text): write 0.0006"),
    ("pretrain:\n  max_steps: 2e3\n", "config key 'pretrain.max_steps': '2e3' was read as a string, not a number"),
    ("pretrain:\n  sizes: [tiny, huge]\n",
     "config key 'pretrain.sizes.1': 'huge' is not valid; expected one of: nano, tiny, small, gpt2-124m, gpt2-350m; "
     "or d<depth>w<width>"),
])
def test_a_newcomers_config_mistake_is_explained(tmp_path, text, message):
    """What a first config file gets wrong, as Snakemake reports it: a number YAML read as text,
    and a model size that does not exist (the valid ones listed)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(text)
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(mine)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stdout + result.stderr, (result.stdout + result.stderr)[-2000:]
