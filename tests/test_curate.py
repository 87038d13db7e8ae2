"""curate: each filter on hand-written good and bad cases, the reference corpora, the CLI end to end, determinism."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from curate import CurateConfig, load_config
from curate.cli import main
from curate.dedup import DedupIndex
from curate.filters import ALL, Context
from curate.pipeline import Summary, curate_records

ROOT = Path(__file__).resolve().parents[1]
BLESSINGS = ROOT / "dataset/reference/blessings.jsonl"
DEFECTS = ROOT / "dataset/reference/defects.jsonl"
C1 = "回答中可以不出现对象称谓和场景信息，也不用出现“愿你”“祝你”（对自己的长辈需要出现对象称谓和祝你），"
C3 = "回答中不用出现“愿你”“祝你”"


@pytest.fixture(scope="module")
def ctx():
    return Context(CurateConfig(recipe=str(ROOT / "dataset/recipes/blessing.toml"), dedup_reference=str(BLESSINGS)))


def rec(output, scene="生日", style="正常", recipient="妈妈", relation="长辈", constraint="", max_chars=50, **meta):
    return {"instruction": "你现在是一个送祝福大师", "input": f"祝{recipient}生日快乐,{style}风格", "output": output,
            "meta": {"scene": scene, "style": style, "recipient": recipient, "relation": relation,
                     "constraint": constraint, "max_chars": max_chars, **meta}}


def verdict(ctx, name, r):
    r.setdefault("id", "t")
    return ALL[name]().check(r, ctx.resolve(r), ctx)


GOOD = rec("妈妈，生日快乐！愿您身体健康，天天开心。")

CASES = [  # (filter, record, expected verdict)
    ("length", rec("妈妈，生日快乐！愿您身体健康，天天开心。", max_chars=20), "rejected"),   # 20 字 = cap
    ("length", rec("生日快乐", max_chars=50), "rejected"),                               # fragment
    ("length", rec("好的", max_chars=20), "rejected"),
    ("truncation", rec("祝您在新的一年里身体健康，工作顺"), "rejected"),
    ("truncation", rec("祝您身体健康，"), "rejected"),
    ("truncation", rec("希望今年中秋我们一家人都能在"), "rejected"),
    ("truncation", rec("妈妈生日快乐！", finish_reason="length"), "rejected"),
    ("punctuation", rec("生日快乐！啦~"), "rejected"),
    ("punctuation", rec("生日快乐。呀"), "rejected"),
    ("punctuation", rec("生日快乐！！！"), "rejected"),
    ("punctuation", rec("生日快乐!，身体健康"), "rejected"),
    ("punctuation", rec("生日快乐,身体健康!"), "doubtful"),
    ("markdown", rec("# 生日祝福\n妈妈生日快乐！"), "rejected"),
    ("markdown", rec("**祝福语**：妈妈生日快乐！"), "rejected"),
    ("markdown", rec("“妈妈，生日快乐！”"), "rejected"),
    ("markdown", rec("1. 妈妈生日快乐！"), "rejected"),
    ("markdown", rec("标题：生日祝福 妈妈生日快乐！"), "rejected"),
    ("meta_talk", rec("好的，以下是为您准备的祝福语：妈妈生日快乐！"), "rejected"),
    ("meta_talk", rec("妈妈生日快乐！希望你喜欢！"), "rejected"),
    ("meta_talk", rec("作为一个AI，我无法真正送出祝福"), "rejected"),
    ("style", rec("新的一岁也要开心", style="小红书", relation="朋友", recipient="闺蜜"), "rejected"),
    ("style", rec("新的一岁也要开心🎂", style="小红书", relation="朋友", recipient="闺蜜"), "rejected"),
    ("style", rec("新的一岁也要开心呀🎂🎉🎈", style="小红书", relation="朋友", recipient="闺蜜"), "doubtful"),
    ("style", rec("生日快乐🎉🎉🎉🎉", relation="朋友", recipient="闺蜜"), "rejected"),
    ("style", rec("生日快乐🎉🎉"), "rejected"),
    ("style", rec("领导生日快乐🎂", style="严肃", relation="上级", recipient="领导"), "rejected"),
    ("style", rec("领导生日快乐，yyds", style="严肃", relation="上级", recipient="领导"), "rejected"),
    ("constraint", rec("祝你生日快乐！", constraint=C3, relation="朋友", recipient="闺蜜"), "rejected"),
    ("constraint", rec("愿你天天开心！", constraint=C1, relation="朋友", recipient="闺蜜"), "rejected"),
    ("fit", rec("妈妈中秋快乐，月圆人团圆！", scene="春节"), "doubtful"),
    ("fit", rec("宝贝，祝您生日快乐！", relation="晚辈", recipient="女儿"), "doubtful"),
    ("fit", rec("哥们，生日快乐！", relation="上级", recipient="领导"), "doubtful"),
    # addressed to another of the recipe's recipients: a salutation, or a vocative first clause
    ("fit", rec("亲爱的妈妈生日快乐！谢谢您的教导。", recipient="赵老师", relation="师长"), "doubtful"),
    ("fit", rec("老公，生日快乐！爱你哟。", recipient="闺蜜", relation="朋友"), "doubtful"),
    ("fit", rec("尊敬的李总：生日快乐！", recipient="张经理", relation="上级"), "doubtful"),
    ("fit", rec("老妈，生日快乐！", recipient="外婆"), "doubtful"),
    # … or with no punctuation: a name opening a wish or 您/你, or right after the first 祝 that wishes someone
    ("fit", rec("妈妈生日快乐", recipient="外婆"), "doubtful"),
    ("fit", rec("妈妈生日快乐，外婆也要开心哦！", recipient="外婆"), "doubtful"),
    ("fit", rec("亲爱的妈妈节日快乐", recipient="外婆"), "doubtful"),
    ("fit", rec("祝妈妈身体健康，天天开心！", recipient="外婆"), "doubtful"),
    ("fit", rec("祝亲爱的妈妈生日快乐！", recipient="外婆"), "doubtful"),
    ("fit", rec("值此生日之际，恭祝李总身体康健。", recipient="张经理", relation="上级"), "doubtful"),
    ("fit", rec("老公你辛苦了，生日快乐！", recipient="闺蜜", relation="朋友"), "doubtful"),
    ("fit", rec("爸爸和妈妈，生日快乐！", recipient="外婆"), "doubtful"),
    ("language", rec("Happy birthday，妈妈！"), "rejected"),
    ("language", rec("祝您生日快樂，萬事如意"), "rejected"),
    ("language", rec("ç¥ä½ ç生日"), "rejected"),
    ("language", rec("生日快乐\ufffd\ufffd"), "rejected"),
]

GOOD_CASES = [  # (filter, record): nothing to say
    ("length", rec("妈妈，生日快乐！", max_chars=20)),
    ("truncation", rec("愿您平安常在")),
    ("truncation", rec("妈妈生日快乐！")),
    ("punctuation", rec("生日快乐！开心每一天~")),
    ("punctuation", rec("一路走来……谢谢您。")),
    ("markdown", GOOD),
    ("meta_talk", GOOD),
    ("style", rec("新的一岁也要闪闪发光呀✨", style="小红书", relation="朋友", recipient="闺蜜")),
    ("style", rec("祝李总生日快乐，事业蒸蒸日上。", style="严肃", relation="上级", recipient="李总")),
    ("constraint", rec("妈妈，祝你生日快乐！", constraint=C1)),       # elder exception
    ("constraint", rec("生日快乐，天天开心！", constraint=C3, relation="朋友", recipient="闺蜜")),
    ("fit", rec("除夕守岁，新春快乐！", scene="春节")),
    ("fit", GOOD),
    ("fit", rec("老师，生日快乐！谢谢您的教导。", recipient="赵老师", relation="师长")),     # 赵老师 is a 老师
    ("fit", rec("老师，生日快乐！谢谢您的教导。", recipient="王教授", relation="师长")),
    ("fit", rec("老妈，生日快乐！", recipient="妈妈")),
    ("fit", rec("爸爸妈妈，生日快乐！", recipient="妈妈")),                                # both parents
    ("fit", rec("爸，生日快乐！愿您身体健康。", recipient="岳父")),                        # a son-in-law's 爸
    ("fit", rec("领导，生日快乐！祝您万事顺意。", recipient="李总", relation="上级")),
    ("fit", rec("小刘，生日快乐！", recipient="同事", relation="同事")),
    ("fit", rec("孩子他妈，生日快乐！辛苦了。", recipient="老公", relation="伴侣")),        # mentions, not addressed
    ("fit", rec("祝您和家人生日快乐，妈妈也身体健康！", recipient="李总", relation="上级")),
    ("fit", rec("我的女儿长大了，生日快乐！", recipient="老公", relation="伴侣")),
    # a name that is not the addressee: inside the text, a subject, after also-祝/代我祝, a possessive, a longer word
    ("fit", rec("像妈妈一样温柔的外婆，生日快乐！", recipient="外婆")),
    ("fit", rec("祝外婆生日快乐，也谢谢妈妈把我养大！", recipient="外婆")),
    ("fit", rec("外婆生日快乐！妈妈让我问您好。", recipient="外婆")),
    ("fit", rec("妈妈说您最爱吃桃，祝外婆生日快乐！", recipient="外婆")),
    ("fit", rec("妈妈生日那天您做的长寿面，我一直记得。", recipient="外婆")),
    ("fit", rec("祝妈妈和外婆都生日快乐！", recipient="外婆")),
    ("fit", rec("生日快乐！也祝妈妈天天开心。", recipient="外婆")),
    ("fit", rec("请代我祝妈妈生日快乐，外婆！", recipient="外婆")),
    ("fit", rec("外婆，生日快乐！祝妈妈也天天开心。", recipient="外婆")),
    ("fit", rec("生日快乐，我最爱的外婆！祝妈妈和舅舅也天天开心。", recipient="外婆")),   # named before the 祝
    ("fit", rec("妈妈祝你生日快乐！", recipient="女儿", relation="晚辈")),
    ("fit", rec("祝妈妈的宝贝女儿生日快乐！", recipient="女儿", relation="晚辈")),
    ("fit", rec("祝老公公身体健康，生日快乐！", recipient="爷爷")),
    ("fit", rec("男朋友可以没有，生日蛋糕不能没有！", recipient="闺蜜", relation="朋友")),
    ("fit", rec("值此生日之际，恭祝老师身体康健。", recipient="赵老师", relation="师长")),
    ("fit", rec("爸爸生日快乐！祝您身体健康。", recipient="岳父")),
    ("language", GOOD),
]


@pytest.mark.parametrize("name,r,want", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_filter_catches(ctx, name, r, want):
    v = verdict(ctx, name, r)
    assert v is not None and v.verdict == want, (r["output"], v)
    assert v.detail


@pytest.mark.parametrize("name,r", GOOD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(GOOD_CASES)])
def test_filter_passes_good(ctx, name, r):
    assert verdict(ctx, name, r) is None


def test_fit_recipients_whose_names_overlap(tmp_path):
    """A recipe whose recipients contain or overlap one another (外婆/婆婆, 老公/公公, 赵老师/老师): each text addresses
    its own recipient, however the name is written; only a different person is flagged."""
    recipe = (ROOT / "dataset/recipes/blessing.toml").read_text(encoding="utf-8")
    for name, relation in (("婆婆", "长辈"), ("公公", "长辈"), ("老师", "师长")):
        recipe += f'\n[[recipients]]\nname = "{name}"\nrelation = "{relation}"\n'
    (tmp_path / "r.toml").write_text(recipe, encoding="utf-8")
    cx = Context(CurateConfig(dedup_reference=""), str(tmp_path / "r.toml"))
    fine = {"外婆": ["外婆生日快乐！", "祝外婆身体健康！"], "婆婆": ["婆婆生日快乐！", "祝公公婆婆身体健康！"],
            "老公": ["老公生日快乐！", "祝老公身体健康！"], "公公": ["公公生日快乐！", "祝公公婆婆身体健康！"],
            "爷爷": ["祝老公公身体健康，生日快乐！"], "赵老师": ["老师生日快乐！", "祝老师身体健康！"],
            "老师": ["赵老师生日快乐！", "祝赵老师身体健康！"]}
    wrong = {"外婆": "婆婆生日快乐！", "婆婆": "外婆生日快乐！", "公公": "老公生日快乐！", "老公": "祝公公身体健康！"}
    for recipient, texts in fine.items():
        for text in texts:
            r = rec(text, recipient=recipient, relation=cx.relation_of[recipient])
            assert ALL["fit"]().check(r, cx.resolve(r), cx) is None, (recipient, text)
    for recipient, text in wrong.items():
        r = rec(text, recipient=recipient, relation=cx.relation_of[recipient])
        v = ALL["fit"]().check(r, cx.resolve(r), cx)
        assert v is not None and v.verdict == "doubtful" and recipient in v.detail, (recipient, text, v)


def test_meta_derived_from_input(ctx):
    r = {"instruction": "x", "input": "祝赵老师元宵节快乐,严肃风格", "output": "赵老师元宵节快乐🏮"}
    info = ctx.resolve(r)
    assert (info["recipient"], info["relation"], info["scene"], info["style"]) == ("赵老师", "师长", "元宵节", "严肃")
    assert verdict(ctx, "style", r).verdict == "rejected"
    s = Summary()
    list(curate_records([dict(r)], ctx, s, None))
    assert s.by_filter["length"]["skipped"] == 1 and s.by_filter["constraint"]["skipped"] == 1


def test_dedup_exact_and_near():
    idx = DedupIndex(threshold=0.6)
    assert idx.check_add("a", "妈妈，生日快乐！愿您身体健康，天天开心，万事如意。") is None
    assert idx.check_add("b", "妈妈生日快乐 愿您身体健康 天天开心 万事如意🎂") == ("a", 1.0)
    near = idx.check_add("c", "妈妈，生日快乐！愿您身体安康，天天开心，万事如意。")
    assert near is not None and near[0] == "a" and near[1] < 1.0
    assert idx.check_add("d", "李总，谈判顺利，合作共赢，前程似锦。") is None


def test_duplicates_in_pipeline_and_examples(ctx):
    from curate.pipeline import build_index
    c = CurateConfig(recipe=ctx.config.recipe, dedup_reference="")
    cx = Context(c)
    recs = [rec("妈妈，生日快乐！愿您身体健康，天天开心。"), rec("妈妈，生日快乐！愿您身体健康，天天开心！"),
            rec("新的一岁也要闪闪发光呀✨", style="小红书", relation="朋友", recipient="闺蜜")]
    recs[1]["input"] += " "  # a different id
    out = list(curate_records(recs, cx, Summary(), build_index(cx)))
    assert out[0]["curation"]["verdict"] == "approved"
    assert out[1]["curation"]["verdict"] == "rejected"
    assert f"duplicate of {out[0]['id']}" in out[1]["curation"]["reasons"][-1]["detail"]
    assert "recipe-example" in out[2]["curation"]["reasons"][-1]["detail"]


def test_every_defect_kind_caught(ctx):
    from curate.pipeline import build_index
    recs = [json.loads(x) for x in DEFECTS.read_text(encoding="utf-8").splitlines() if x.strip()]
    out = list(curate_records(recs, ctx, Summary(), build_index(ctx)))
    missed = [(r["meta"].get("defect"), r["output"]) for r in out if r["curation"]["verdict"] == "approved"]
    kinds = {r["meta"].get("defect") for r in out}
    caught_kinds = {r["meta"].get("defect") for r in out if r["curation"]["verdict"] != "approved"}
    assert kinds == caught_kinds, missed
    assert len(missed) <= 0.05 * len(out), missed


def test_reference_blessings_mostly_pass(ctx):
    from curate.pipeline import build_index
    c = CurateConfig(recipe=ctx.config.recipe, dedup_reference="")
    cx = Context(c)
    recs = [json.loads(x) for x in BLESSINGS.read_text(encoding="utf-8").splitlines() if x.strip()]
    out = list(curate_records(recs, cx, Summary(), build_index(cx)))
    rej = [(r["output"], r["curation"]["reasons"]) for r in out if r["curation"]["verdict"] == "rejected"]
    dbt = [r for r in out if r["curation"]["verdict"] == "doubtful"]
    assert len(rej) <= 0.03 * len(out), rej
    assert len(dbt) <= 0.10 * len(out)


def _mixed(tmp: Path) -> list[str]:
    good = rec("妈妈，生日快乐！愿您身体健康，天天开心。")
    bad = rec("祝您生日快樂")
    lines = [json.dumps(good, ensure_ascii=False), json.dumps(bad, ensure_ascii=False), "{not json",
             json.dumps({"instrution": "x", "input": "", "output": "生日快乐呀"}, ensure_ascii=False),
             json.dumps({"instruction": "x", "input": 3, "output": "生日快乐"}),
             json.dumps({"instruction": "x", "input": "", "output": "  "})]
    a = tmp / "a.jsonl"
    a.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8") + b'{"output": "\xff\xfe"}\n')
    b = tmp / "b.json"
    b.write_text(json.dumps([{"instruction": "i", "input": "祝闺蜜生日快乐,小红书风格",
                              "output": "新的一岁也要美美哒呀🎂"}], ensure_ascii=False), encoding="utf-8")
    (tmp / "empty.jsonl").write_text("")
    return [str(a), str(b), str(tmp / "empty.jsonl"), str(tmp / "missing.jsonl")]


def test_cli_end_to_end(tmp_path, capsys):
    inputs = _mixed(tmp_path)
    out = tmp_path / "out"
    assert main(["run", *inputs, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "did you mean instruction?" in err and "Traceback" not in err
    assert f"{inputs[0]}:3:" in err and "missing.jsonl" in err and "empty file" in err
    rep = json.loads((out / "report.json").read_text())
    n = {k: len((out / f"{k}.jsonl").read_text().splitlines()) for k in ("approved", "doubtful", "rejected", "quarantine")}
    assert n["approved"] + n["doubtful"] + n["rejected"] == rep["valid"] == 3
    assert n["quarantine"] == rep["bad_lines"] == 7  # 5 bad lines in a.jsonl + empty + missing
    assert n["rejected"] >= 1 and n["approved"] >= 1
    for line in (out / "approved.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["id"] and r["curation"]["config_hash"] == rep["config_hash"]
    assert main(["run", *inputs, "--out", str(out), "--strict"]) == 1
    assert main(["run", inputs[2], "--out", str(out)]) == 2
    assert main(["run", "--out", str(out)]) == 2
    cfg = tmp_path / "c.toml"
    cfg.write_text("nosuchkey = 1\n")
    assert main(["run", inputs[1], "--out", str(out), "--config", str(cfg)]) == 2


def test_deterministic_and_subprocess(tmp_path):
    inputs = _mixed(tmp_path)
    outs = []
    for k in range(2):
        d = tmp_path / f"o{k}"
        p = subprocess.run([sys.executable, "-m", "curate", "run", *inputs, "--out", str(d)], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 0 and "Traceback" not in p.stderr
        outs.append({f: (d / f).read_bytes() for f in ("approved.jsonl", "doubtful.jsonl", "rejected.jsonl",
                                                          "quarantine.jsonl", "report.json")})
    assert outs[0] == outs[1]


def test_config_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[curate]\nnear_dup_threshold = 0.8\nfilters = ["length"]\n')
    c = load_config(p)
    assert c.near_dup_threshold == 0.8 and c.filters == ["length"]
    assert c.config_hash() != CurateConfig().config_hash()


def test_example_config_loads():
    c = load_config(ROOT / "dataset/recipes/curate.toml")
    assert c == CurateConfig()  # the example documents the defaults


def test_near_duplicate_graded(ctx):
    from curate.pipeline import build_index
    cx = Context(CurateConfig(recipe=ctx.config.recipe, dedup_reference=""))
    base = "感谢您一年来的信任与支持，恭祝您事业蒸蒸日上，财源广进，阖家幸福安康。"
    recs = [rec(base), rec(base.replace("广进", "滚滚")), rec("谈判顺利，合作共赢，前程似锦，生意兴隆！", scene="谈判顺利")]
    out = list(curate_records(recs, cx, Summary(), build_index(cx)))
    assert out[0]["curation"]["verdict"] == "approved"
    assert out[1]["curation"]["verdict"] in ("rejected", "doubtful")
    assert "near duplicate of " + out[0]["id"] in out[1]["curation"]["reasons"][-1]["detail"]
    assert out[2]["curation"]["verdict"] == "approved"


def _dedup_run(tmp_path, **bars) -> list[dict]:
    """A few records against a two-line reference corpus and the recipe's examples, with the given bar settings."""
    from curate.pipeline import build_index
    tmp_path.mkdir(exist_ok=True)
    ref = tmp_path / "ref.jsonl"
    ref.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"id": "ref-short", "instruction": "i", "input": "", "output": "恭喜升职，前程似锦！"},
        {"id": "ref-long", "instruction": "i", "input": "", "output": "腊八节快乐！天寒地冻，请您多穿衣服注意保暖。"}]),
        encoding="utf-8")
    cx = Context(CurateConfig(recipe=str(ROOT / "dataset/recipes/blessing.toml"), dedup_reference=str(ref), **bars))
    recs = [rec("恭喜你升职，前程似锦！", scene="工作升职", recipient="朋友", relation="朋友"),      # short, ≈0.66 ref-short
            rec("腊八节快乐！天寒地冻，请您多喝热粥注意保暖。", scene="腊八节"),                        # ≈0.66 ref-long
            rec("新的一岁也要闪闪发亮呀🌟", style="小红书", recipient="闺蜜", relation="朋友"),           # ≈0.64 an example
            rec("表弟新年快乐，万事胜意！", scene="春节", recipient="表弟", relation="平辈"),
            rec("表妹新年快乐，万事胜意！", scene="春节", recipient="表妹", relation="平辈"),            # short, ≈0.70 above
            rec("恭喜升职，前程似锦。", scene="工作升职", recipient="朋友", relation="朋友"),            # exact ref-short
            rec("腊八节快乐！天寒地冻，请您多喝热粥注意保暖！", scene="腊八节")]                        # exact copy of [1]
    return list(curate_records(recs, cx, Summary(), build_index(cx)))


def _dup(r: dict) -> str:
    return " ".join(x["detail"] for x in r["curation"]["reasons"] if x["filter"] == "duplicates")


def test_near_duplicate_bars_by_source(tmp_path):
    out = _dedup_run(tmp_path)
    got = [r["curation"]["verdict"] for r in out]
    assert got == ["approved", "doubtful", "doubtful", "approved", "doubtful", "rejected", "rejected"], \
        [(r["output"], r["curation"]) for r in out]
    # A short stock greeting may overlap the corpus; a longer one-phrase variant of it is sent to review.
    assert _dup(out[0]) == "" and "near duplicate of ref-long" in _dup(out[1])
    assert "near duplicate of recipe-example-0" in _dup(out[2])         # strict against the few-shot examples
    assert f"near duplicate of {out[3]['id']}" in _dup(out[4])          # and against the input itself, short or not
    assert "exact duplicate of ref-short" in _dup(out[5])
    # A later exact copy of a doubtful near duplicate is rejected as a copy of it (its first occurrence).
    assert _dup(out[6]) == f"exact duplicate of {out[1]['id']}"
    # The bars are config keys.
    strict = _dedup_run(tmp_path / "a", near_dup_short_chars=0)
    assert strict[0]["curation"]["verdict"] == "doubtful" and "near duplicate of ref-short" in _dup(strict[0])
    lenient = _dedup_run(tmp_path / "b", near_dup_doubtful_others=0.7)
    assert [r["curation"]["verdict"] for r in lenient][:5] == ["approved", "approved", "doubtful", "approved", "approved"]
    assert lenient[6]["curation"]["verdict"] == "rejected" and "exact duplicate of" in _dup(lenient[6])


# ---------------------------------------------------------------- the 1M-record path: batches, blocks, workers

def _sample_lines(n_copies: int = 3) -> list[str]:
    """The reference corpora several times over, with exact and one-character near duplicates close together (same
    chunk) and far apart (other chunks), records without id, one with an old curation, odd formatting, bad lines."""
    base = [json.loads(x) for p in (BLESSINGS, DEFECTS) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    lines = []
    for k in range(n_copies):
        for i, r in enumerate(base):
            r = dict(r, id=f"{r['id']}-{k}")
            if k and i % 3:
                r["output"] = r["output"][:-2] + "好" + r["output"][-1:]  # near duplicate of copy 0
            lines.append(json.dumps(r, ensure_ascii=False))
            if i % 97 == 0:
                lines.append(json.dumps(dict(r, id=r["id"] + "-again"), ensure_ascii=False))  # same chunk
    plain = {"instruction": "i", "input": "祝妈妈生日快乐,正常风格", "output": "妈妈，生日快乐！愿您身体健康，万事顺意。"}
    lines.insert(5, json.dumps(plain, ensure_ascii=False, indent=None, separators=(", ", ": ")))  # no id, spaces
    lines.insert(7, json.dumps(dict(plain, output="旧的结论还在", curation={"verdict": "approved", "reasons": []}),
                               ensure_ascii=True))
    lines.insert(9, "{not json")
    lines.insert(11, "")
    return lines


def test_parallel_run_equals_serial(tmp_path, monkeypatch):
    import curate.pipeline as pl
    data = tmp_path / "in.jsonl"
    data.write_bytes(("\ufeff" + "\r\n".join(_sample_lines()) + "\r\n").encode("utf-8"))
    monkeypatch.setattr(pl, "BLOCK_BYTES", 8192)  # many chunks, so duplicates cross chunk boundaries
    cfg = CurateConfig(recipe=str(ROOT / "dataset/recipes/blessing.toml"), dedup_reference="")
    outs = []
    for workers in (0, 2):
        d = tmp_path / f"w{workers}"
        s = pl.run([str(data)], d, cfg, workers=workers)
        outs.append({f.name: f.read_bytes() for f in sorted(d.iterdir())})
    assert outs[0] == outs[1]
    recs = [json.loads(x) for v in ("approved", "doubtful", "rejected") for x in outs[0][f"{v}.jsonl"].splitlines()]
    assert len(recs) == s.valid == len(_sample_lines()) - 2 and len(s.problems) == 1
    assert all(set(r["curation"]) == {"verdict", "reasons", "config_hash"} for r in recs)
    dup = sum(r["curation"]["reasons"][-1]["filter"] == "duplicates" for r in recs if r["curation"]["reasons"])
    assert dup > 800
    # The same verdicts as the in-memory path (one batch after the other, no blocks, no workers).
    mem = {r["id"]: r["curation"] for r in curate_records(
        [json.loads(x) for x in _sample_lines() if x.startswith("{\"")],
        Context(cfg), Summary(), pl.build_index(Context(cfg)))}
    assert {r["id"]: r["curation"] for r in recs} == mem


def test_output_line_is_input_line_plus_curation(tmp_path):
    import curate.pipeline as pl
    lines = _sample_lines(1)
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    d = tmp_path / "out"
    pl.run([str(data)], d, CurateConfig(dedup_reference=""), workers=0)
    out = {json.loads(x)["id"]: x for v in ("approved", "doubtful", "rejected")
           for x in (d / f"{v}.jsonl").read_text(encoding="utf-8").splitlines()}
    r0 = json.loads(lines[0])
    assert out[r0["id"]].startswith(lines[0][:-1] + ',"curation":{"verdict":')  # the bytes read, not re-encoded
    spaced = [json.loads(x) for x in out.values() if json.loads(x)["output"].startswith("妈妈，生日快乐！愿您身体健康，万事")]
    assert spaced and spaced[0]["id"].startswith("x-")  # an id was added to the record that had none
    old = [x for x in out.values() if json.loads(x)["output"] == "旧的结论还在"]
    assert old[0].count('"curation"') == 1 and json.loads(old[0])["curation"]["config_hash"]  # replaced, not repeated


def test_dedup_batch_equals_one_by_one():
    texts = [json.loads(x)["output"] for x in BLESSINGS.read_text(encoding="utf-8").splitlines() if x.strip()]
    two = [t[:3] + "啊啊" + t[5:] for t in texts[:300:9]]  # doubtful near duplicates, then exact copies of them
    texts = texts[:300] + [t[:-1] + "啊" for t in texts[:300:7]] + texts[:300:11] + two + two[::2] + ["", "！！", "生日快乐"] * 2
    import numpy as np
    add = np.array([i % 5 != 0 for i in range(len(texts))])

    def index():  # two sources with their own bars, a short-text bar, doubtful hits indexed for exact matching
        idx = DedupIndex(perms=96, bands=24, threshold=0.5, reject=0.7, short_chars=12)
        idx.add_many([(f"ex{i}", t) for i, t in enumerate(texts[:40:3])])
        idx.start_source(0.6, short_bar=0.7)
        return idx
    one = index()
    want = [one.check_add(f"r{i}", t, add=bool(a)) for i, (t, a) in enumerate(zip(texts, add))]
    batch = index()
    got = []
    for k in range(0, len(texts), 128):  # within-batch and cross-batch duplicates both occur
        got += batch.check_batch([f"r{i}" for i in range(k, min(k + 128, len(texts)))],
                                 batch.prepare(texts[k:k + 128]), add[k:k + 128])
    assert got == want
    assert sum(h is not None and h[1] == 1.0 for h in got) > 20 and sum(h is not None and h[1] < 1.0 for h in got) > 20
    assert sum(h is not None and 0.6 <= h[1] < 0.7 for h in got) > 5
    copies_of_doubtful = [h for h in got if h is not None and h[1] == 1.0 and h[0].startswith("r") and int(h[0][1:]) >= 300]
    assert len(copies_of_doubtful) > 5


def test_read_blocks_equals_read_records(tmp_path):
    from distillery.io import MAX_LINE_BYTES, Block, parse_block, read_blocks, read_records
    p = tmp_path / "a.jsonl"
    long_line = json.dumps({"instruction": "x", "input": "", "output": "长" * MAX_LINE_BYTES})
    p.write_bytes(("\ufeff" + "\r\n".join(_sample_lines(1)[:40] + [long_line] + _sample_lines(1)[40:80])).encode())
    want = [(type(x).__name__, x.line, getattr(x, "record", None) or str(x)) for x in read_records(p)]
    for block_bytes in (64, 5000, 1 << 20):
        got = []
        for e in read_blocks(p, block_bytes=block_bytes):
            items = [e]
            if isinstance(e, Block):  # another process reads the same bytes by reference; raw lines start at `at`
                assert e._replace(data=None).bytes_of(str(p)) == e.data
                parsed = list(parse_block(e.data, str(p), e.line))
                assert all(e.data[at:at + len(raw)] == raw for at, raw, it in parsed if len(raw) < MAX_LINE_BYTES)
                items = [it for _, _, it in parsed]
            got += [(type(x).__name__, x.line, getattr(x, "record", None) or str(x)) for x in items]
        assert got == want, block_bytes
    assert any("over the" in str(x[2]) for x in want)


def test_normalise_fast_path_equals_definition():
    """normalise's translate fast path gives exactly NFKC + letters/digits only, on every corpus text, on every
    character the fast path covers, on random mixes of them, and where it must fall back (combining marks)."""
    import random
    import unicodedata

    import regex

    from curate.dedup import COMPOSING_STARTERS, _FAST_RANGES, _fast_path, is_simple, normalise

    def definition(t: str) -> str:
        return regex.sub(r"[^\p{L}\p{N}]+", "", unicodedata.normalize("NFKC", t))

    # The hard-coded starters that compose are what the Unicode database of this Python says.
    second = set()
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<") and len(d.split()) == 2:
            second.add(int(d.split()[1], 16))
    hangul_vt = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
    assert {x for x in second if unicodedata.combining(chr(x)) == 0} | hangul_vt == COMPOSING_STARTERS
    texts = [json.loads(x)["output"] for p in ROOT.glob("dataset/reference/*.jsonl")
             for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(texts) > 1300 and all(normalise(t) == definition(t) for t in texts)
    simple = [chr(cp) for lo, hi in _FAST_RANGES for cp in range(lo, hi + 1) if is_simple(chr(cp))]
    assert len(simple) > 20000 and all(normalise(c) == definition(c) for c in simple)
    rnd = random.Random(4)
    mixes = ["".join(rnd.choices(simple, k=rnd.randint(1, 40))) for _ in range(20000)]
    assert all(normalise(t) == definition(t) for t in mixes)
    # Outside the simple set (Å is A + a combining ring; ﬁ and ㈠ lie outside the ranges): the slow path.
    odd = ["e\u0301！", "ｶﾞ", "e！\u0301", "Å", "가\u11a8", "①②", "ﬁ", "㈠好"]
    assert [_fast_path().unsafe.search(t) is not None for t in odd] == [True, True, True, True, True, False, True, True]
    assert all(normalise(t) == definition(t) for t in odd)


def test_parse_line_problems():
    """The JSON Lines parser (orjson): one clear problem per bad line, UTF-8 errors named as such."""
    from distillery.io import Located, Problem, parse_line
    good = parse_line('{"instruction": "i", "input": "", "output": "新年快乐！"}\r\n'.encode(), "f.jsonl", 3)
    assert isinstance(good, Located) and good.record["output"] == "新年快乐！"
    cases = {b'{"instruction": "i", "input": "", "output": NaN}': "invalid JSON",   # json would accept NaN
             b'{"instruction": "i", "input": "", "output": "\\ud800"}': "invalid JSON",  # a lone surrogate
             b"[" * 5000 + b"]" * 5000: "invalid JSON",                                # no RecursionError
             b'{"instruction": "i", "input": "", "output": "\xe6\x96"}': "not UTF-8 (byte 0xe6 at column 46)",
             '{"instruction": "i", "input": "", "outptu": "好"}'.encode(): "output"}
    for raw, want in cases.items():
        p = parse_line(raw, "f.jsonl", 7)
        assert isinstance(p, Problem) and str(p).startswith("f.jsonl:7: ") and want in str(p), (raw[:60], str(p))


def test_prescreened_verdicts_equal_full(ctx):
    """The filters' pre-screens (cheap checks that let a filter skip its rules for clean text) change no verdict:
    every filter, screened and unscreened, on the reference, defect and held-out files and on random strings made
    of the characters the rules look for."""
    import random

    from curate.filters import MARKDOWN, META_TALK, MOJIBAKE, PUNCT_RUN, TITLE_PREFIX, TRAD_IN_GB2312, WRAP
    recs = [json.loads(x) for p in sorted(ROOT.glob("dataset/reference/*.jsonl"))
            for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    rnd = random.Random(11)
    pattern_chars = {c for p in (MARKDOWN, META_TALK, MOJIBAKE, PUNCT_RUN, TITLE_PREFIX, TRAD_IN_GB2312, WRAP)
                     for c in p.pattern if not c.isascii() or not c.isalnum()}
    alphabet = sorted(pattern_chars | set("生日快乐祝福您你愿万事如意呀啦哈哦~！。，,!?:;.1２aZé錦鍓\u200d\ufe0f🎂🌟👨‍👩 \n\r\t\u3000\x1c\u2028"))
    for k in range(20000):
        base = recs[k % len(recs)]
        text = "".join(rnd.choices(alphabet, k=rnd.randint(1, 24)))
        if k % 3 == 0:  # a real greeting with a few characters spliced in
            at = rnd.randrange(len(base["output"]) + 1)
            text = base["output"][:at] + text[:3] + base["output"][at:]
        recs.append(dict(base, output=text))
    screened, full = Context(ctx.config), Context(ctx.config)
    full.screen = False
    fired = 0
    for name, f in ALL.items():
        f = f()
        for r in recs:
            got = [], []
            for cx, out in ((screened, got[0]), (full, got[1])):
                try:
                    out.append(f.check(r, cx.resolve(r), cx))
                except Exception as e:  # Skip: the same in both
                    out.append(type(e).__name__)
            assert got[0] == got[1], (name, r["output"], got)
            fired += got[1][0] is not None and not isinstance(got[1][0], str)
    assert fired > 20000  # the random strings do trip the rules


def test_emoji_clusters_and_char_count_equal_grapheme_definition():
    """emoji_list / without_emoji (one findall) and char_count's no-clustering path equal their definitions on
    grapheme clusters (\\X): the clusters holding an Extended_Pictographic, the clusters that are not whitespace;
    on every corpus text and on random strings of emoji, joiners, marks, flags, Hangul parts and whitespace."""
    import random

    import regex

    from distillery.text import EMOJI, char_count, emoji_list, without_emoji

    def clusters(t: str) -> list[str]:
        return regex.findall(r"\X", t)

    texts = [json.loads(x)["output"] for p in ROOT.glob("dataset/reference/*.jsonl")
             for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    alphabet = list("a生😀👍🏻\u200d\ufe0f\u20e3#1\u0301\u0903\u0600🇨🇳\r\n ©️✨👨‍👩‍👧\U0001F3FB\u0e33\u1100\u1161！"
                    "\u11a8가각\t\x1c\u3000，")
    rnd = random.Random(2)
    texts += ["".join(rnd.choices(alphabet, k=rnd.randint(1, 12))) for _ in range(50000)]
    for t in texts:
        assert emoji_list(t) == [g for g in clusters(t) if EMOJI.search(g)], t
        assert without_emoji(t) == "".join(g for g in clusters(t) if not EMOJI.search(g)), t
        assert char_count(t) == sum(not g.isspace() for g in clusters(t)), t
    assert emoji_list("爱你❤️👨‍👩‍👧🇨🇳") == ["❤️", "👨‍👩‍👧"]


@pytest.mark.skipif(sys.platform != "linux", reason="the patched method reaches workers by fork")
def test_worker_error_surfaces_and_workers_end(tmp_path, monkeypatch):
    import multiprocessing

    import curate.pipeline as pl
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(_sample_lines(1)) + "\n", encoding="utf-8")
    monkeypatch.setattr(pl, "BLOCK_BYTES", 8192)

    def boom(self, path, entries):
        raise ValueError(f"boom in worker at {path}")
    monkeypatch.setattr(pl.Judge, "judge_lines", boom)
    with pytest.raises(ValueError, match="boom in worker at"):
        pl.run([str(data)], tmp_path / "out", CurateConfig(dedup_reference=""), workers=2)
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "out" / "approved.jsonl").exists()  # no half result


def test_run_refuses_to_overwrite_reviewed_decisions(tmp_path, capsys):
    from curate.pipeline import REVIEW_MARKER, reviewed_decisions
    from curate.review.pull import write_review_marker
    inputs = _mixed(tmp_path)
    out = tmp_path / "out"
    assert main(["run", *inputs, "--out", str(out)]) == 0
    assert reviewed_decisions(out) == 0 and main(["run", *inputs, "--out", str(out)]) == 0  # plain re-run: fine
    # what `curate review pull` leaves: a decided record with review provenance, and its marker
    approved = [json.loads(x) for x in (out / "approved.jsonl").read_text().splitlines()]
    approved[0]["meta"].setdefault("provenance", {})["review"] = {
        "reviewer": "ann", "time": "2026-01-01T00:00:00Z", "decision": "approve", "annotation_id": 7}
    (out / "approved.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                                                for r in approved))
    before = (out / "approved.jsonl").read_bytes()
    for with_marker in (False, True):   # without: a folder pulled before the marker existed
        if with_marker:
            write_review_marker(out, approved)
            assert json.loads((out / REVIEW_MARKER).read_text())["reviewed"] == 1
        capsys.readouterr()
        assert main(["run", *inputs, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"curate: {out} holds reviewed decisions (1 records from `curate review pull`); "
                       "use another --out, or --force to overwrite")
        assert (out / "approved.jsonl").read_bytes() == before
    assert main(["run", *inputs, "--out", str(out), "--force"]) == 0
    assert (out / "approved.jsonl").read_bytes() != before and not (out / REVIEW_MARKER).exists()
    assert reviewed_decisions(out) == 0 and main(["run", *inputs, "--out", str(out)]) == 0
