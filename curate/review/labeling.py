"""The Label Studio view for reviewing one LLM output, and the task/prediction/annotation shapes.

Ordering ("most uncertain first"): `uncertainty(rec)` = (number of curation reasons, sum of their scores);
higher first, ties by id. A record several filters doubt, strongly, is the one a human should see first.
"""
from __future__ import annotations

from xml.sax.saxutils import quoteattr

DECISIONS = ("approve", "approve-with-edit", "reject")
META_KEYS = ("scene", "style", "recipient", "constraint", "max_chars")


def label_config(reject_reasons: list[str]) -> str:
    reasons = "\n".join(f"    <Choice value={quoteattr(r)}/>" for r in reject_reasons)
    return f"""<View>
  <Header value="Instruction"/><Text name="instruction" value="$instruction"/>
  <Header value="Input"/><Text name="input" value="$input"/>
  <Header value="Occasion"/><Text name="context" value="$context"/>
  <Header value="Why the curator doubts it (filter: detail, score)"/><Text name="filter_info" value="$filter_info"/>
  <Header value="Teacher output (edit below for approve-with-edit)"/><Text name="output" value="$output"/>
  <TextArea name="edited_output" toName="output" editable="true" rows="4" maxSubmissions="1"/>
  <Choices name="decision" toName="output" choice="single" showInline="true" required="true">
    <Choice value="approve"/><Choice value="approve-with-edit"/><Choice value="reject"/>
  </Choices>
  <Header value="Reject reason"/>
  <Choices name="reject_reason" toName="output" choice="multiple" showInline="true">
{reasons}
  </Choices>
</View>"""


def uncertainty(rec: dict) -> tuple[int, float]:
    reasons = (rec.get("curation") or {}).get("reasons") or []
    return len(reasons), round(sum(float(r.get("score") or 0) for r in reasons), 6)


def filter_info(rec: dict) -> str:
    reasons = (rec.get("curation") or {}).get("reasons") or []
    return "\n".join(f"{r.get('filter')}: {r.get('detail')} (score {r.get('score')})" for r in reasons) or "-"


def context_line(meta: dict) -> str:
    """One labelled line (the bare values alone are hard to tell apart on the page)."""
    return " · ".join(f"{k.replace('_', ' ')}: {meta.get(k) if meta.get(k) not in (None, '') else '–'}"
                      for k in META_KEYS)


def task_for(rec: dict) -> dict:
    """One task; the prediction pre-fills the TextArea with the teacher output so it shows on first view."""
    meta = rec.get("meta") or {}
    _, s = uncertainty(rec)
    data = {"sample_id": rec["id"], "instruction": rec["instruction"], "input": rec["input"],
            "output": rec["output"], "filter_info": filter_info(rec),
            "reasons": (rec.get("curation") or {}).get("reasons") or [], "uncertainty": s}
    # the separate keys are Data Manager columns (filter / sort by scene...); `context` is what the view shows
    data.update({k: "" if meta.get(k) is None else str(meta.get(k)) for k in META_KEYS}, context=context_line(meta))
    return {"data": data,
            # no prediction score: LS shows it as a percentage and the uncertainty is not one (it is data.uncertainty)
            "predictions": [{"model_version": "curate", "result": [
                {"from_name": "edited_output", "to_name": "output", "type": "textarea",
                 "value": {"text": [rec["output"]]}}]}]}


def result_for(decision: str, text: str | None = None, reasons: list[str] | None = None) -> list[dict]:
    """An annotation result as the UI writes it (used by tests acting as reviewers)."""
    res = [{"from_name": "decision", "to_name": "output", "type": "choices", "value": {"choices": [decision]}}]
    if text is not None:
        res.append({"from_name": "edited_output", "to_name": "output", "type": "textarea", "value": {"text": [text]}})
    if reasons:
        res.append({"from_name": "reject_reason", "to_name": "output", "type": "choices", "value": {"choices": reasons}})
    return res


def parse_result(result: list[dict]) -> dict:
    """{decision, text, reject_reasons} from one annotation's result."""
    out = {"decision": None, "text": None, "reject_reasons": []}
    for item in result or []:
        v = item.get("value") or {}
        if item.get("from_name") == "decision" and v.get("choices"):
            out["decision"] = v["choices"][0]
        elif item.get("from_name") == "edited_output" and v.get("text"):
            out["text"] = "\n".join(v["text"])
        elif item.get("from_name") == "reject_reason":
            out["reject_reasons"] = list(v.get("choices") or [])
    return out
