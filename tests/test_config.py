"""Config parsing: YAML files and --section.key overrides, and the errors that name the bad key."""
from pathlib import Path

import pytest

from ms_dfkd.config import ConfigError, load_config, parse_overrides, save_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  seed: 3\n  rounds: 2\nloss:\n  div: 0.25\n")
    cfg = load_config(p, parse_overrides(["--run.rounds", "5", "--corpus.sources=bbc,political",
                                          "--generator.chat_template", "false"]))
    assert cfg.run.seed == 3 and cfg.run.rounds == 5 and cfg.loss.div == 0.25
    assert cfg.corpus.sources == ["bbc", "political"] and cfg.generator.chat_template is False


@pytest.mark.parametrize("text, needle", [
    ("run:\n  sede: 3\n", "run.sede"),
    ("rnu:\n  seed: 3\n", "rnu"),
    ("run:\n  seed: three\n", "run.seed"),
    ("run:\n  method: magic\n", "run.method"),
    ("generator:\n  top_p: 1.5\n", "generator.top_p"),
    ("generator:\n  batch_size: 3\n", "generator.batch_size"),
    ("generator:\n  batch_size: 8\n  sample_batch_size: 12\n", "generator.sample_batch_size"),
    ("run: [1, 2]\n", "section 'run'"),
    ("run:\n  seed: [\n", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_errors():
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--run.seed"])
    with pytest.raises(ConfigError, match="unknown config key 'loss.spc'"):
        load_config(None, [("loss.spc", "1")])


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    """Every configs/*.yaml loads (no unknown key, no bad value), sets what its file says, formats its
    paths, and comes back equal through save_config (the config.yaml of a run folder)."""
    import yaml
    cfg = load_config(path)
    for section, body in yaml.safe_load(path.read_text()).items():
        for key, value in body.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, str) and str(got) == value), (section, key, got, value)
    assert "{" not in cfg.fmt(cfg.run.out_dir) and "{" not in cfg.fmt(cfg.teacher.checkpoint)
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    again = load_config(saved)
    assert again == cfg
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == saved.read_text()


def test_smoke_config_round_trips_with_overrides(tmp_path):
    """The smoke config as a run saves it (overrides applied) loads back equal, field for field."""
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    cfg = load_config(smoke, parse_overrides(["--run.rounds", "3", "--loss.div", "0.25", "--corpus.sources",
                                              "bbc,political", "--generator.chat_template", "false"]))
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.run.rounds == 3 and again.loss.div == 0.25 and again.corpus.sources == ["bbc", "political"]
    assert again.generator.chat_template is False and again.generator.arch == "tiny"


def test_label_words_are_what_the_prompt_says_for_each_label():
    """task.label_words: one phrase per label fills {label} in the prompt (the label names when empty);
    another count is one error naming the key and the labels."""
    from types import SimpleNamespace
    import numpy as np
    from ms_dfkd.train import Distiller

    class CharTokenizer:  # one id per character: the prompt reads back exactly
        pad_id = 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    def prompt(cfg, label):
        fake = SimpleNamespace(cfg=cfg, g_tok=CharTokenizer(), P=120)
        ids, mask = Distiller._prompt_ids(fake, ["Paris is lovely."], [label])
        return "".join(chr(i) for i in np.asarray(ids)[0][np.asarray(mask)[0] == 1])

    over = ["--task.kind", "token", "--task.train", "wnut16:train", "--task.dev", "wnut16:dev", "--task.test",
            "wnut16:test", "--task.entity_types", "person,geo-loc", "--generator.chat_template", "false",
            "--task.prompt_template", "Write a tweet that mentions a {label}.\n{text}"]
    assert prompt(load_config(None, parse_overrides(over)), 1) == "Write a tweet that mentions a geo-loc.\nParis is lovely."
    cfg = load_config(None, parse_overrides(over + ["--task.label_words", "person,place (a city or a country)"]))
    assert prompt(cfg, 1) == "Write a tweet that mentions a place (a city or a country).\nParis is lovely."
    assert prompt(cfg, 0).startswith("Write a tweet that mentions a person.\n")
    with pytest.raises(ConfigError, match=r"task.label_words: 1 phrases for the 2 labels \['person', 'geo-loc'\]"):
        load_config(None, parse_overrides(over + ["--task.label_words", "place"]))
