"""CurateConfig: every knob of the curator in one dataclass, loadable from TOML; its hash tags each verdict."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from distillery.record import canonical_hash


class ConfigError(ValueError):
    """A curate.toml that cannot be read or names an unknown key."""


@dataclass
class CurateConfig:
    recipe: str = "dataset/recipes/blessing.toml"
    # Filters to run, by name (all by default).
    filters: list[str] = field(default_factory=lambda: [
        "length", "truncation", "punctuation", "markdown", "meta_talk", "style", "constraint", "fit",
        "language", "duplicates"])
    fragment_min_chars: int = 4          # shorter than max(this, fragment_ratio·cap) → not a greeting
    fragment_ratio: float = 0.2
    length_doubtful_margin: int = 0      # 字数 ≥ cap − margin (and < cap) → doubtful
    emoji_spam: int = 4                  # this many emoji anywhere → rejected
    normal_emoji_doubtful: int = 3       # 正常 style with this many emoji → doubtful
    slang: list[str] = field(default_factory=lambda: [
        "yyds", "绝绝子", "冲鸭", "awsl", "奥利给", "集美", "xswl", "栓Q", "666", "蚌埠住", "破防", "躺平",
        "内卷", "打call", "拿捏", "芭比Q", "暴富", "宝子", "家人们", "狠狠"])
    english_allow: list[str] = field(default_factory=list)
    near_dup_ngram: int = 2
    # Near duplicates (estimated Jaccard of character n-grams). Exact ones and ≥ near_dup_threshold: rejected,
    # against every source. Below that, doubtful from a bar that depends on what the earlier text is:
    near_dup_threshold: float = 0.7      # rejected
    near_dup_doubtful: float = 0.5       # vs the recipe's few-shot examples: the prompt forbids copying them
    near_dup_doubtful_others: float = 0.6  # vs earlier texts of the input, the reference corpus, earlier releases
    near_dup_short_chars: int = 12       # texts with fewer letters/digits (~15 字): no doubtful band vs the corpus
                                         # and releases: common short greetings overlap them by chance
    minhash_perms: int = 96
    minhash_bands: int = 24              # 4 rows a band: a pair at Jaccard 0.5 becomes a candidate ~80% of the time
    dedup_examples: bool = True          # the recipe's few-shot example sentences
    dedup_reference: str = "dataset/reference/blessings.jsonl"   # "" to disable
    dedup_releases: list[str] = field(default_factory=list)      # earlier releases' train.json files

    def config_hash(self) -> str:
        return canonical_hash(dataclasses.asdict(self))


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(p: str | Path) -> Path:
    """A relative path from the config: as given if it exists from the working directory, else from the project root."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p
    alt = PROJECT_ROOT / p
    return alt if alt.exists() else p


def load_config(path: str | Path | None) -> CurateConfig:
    if path is None:
        return CurateConfig()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    data = data.get("curate", data)
    known = {f.name for f in dataclasses.fields(CurateConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}")
    return CurateConfig(**data)
