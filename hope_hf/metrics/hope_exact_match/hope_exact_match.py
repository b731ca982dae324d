"""Exact-match accuracy of short answers, as an `evaluate` metric module that loads offline by path.

A prediction is correct when it equals its reference after stripping surrounding whitespace (and, with
``ignore_case=True``, ignoring case). Used by hope_hf.evaluation for the single-needle and BABILong-style tasks.

    >>> import evaluate
    >>> from hope_hf.evaluation import exact_match_metric_path
    >>> metric = evaluate.load(exact_match_metric_path())
    >>> metric.compute(predictions=["71432", " kitchen", "4"], references=["71432", "kitchen", "5"])["exact_match"]
    0.6666666666666666
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference after stripping whitespace (optionally ignoring case)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers (already cut to the answer span).
    references (`list[str]`): the correct answers.
    ignore_case (`bool`, default False): compare case-insensitively.
Returns:
    exact_match (`float`): correct / total.
    correct (`int`): number of exact matches.
    total (`int`): number of scored answers.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HopeExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False):
        if len(predictions) == 0:
            raise ValueError("hope_exact_match: there is nothing to score (no predictions)")

        def norm(s):
            s = (s or "").strip()
            return s.lower() if ignore_case else s

        correct = sum(norm(p) == norm(r) for p, r in zip(predictions, references))
        return {"exact_match": correct / len(predictions), "correct": int(correct), "total": len(predictions)}
