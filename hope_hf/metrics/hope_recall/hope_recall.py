"""Multi-query recall accuracy, as an `evaluate` metric module that loads offline by path.

Each example asks several queries (multi-query associative recall); a query is correct when its predicted answer
equals the reference after stripping whitespace. Reports the fraction of correct queries over all examples and the
fraction of examples whose queries are all correct.

    >>> import evaluate
    >>> from hope_hf.evaluation import recall_metric_path
    >>> metric = evaluate.load(recall_metric_path())
    >>> r = metric.compute(predictions=[["12", "7"], ["3"]], references=[["12", "8"], ["3"]])
    >>> r["recall_accuracy"], r["example_accuracy"]
    (0.6666666666666666, 0.5)
"""

import datasets
import evaluate

_DESCRIPTION = "Per-query and per-example accuracy of multi-query recall answers (exact match after stripping)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[str]]`): per example, the predicted answer of each query.
    references (`list[list[str]]`): per example, the correct answer of each query (same lengths).
Returns:
    recall_accuracy (`float`): correct queries / all queries.
    example_accuracy (`float`): examples with every query correct / examples.
    queries (`int`): number of queries scored.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HopeRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("hope_recall: there is nothing to score (no examples)")
        total = correct = all_ok = 0
        for i, (preds, refs) in enumerate(zip(predictions, references)):
            if len(preds) != len(refs):
                raise ValueError(f"hope_recall: example {i} has {len(preds)} predictions for {len(refs)} references")
            if not refs:
                raise ValueError(f"hope_recall: example {i} has no queries")
            ok = [(p or "").strip() == (r or "").strip() for p, r in zip(preds, refs)]
            total += len(ok)
            correct += sum(ok)
            all_ok += all(ok)
        return {"recall_accuracy": correct / total, "example_accuracy": all_ok / len(predictions), "queries": total}
